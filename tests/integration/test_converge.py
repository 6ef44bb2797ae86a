"""Commit finishes although the guest outwrites the copy (issue 14), on every installed build.

No fast writer is needed: the test-only hook ``FORGEQMP_TEST_COMMIT_SPEED`` (with the crash
points' opt-in) starts the commit job at 2 MiB/s, below what the guest's rewrite loop dirties
(QEMU's job then copies in bursts and rests until its average is back at the speed; the guest
writes while it rests, so the job is never clean at an instant it looks).
Without the write bound the job never becomes ready and the commit ends at its deadline; with it
the commit finishes, the data is merged, and the platform's own throttle is exactly as before.
A controller killed at each step of the bound leaves a session that recover finishes, with the
platform's throttle back.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import pytest

import forgeqmp
from forgeqmp.adapters.crashpoints import CONDITIONAL_STEPS, ENABLE_ENV, ENV, SPEED_ENV
from forgeqmp.core.plans.common import QUERY_BLOCK
from forgeqmp.core.plans.converge import HARD_WRITE_BPS, HARD_WRITE_IOPS
from forgeqmp.core.states import State
from forgeqmp.errors import ForgeFailed
from forgeqmp.ops import converge
from forgeqmp.testing import DiskSpec, QemuInstance

from .helpers import block_graph, commit, commit_killed_at, enable, qmp, run

pytestmark = pytest.mark.qemu

MIB = 1 << 20
#: The region the guest rewrites without pause during the commit.
REWRITE_MIB = 4
#: The commit job's copy speed (bytes/s): well below the guest's rewrite rate.
SPEED = 2 * MIB
#: The platform's own throttle on the disk: forgeqmp must set exactly this back.
PLATFORM = {"bps": 0, "bps_rd": 50 * MIB, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 5000}
THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "group")


def throttle_of(vm: QemuInstance) -> dict[str, Any]:
    blocks = run(qmp, vm.qmp_socket, "query-block")
    inserted = next(b["inserted"] for b in blocks if b.get("qdev", "").split("/")[-2:-1] == ["d0"])
    return {k: inserted.get(k) for k in THROTTLE_KEYS}


def set_platform_throttle(vm: QemuInstance) -> dict[str, Any]:
    blocks = run(qmp, vm.qmp_socket, "query-block")
    qdev = next(b["qdev"] for b in blocks if b.get("qdev", "").split("/")[-2:-1] == ["d0"])
    run(qmp, vm.qmp_socket, "block_set_io_throttle", {"id": qdev, **PLATFORM, "group": "plat"})
    before = throttle_of(vm)
    assert before["iops_wr"] == 5000, before
    assert before["group"] == "plat", before
    return before


def start_writer(vm: QemuInstance) -> None:
    """A guest loop rewriting the disk's first REWRITE_MIB MiB with direct I/O, until stopped."""
    dev = vm.device_of("d0")
    vm.check(f"dd if=/dev/urandom of=/dev/shm/blk bs=1M count={REWRITE_MIB} 2>/dev/null")
    vm.check(
        f"(while :; do dd if=/dev/shm/blk of={dev} bs=256k count={REWRITE_MIB * 4} oflag=direct "
        "2>/dev/null; done) >/dev/null 2>&1 & echo $! > /tmp/writer.pid"
    )


def stop_writer(vm: QemuInstance) -> None:
    vm.check("kill $(cat /tmp/writer.pid); wait 2>/dev/null; sync; true")


def merged_ok(vm: QemuInstance) -> None:
    """The guest's view of the rewritten region is what the original image holds (raw: read on
    the host), and the device is on its original again."""
    guest = vm.disk_md5("d0", REWRITE_MIB)
    with open(vm.disks[0].path, "rb") as f:
        host = hashlib.md5(f.read(REWRITE_MIB * MIB), usedforsecurity=False).hexdigest()
    assert guest == host
    _attached, nodes = block_graph(vm.qmp_socket)
    assert not [n for n in nodes if n.startswith("fq")], nodes


@pytest.fixture
def slow_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENABLE_ENV, "1")
    monkeypatch.setenv(SPEED_ENV, str(SPEED))
    monkeypatch.delenv(ENV, raising=False)


def test_commit_finishes_when_the_guest_outwrites_the_copy(
    qemu_factory, slow_copy, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    vm: QemuInstance = qemu_factory(disks=[DiskSpec("d0", "raw", 64)], memory_mib=256)
    state = tmp_path / "state"
    before = set_platform_throttle(vm)
    run(enable, vm.qmp_socket, state)
    start_writer(vm)
    try:
        real_watch = converge.WriteBound.watch
        real_apply = converge.WriteBound.apply
        bounded: list[dict[str, Any]] = []

        async def no_bound(self: Any, *_args: Any) -> None:
            import anyio

            await anyio.sleep_forever()

        async def apply(self: Any, disk: Any, bound: tuple[int, int]) -> None:
            await real_apply(self, disk, bound)
            blocks = await self.ctx.send(QUERY_BLOCK)
            inserted = next(b["inserted"] for b in blocks if b.get("qdev") == disk.qdev)
            bounded.append({k: inserted.get(k) for k in THROTTLE_KEYS})

        caplog.set_level(logging.INFO, logger="forgeqmp.commit_driver")
        # The job becomes ready only at an instant when nothing is dirty: the guest's writer
        # (a dd after dd in a loop, slower on a busy host) may leave it one by chance. Such a
        # try says nothing either way, so the session is forged again and tried again.
        for attempt in range(3):
            if attempt:
                run(enable, vm.qmp_socket, state)
            # Without the bound (the commit as it was): the job never becomes ready, and the
            # commit stops at its deadline, leaving its job running in QEMU.
            monkeypatch.setattr(converge.WriteBound, "watch", no_bound)
            try:
                run(commit, vm.qmp_socket, state, timeout=15)
            except ForgeFailed as exc:
                stopped = str(exc)
            else:
                continue  # ready by chance, without the bound
            assert "deadline" in stopped, stopped
            record = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
            assert record is not None
            assert record.state is State.FAILED
            assert record.disks[0].commit_job is not None  # left running, still not ready
            assert throttle_of(vm) == before

            # With it: the same job (reattached) becomes ready under the bound, and the
            # commit ends.
            monkeypatch.setattr(converge.WriteBound, "watch", real_watch)
            monkeypatch.setattr(converge.WriteBound, "apply", apply)
            bounded.clear()
            committed = run(commit, vm.qmp_socket, state, timeout=90)
            monkeypatch.setattr(converge.WriteBound, "apply", real_apply)
            assert committed.state is State.COMMITTED
            if bounded:
                break
        else:
            pytest.fail(
                "in 3 tries the job became ready without the bound (the guest did not outwrite "
                "the slowed copy): the test tested nothing"
            )
        # Bounded hard at once (not from a copy rate that is the guest's own while it keeps
        # pace), each later bound tighter still: the job became ready under them.
        assert 0 < bounded[0]["bps_wr"] <= HARD_WRITE_BPS, bounded
        assert 0 < bounded[0]["iops_wr"] <= HARD_WRITE_IOPS, bounded
        assert all(b["bps_wr"] < a["bps_wr"] for a, b in itertools.pairwise(bounded)), bounded
        assert bounded[0]["group"] != "plat", bounded
        assert bounded[0]["bps_rd"] == PLATFORM["bps_rd"]  # reads keep the platform's limit
        assert "does not converge" in caplog.text
        assert committed.disks[0].throttle is None
        assert throttle_of(vm) == before  # exactly the platform's throttle again
        assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"
    finally:
        stop_writer(vm)
    merged_ok(vm)


@pytest.mark.parametrize("step", CONDITIONAL_STEPS["commit"])
def test_a_commit_killed_while_bounding_is_recovered(
    qemu_factory, slow_copy, tmp_path: Path, step: str
) -> None:  # type: ignore[no-untyped-def]
    vm: QemuInstance = qemu_factory(disks=[DiskSpec("d0", "raw", 64)], memory_mib=256)
    state = tmp_path / "state"
    before = set_platform_throttle(vm)
    run(enable, vm.qmp_socket, state)
    start_writer(vm)
    try:
        commit_killed_at(vm.qmp_socket, state, step, os.environ, timeout=120)
        record = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
        assert record is not None
        assert record.disks[0].throttle is not None
        if step == "throttle-applied":
            assert throttle_of(vm)["group"] != "plat"  # the bound is on, as the kill left it

        async def recover() -> forgeqmp.SessionRecord | None:
            async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as inst:
                return await inst.recover(timeout=120)

        recovered = run(recover)
        assert recovered is not None
        assert recovered.state is State.COMMITTED, recovered
        assert recovered.disks[0].throttle is None
        assert throttle_of(vm) == before
        assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"
    finally:
        stop_writer(vm)
    merged_ok(vm)
