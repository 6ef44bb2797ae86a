"""Progress of an operation, as reported to ``on_progress`` callbacks and printed by the CLI."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from forgeqmp.core.record import SessionRecord

__all__ = ["JobProgress", "ProgressCallback", "ProgressEvent", "StateListener"]

MiB = 1 << 20


@attrs.frozen
class ProgressEvent:
    """A step or progress report, for callbacks and the CLI's JSON lines."""

    operation: str
    step: str
    detail: Mapping[str, Any] = attrs.field(factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"event": "progress", "operation": self.operation, "step": self.step, **self.detail}


ProgressCallback = Callable[[ProgressEvent], None]

#: Called with the session record each time its state changes (see :meth:`Instance.follow`).
StateListener = Callable[[SessionRecord], None]


@attrs.frozen
class JobProgress:
    """How far one QEMU block job got, as ``query-jobs`` reports it (bytes of work)."""

    job_id: str
    status: str
    done: int
    total: int

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> JobProgress:
        """From one entry of ``query-jobs``."""
        return cls(
            str(job["id"]),
            str(job["status"]),
            int(job.get("current-progress", 0)),
            int(job.get("total-progress", 0)),
        )

    def describe(self) -> str:
        """For people: ``312.0 of 1536.0 MiB (20%)``."""
        percent = 100 * self.done // self.total if self.total > 0 else 0
        return f"{self.done / MiB:.1f} of {self.total / MiB:.1f} MiB ({percent}%)"
