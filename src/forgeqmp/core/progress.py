"""Progress of an operation, as reported to ``on_progress`` callbacks and printed by the CLI."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from forgeqmp.core.record import SessionRecord

__all__ = ["ProgressCallback", "ProgressEvent", "StateListener"]


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
