"""Deterministic crash points, for the fault-matrix tests.

The enable, commit and discard drivers call :func:`reached` at every step boundary (after the
record of the step is on disk). Normally it returns at once. With ``FORGEQMP_TEST_CRASH_AT`` set
to ``<operation>:<step>`` it kills the controlling process right there with SIGKILL (no cleanup,
no ``finally``: what a crash or an OOM kill does); with ``<operation>:<step>:qemu`` it SIGKILLs the
QEMU process instead (once) and lets the controller carry on, as when QEMU crashes under it.

Only this function reads the variable; nothing else in forgeqmp changes behaviour for tests.
:data:`STEPS` lists the crash points of each operation in the order they are reached.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Final

from forgeqmp.process import wait_gone

__all__ = ["ENV", "STEPS", "reached"]

#: The environment variable naming the crash point: ``operation:step`` or ``operation:step:qemu``.
ENV: Final = "FORGEQMP_TEST_CRASH_AT"

#: Every crash point, per operation, in the order the driver reaches them.
STEPS: Final[Mapping[str, tuple[str, ...]]] = {
    "enable": (
        "planned",  # CREATING recorded; nothing changed yet
        "overlays-created",  # overlay files and nodes exist; not attached
        "migration-started",  # memory file passed to QEMU, migration settings changed
        "pre-switchover",  # the guest is paused by the migration; disks not snapshotted
        "snapshot-transaction-done",  # disks on the overlays; guest paused; memory not complete
        "snapshot-done",  # memory saved, guest running; digest not recorded yet
        "active",  # ACTIVE recorded
    ),
    "commit": (
        "committing",  # COMMITTING recorded; nothing merged
        "disk-marked",  # first disk recorded merged (point of no return); job not started
        "job-started",  # block-commit running
        "job-ready",  # job ready (overlay and original in sync); not completed
        "pivoting",  # guest paused by us for the completion
        "pivoted",  # the disk is on its original again; not recorded yet
        "disk-recorded",  # recorded on its original (step committing); guest still paused by us
        "disk-merged",  # recorded, overlay removed, guest running
        "committed",  # COMMITTED recorded
    ),
    "discard": (
        "stopping-qemu",  # DISCARDING recorded; QEMU still runs on the overlays
        "qemu-stopped",  # the old QEMU is gone
        "qemu-launched",  # a new QEMU waits for the memory state
        "memory-loaded",  # memory state loaded, guest not resumed
        "discarded",  # DISCARDED recorded
    ),
}

_fired = False


def reached(operation: str, step: str, qemu_pid: int | None = None) -> None:
    """A driver reached ``step`` of ``operation``: crash here if the test asked for it."""
    global _fired
    spec = os.environ.get(ENV)
    if not spec or _fired:
        return
    parts = spec.split(":")
    if parts[:2] != [operation, step]:
        return
    victim = parts[2] if len(parts) > 2 else "self"
    _fired = True
    if victim == "qemu":
        if qemu_pid is not None:
            try:
                os.kill(qemu_pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            wait_gone(qemu_pid, 10.0)
        return
    os.kill(os.getpid(), signal.SIGKILL)
