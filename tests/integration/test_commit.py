"""Commit on real QEMU (every installed build): hundreds of MiB per disk merged live, in parallel,
with per-disk progress, the guest never stopping, and a timed-out commit finished later."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import forgeqmp
from forgeqmp.adapters.crashpoints import ENABLE_ENV, SPEED_ENV
from forgeqmp.core.lifecycle import status_of
from forgeqmp.core.states import State
from forgeqmp.errors import ForgeFailed, NoSession
from forgeqmp.testing import DiskSpec
from forgeqmp.testing.guest import pattern_md5

from .helpers import block_graph, commit, discard, enable, files_under, run

pytestmark = pytest.mark.qemu

MIB = 1 << 20
WRITE_MIB = 200


def host_md5(vm: Any, disk: Any, offset_mib: int, mib: int, scratch: Path) -> str:
    """md5 of a region of a disk image as the guest sees it, read on the host (QEMU stopped)."""
    path = disk.path
    if disk.format == "qcow2":
        path = str(scratch / f"{disk.name}.raw")
        subprocess.run(
            [vm.build.img, "convert", "-f", "qcow2", "-O", "raw", disk.path, path], check=True
        )
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        f.seek(offset_mib * MIB)
        digest.update(f.read(mib * MIB))
    return digest.hexdigest()


def test_commit_merges_every_write_live(qemu_factory, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The copy is held to 128 MiB/s (the test-only speed hook), so that it lasts over a second
    # whatever the machine: unlimited, a fast or idle host merged 200 MiB between two lines of
    # the guest's counter, and "the guest ran while the data was merged" had nothing to see.
    monkeypatch.setenv(ENABLE_ENV, "1")
    monkeypatch.setenv(SPEED_ENV, str(128 * MIB))
    disks = [DiskSpec("d0", "qcow2", WRITE_MIB + 64), DiskSpec("d1", "raw", WRITE_MIB + 64)]
    vm = qemu_factory(disks=disks)
    state = tmp_path / "state"
    with pytest.raises(NoSession) as info:
        run(commit, vm.qmp_socket, state)
    assert info.value.exit_code == 3

    record = run(enable, vm.qmp_socket, state, all_disks=True)
    for d in ("d0", "d1"):
        vm.write_disk(d, WRITE_MIB, seed=f"{d}a")

    # The guest keeps writing while the commit runs: those writes must land in the originals too.
    during = threading.Thread(
        target=vm.write_disk, args=("d0", 16), kwargs={"seed": "late", "offset_mib": WRITE_MIB}
    )
    progress: list[forgeqmp.ProgressEvent] = []
    merged_at: dict[str, float] = {}

    def on_progress(event: forgeqmp.ProgressEvent) -> None:
        progress.append(event)
        if event.step == "disk-merged":
            merged_at[event.detail["disk"]] = time.monotonic()

    boot = vm.boot_ids()[-1]
    started_at = time.monotonic()
    during.start()
    try:
        committed = run(commit, vm.qmp_socket, state, on_progress=on_progress)
    finally:
        during.join(600)
    assert committed.state is State.COMMITTED
    assert committed.finished_at is not None

    # Progress per disk, monotonic, with an ETA, its last event reaching its total (also when
    # the disk got there between two polls) before the disk is merged.
    for d in ("d0", "d1"):
        events = [e.detail for e in progress if e.step == "progress" and e.detail["disk"] == d]
        done = [e["done"] for e in events]
        assert done, f"no progress event for {d}"
        assert done == sorted(done)
        assert all("eta_s" in e for e in events), events
        assert all(e["eta_s"] is None or e["eta_s"] >= 0 for e in events), events
        assert events[-1]["done"] == events[-1]["total"] > 0, events[-1]
        assert events[-1]["eta_s"] == 0.0
        steps = [e.step for e in progress if e.detail.get("disk") == d]
        assert steps[-2:] == ["progress", "disk-merged"], steps

    # Live: the guest ran while the data was merged, paused only for each disk's switch back to
    # its original (QEMU's STOP→RESUME, reported per disk; how long is measured by nox -s bench).
    pauses = {e.detail["disk"]: e.detail["pause_ms"] for e in progress if e.step == "disk-merged"}
    assert set(pauses) == {"d0", "d1"}
    assert all(isinstance(p, float) and p >= 0 for p in pauses.values()), pauses
    first_switch = min(merged_at[d] - pauses[d] / 1000 for d in pauses)
    running = [
        n for t, b, n in vm.counter_history() if b == boot and started_at <= t < first_switch
    ]
    assert len(running) >= 2, "the guest's counter did not advance while the commit copied data"
    assert running == sorted(running)

    # Nothing of the forge is left in the graph or on disk.
    attached, nodes = block_graph(vm.qmp_socket)
    assert [node for _q, node, _d in attached] == ["d0-fmt", "d1-fmt"]
    assert not [n for n in nodes if n.startswith("fq")]
    for disk in record.disks:
        assert disk.overlay_file is not None
        assert not os.path.exists(disk.overlay_file)
    assert record.memory is not None
    assert not os.path.exists(record.memory.path)

    # After QEMU exits, the originals hold exactly the guest's data.
    vm.stop()
    for spec in vm.disks:
        assert host_md5(vm, spec, 0, WRITE_MIB, tmp_path) == pattern_md5(
            f"{spec.name}a", 0, WRITE_MIB
        )
    d0 = next(d for d in vm.disks if d.name == "d0")
    assert host_md5(vm, d0, WRITE_MIB, 16, tmp_path) == pattern_md5("late", WRITE_MIB, 16)


def test_timed_out_commit_is_finished_by_the_next(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=[DiskSpec("d0", "qcow2", 128), DiskSpec("d1", "raw", 128)])
    state = tmp_path / "state"
    run(enable, vm.qmp_socket, state, all_disks=True)
    sums = {d: vm.write_disk(d, 64, seed=f"{d}t") for d in ("d0", "d1")}

    with pytest.raises(ForgeFailed) as info:
        run(commit, vm.qmp_socket, state, timeout=0.01)
    assert info.value.exit_code == 4
    failed = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    assert failed is not None
    assert failed.state is State.FAILED
    assert failed.failure_phase is State.COMMITTING
    pending = [d.name for d in failed.disks if d.overlay_node is not None]
    assert pending  # a 10 ms deadline cannot merge 128 MiB
    # The record says which disks are left, by name (not only that some are), and how to finish.
    assert all(name in (failed.error or "") for name in pending), failed.error
    assert status_of(failed).can_commit
    assert "forgeqmp commit" in (failed.next_step or "")
    # Once a commit started writing into an original, discard would mix old memory with new disks.
    if any(d.merged for d in failed.disks):
        with pytest.raises(NoSession, match="commit"):
            run(discard, vm.qmp_socket, state)
    assert run(commit, vm.qmp_socket, state).state is State.COMMITTED
    for d, expected in sums.items():
        assert vm.disk_md5(d, 64) == expected
    assert not [n for n in block_graph(vm.qmp_socket)[1] if n.startswith("fq")]
    assert files_under(state) & {f for f in files_under(state) if "memory-" in f} == set()
