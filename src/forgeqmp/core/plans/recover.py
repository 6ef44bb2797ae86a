"""The QMP of recovery's actions, and the order they run in (sans-IO).

:func:`forgeqmp.core.reconcile.reconcile` decides *which* actions a session needs; each action
type says here *when* it runs (its :class:`Order`) and, for an action that is only QMP, *what* it
sends (its ``commands()``, built by the functions below). The recover driver
(:mod:`forgeqmp.ops.recover`) runs them in that order and sends those commands; the actions that
wait for QEMU (finishing a commit job, cancelling the memory save) reuse the commit plan
(:mod:`forgeqmp.core.plans.commit`) and :mod:`forgeqmp.core.plans.common`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.common import blockdev_del

__all__ = [
    "Order",
    "remove_node",
    "reset_migration",
]


class Order(enum.IntEnum):
    """The order recovery actions run in: stop the migration, merge, resume, fingerprint, tidy
    QEMU up, delete files (only once whatever they held is merged), and finish a discard last.
    Actions of the same order keep the order reconcile planned them in."""

    STOP_MIGRATION = 0
    MERGE = 1
    RESUME = 2
    FINGERPRINT = 3
    REMOVE_NODES = 4
    TIDY_MIGRATION = 5
    DELETE_FILES = 6
    FINISH_DISCARD = 7


def remove_node(node: str) -> tuple[Command, ...]:
    """Remove a node of the session nothing uses any more."""
    return (blockdev_del(node),)


def reset_migration(
    capabilities: Sequence[str], parameters: Mapping[str, Any]
) -> tuple[Command, ...]:
    """Turn ``capabilities`` off and set ``parameters`` back (either may be empty: then its
    command is not sent)."""
    commands: list[Command] = []
    if capabilities:
        commands.append(
            Command(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": c, "state": False} for c in capabilities]},
            )
        )
    if parameters:
        commands.append(Command("migrate-set-parameters", dict(parameters)))
    return tuple(commands)
