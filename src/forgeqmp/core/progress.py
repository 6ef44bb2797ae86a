"""Progress of an operation, as reported to ``on_progress`` callbacks and printed by the CLI."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from forgeqmp.core.record import SessionRecord

__all__ = ["JobProgress", "ProgressCallback", "ProgressEvent", "RateEstimate", "StateListener"]

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


@attrs.frozen
class RateEstimate:
    """The rate of a transfer measured since its first sample (``started_at`` seconds on any
    monotonic clock, ``started_done`` bytes then), and the time left it gives.

    Measured from the first sample this process saw, not from zero: a commit job continued
    from where a stopped commit left it has copied bytes nobody timed. A live commit's total
    grows while the guest writes; the estimate follows it at each sample.
    """

    started_at: float
    started_done: int

    def rate(self, now: float, done: int) -> float | None:
        """Bytes a second since the first sample; None before any was measured."""
        elapsed, copied = now - self.started_at, done - self.started_done
        if elapsed <= 0 or copied <= 0:
            return None
        return copied / elapsed

    def eta(self, now: float, done: int, total: int) -> float | None:
        """Seconds until ``done`` reaches ``total`` at the rate so far: 0 once it has, None
        while no rate was measured yet (nothing copied since the first sample)."""
        if done >= total:
            return 0.0
        rate = self.rate(now, done)
        if rate is None:
            return None
        return (total - done) / rate

    def detail(self, now: float, done: int, total: int) -> dict[str, Any]:
        """The ``done``/``total``/``eta_s`` (and ``bytes_per_second``) of a progress event."""
        eta = self.eta(now, done, total)
        rate = self.rate(now, done)
        return {
            "done": done,
            "total": total,
            "eta_s": None if eta is None else round(eta, 2),
            "bytes_per_second": None if rate is None else round(rate),
        }
