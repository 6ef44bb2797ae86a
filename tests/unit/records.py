"""The one factory of session records for the unit tests: a valid :class:`SessionRecord` in any
state and step, with every field a test does not care about filled in coherently.

``make_record(state)`` is a session of one disk (``disk0``) as forgeqmp writes it in that state:
the step it saves there, no activation time while Creating, no memory digest before the save
finished, a finish time once the session is over, and for Failed a phase, an error and a next
step. Any field can be given (``make_record(State.ACTIVE, disks=2, step="snapshot-done")``);
``root=`` puts every file of the session under a directory (for tests that create them), and the
QEMU of the record is a program that does not exist, with a pid no process can have, so nothing
a test runs can start a process or touch a real image. :func:`make_disk`, :func:`make_memory`
and :func:`make_qemu` build the parts the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from forgeqmp.core.record import DiskRecord, MemoryRecord, QemuRecord, SessionRecord
from forgeqmp.core.states import State

__all__ = [
    "DEAD_PID",
    "SHA",
    "SID",
    "STEPS",
    "T0",
    "TAG",
    "make_disk",
    "make_memory",
    "make_qemu",
    "make_record",
]

SID = "3f2a9c1e-4b7d-4e8a-9c3b-2d1e0f9a8b7c"
#: The tag of the session's QEMU node names (``fq`` + the session id's first eight digits).
TAG = "fq3f2a9c1e"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SHA = "ab" * 32
#: A pid no process can have (above the kernel's largest pid_max): that "QEMU" is never alive.
DEAD_PID = 2**22 + 1
#: The step forgeqmp saves when it enters each state (Failed keeps the step it failed at: the
#: one of its phase).
STEPS: dict[State, str] = {
    State.CREATING: "planned",
    State.ACTIVE: "active",
    State.COMMITTING: "committing",
    State.DISCARDING: "stopping-qemu",
    State.COMMITTED: "committed",
    State.DISCARDED: "discarded",
}
_FINISHED = (State.COMMITTED, State.DISCARDED)


def _base(root: Path | str | None) -> str:
    return "/vm" if root is None else str(root)


def make_disk(i: int = 0, *, root: Path | str | None = None, **changes: Any) -> DiskRecord:
    """Forged disk ``disk{i}``, on its overlay (its images in ``root``, default ``/vm``)."""
    base = _base(root)
    values: dict[str, Any] = {
        "name": f"disk{i}",
        "qdev": f"/machine/peripheral/disk{i}/virtio-backend",
        "device_node": f"disk{i}-fmt",
        "base_file": f"{base}/disk{i}.qcow2",
        "base_format": "qcow2",
        "virtual_size": 64 << 20,
        "overlay_file": f"{base}/disk{i}.qcow2.forge-{SID[:8]}.qcow2",
        "overlay_node": f"{TAG}-{i}-fmt",
        "overlay_file_node": f"{TAG}-{i}-file",
    }
    values.update(changes)
    return DiskRecord(**values)


def make_memory(
    *, root: Path | str | None = None, saved: bool = True, **changes: Any
) -> MemoryRecord:
    """The memory file of the session (in ``root``/state); ``saved``: its size and digest are
    recorded (the save finished)."""
    state = "/state" if root is None else f"{root}/state"
    values: dict[str, Any] = {
        "path": f"{state}/memory-{SID}.bin",
        "size": 4096 if saved else None,
        "sha256": SHA if saved else None,
        "transport": "fdset-file",
        "capabilities": ("events", "pause-before-switchover"),
    }
    values.update(changes)
    return MemoryRecord(**values)


def make_qemu(*, root: Path | str | None = None, **changes: Any) -> QemuRecord:
    """The QEMU of the session: a program that does not exist, with a pid no process has."""
    base = _base(root)
    values: dict[str, Any] = {
        "pid": DEAD_PID,
        "argv": (f"{base}/no-such-qemu", "-m", "256"),
        "cwd": base,
        "env": {"PATH": "/nonexistent"},
        "version": "10.0.2",
        "machine": "pc-q35-10.0",
        "qmp_socket": f"{base}/qmp.sock",
    }
    values.update(changes)
    return QemuRecord(**values)


def make_record(
    state: State = State.ACTIVE,
    *,
    disks: int | Sequence[DiskRecord] = 1,
    root: Path | str | None = None,
    **changes: Any,
) -> SessionRecord:
    """A valid session record in ``state`` (see the module's docstring); ``disks``: how many
    forged disks (``disk0``...) or the disks themselves; ``changes``: any other field."""
    phase = changes.get("failure_phase", State.ACTIVE) if state is State.FAILED else state
    phase = phase or State.ACTIVE
    if not isinstance(disks, int):
        forged = tuple(disks)
    elif state is State.COMMITTED:  # every disk merged and back on its original
        forged = tuple(
            make_disk(i, root=root, merged=True, overlay_node=None, overlay_file_node=None)
            for i in range(disks)
        )
    else:
        forged = tuple(make_disk(i, root=root) for i in range(disks))
    values: dict[str, Any] = {
        "session_id": SID,
        "state": state,
        "step": STEPS.get(phase, "active"),  # a state that is not one: validation tests
        "strategy": "precopy",
        "created_at": T0,
        "activated_at": None if phase is State.CREATING else T0 + timedelta(seconds=1),
        "updated_at": T0 + timedelta(seconds=2),
        "finished_at": T0 + timedelta(seconds=2) if state in _FINISHED else None,
        "disks": forged,
        "memory": make_memory(root=root, saved=phase is not State.CREATING),
        "qemu": make_qemu(root=root),
    }
    if state is State.FAILED:
        values.update(
            failure_phase=phase,
            error=f"{phase.value} failed: it was made to",
            next_step="run 'forgeqmp recover'",
        )
    values.update(changes)
    return SessionRecord(**values)
