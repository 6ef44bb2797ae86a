"""One QMP command as a value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Command"]


def _freeze(arguments: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(arguments or {})


@attrs.frozen
class Command:
    """A QMP command name and its arguments (a JSON-able mapping)."""

    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)

    def __str__(self) -> str:
        return f"{self.name} {dict(self.arguments)}" if self.arguments else self.name
