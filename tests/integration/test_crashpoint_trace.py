"""Every crash point is really reached, on real QEMU, in the order :data:`forgeqmp.adapters.crashpoints.STEPS`
lists it, with the pid of the QEMU running at that moment (what a ``:qemu`` cell kills).

The fault matrix (test_recover.py) crashes at each point; this test proves the points it names are
the ones the drivers pass through (a crash point removed from a driver, renamed or moved out of
order fails here), by recording them instead of crashing: an enable and a commit, then an enable
and a discard of one 1-disk guest.

The same trace shows the host flush at work (:mod:`forgeqmp.adapters.hostflush`): the image files are
really fsynced by this process while the guest still runs, before each pause (enable: between
``migration-started`` and the ``pre-switchover`` pause; commit: between ``job-ready`` and the
``pivoting`` pause). A flush that does nothing fails here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import forgeqmp
from forgeqmp.adapters import crashpoints, hostflush
from forgeqmp.core.states import State
from forgeqmp.testing import DiskSpec, QemuInstance

from .helpers import commit, discard, enable, run


def run_record(state: Path) -> forgeqmp.SessionRecord:
    record = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    assert record is not None
    return record


pytestmark = pytest.mark.qemu


def test_the_drivers_reach_every_crash_point_in_order(
    qemu_factory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vm: QemuInstance = qemu_factory(disks=[DiskSpec("d0", "qcow2", 32)], memory_mib=256)
    trace: list[tuple[str, str, int | None]] = []
    monkeypatch.setattr(
        crashpoints, "reached", lambda op, step, pid=None: trace.append((op, step, pid))
    )
    real_fsync = hostflush.os.fsync
    fsyncs: list[tuple[str, str]] = []  # (the last crash point passed, the file fsynced)

    def fsync(fd: int) -> None:
        fsyncs.append((trace[-1][1] if trace else "", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(hostflush.os, "fsync", fsync)  # the same os module: every fsync is seen
    state = tmp_path / "state"
    image = vm.disks[0].path

    qemu = vm.pid
    assert run(enable, vm.qmp_socket, state).state is State.ACTIVE
    assert [s for _o, s, _p in trace if _o == "enable"] == list(crashpoints.STEPS["enable"])
    assert {(o, p) for o, _s, p in trace} == {("enable", qemu)}
    assert ("migration-started", image) in fsyncs, fsyncs  # flushed before the pre-switchover pause
    overlay = run_record(state).disks[0].overlay_file
    vm.write_disk("d0", 1, seed="trace")
    trace.clear()
    fsyncs.clear()
    assert run(commit, vm.qmp_socket, state).state is State.COMMITTED
    assert [s for _o, s, _p in trace] == list(crashpoints.STEPS["commit"])
    assert {(o, p) for o, _s, p in trace} == {("commit", qemu)}
    # Flushed before the switch pause: the original (which just received the copy) and the overlay.
    assert {("job-ready", image), ("job-ready", overlay)} <= set(fsyncs), fsyncs

    trace.clear()
    run(enable, vm.qmp_socket, state)
    trace.clear()
    done = run(discard, vm.qmp_socket, state)
    assert done.state is State.DISCARDED
    assert done.memory_restored is True, done.error
    assert [s for _o, s, _p in trace] == list(crashpoints.STEPS["discard"])
    pids = {s: p for _o, s, p in trace}
    assert pids["stopping-qemu"] == qemu  # the old QEMU, still running
    assert pids["qemu-stopped"] is None  # no QEMU runs there: no QEMU cell at this point
    relaunched = vm.pid
    assert relaunched != qemu
    for step in ("qemu-launched", "memory-loaded", "resumed", "discarded"):
        assert pids[step] == relaunched, step
