"""Enable undone *after* its snapshot transaction, on real QEMU (every build): the disks were
already switched to their overlays (the guest paused at pre-switchover) when the enable was
cancelled, or when the next step failed because another QMP client cancelled the memory save. Both
times the disks go back onto their originals, every node, job, fdset and file of the attempt is
removed, the guest runs again with its data, and a new enable succeeds.

The moment is exact: :func:`forgeqmp.adapters.crashpoints.reached` is replaced in this process by a hook
that acts at ``enable:snapshot-transaction-done`` (and checks the disks are on the overlays then).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import forgeqmp
from forgeqmp.adapters import crashpoints
from forgeqmp.adapters.qmp import connect as qmp_connect
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.core.states import State
from forgeqmp.testing import DiskSpec

from .helpers import block_graph, enable, run
from .test_enable import assert_undone, snapshot
from .test_failure_paths import in_thread, second_monitor

pytestmark = pytest.mark.qemu


def test_enable_is_undone_after_the_snapshot_transaction(  # type: ignore[no-untyped-def]
    qemu_factory, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    other, extra = second_monitor(tmp_path_factory.mktemp("mon"))
    vm = qemu_factory(
        disks=[DiskSpec("d0", "qcow2", 32), DiskSpec("d1", "raw", 32)],
        memory_mib=256,
        extra_args=extra,
    )
    data = {d: vm.write_disk(d, 2, seed=f"{d}-before") for d in ("d0", "d1")}
    hook: dict[str, Callable[[], Any]] = {}
    seen: list[list[str]] = []

    def reached(operation: str, step: str, qemu_pid: int | None = None) -> None:
        if (operation, step) == ("enable", "snapshot-transaction-done") and "act" in hook:
            # The transaction is done: the devices are on the overlays now, the guest paused.
            seen.append(in_thread(lambda: run(_attached_and_status, other)))
            hook.pop("act")()

    monkeypatch.setattr(crashpoints, "reached", reached)

    def fresh_state(name: str) -> tuple[Path, Any]:
        state = tmp_path_factory.mktemp(name) / "state"
        with InstanceLock(StateDir(state)):
            pass  # the state dir exists before, so that "nothing left" compares like with like
        return state, snapshot(vm, state)

    # 1. Cancelled by the caller right after the transaction.
    state, before = fresh_state("cancelled")

    async def cancelled() -> None:
        async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as instance:
            with anyio.CancelScope() as scope:
                hook["act"] = scope.cancel
                await instance.enable(all_disks=True)
            assert scope.cancelled_caught

    run(cancelled)
    assert_after_transaction(seen.pop())
    assert_undone(vm, state, before, "Cancelled")
    assert {d: vm.disk_md5(d, 2) for d in data} == data

    # 2. The next step fails: another client cancels the memory save right after the transaction.
    state, before = fresh_state("failed")

    def cancel_migration() -> None:
        in_thread(lambda: run(_migrate_cancel, other))

    hook["act"] = cancel_migration
    with pytest.raises((forgeqmp.ForgeError, BaseExceptionGroup)):
        run(enable, vm.qmp_socket, state, all_disks=True)
    assert_after_transaction(seen.pop())
    assert_undone(vm, state, before, "")
    assert {d: vm.disk_md5(d, 2) for d in data} == data

    # The instance is free again: a new enable reaches Active.
    state, _before = fresh_state("again")
    assert run(enable, vm.qmp_socket, state, all_disks=True).state is State.ACTIVE
    attached, _nodes = block_graph(vm.qmp_socket)
    assert [node[:2] for _q, node, _d in attached] == ["fq", "fq"]


def assert_after_transaction(seen: list[str]) -> None:
    """What the hook saw: both devices on overlays, the guest not running (held for the save)."""
    *nodes, runstate = seen
    assert nodes == ["fq", "fq"], seen
    assert runstate != "running", seen


async def _attached_and_status(socket: str) -> list[str]:
    async with qmp_connect(socket) as conn:
        blocks = await conn.execute("query-block")
        status = await conn.execute("query-status")
    nodes = sorted(b["inserted"]["node-name"][:2] for b in blocks if b.get("inserted"))
    return [*nodes, str(status["status"])]


async def _migrate_cancel(socket: str) -> None:
    async with qmp_connect(socket) as conn:
        await conn.execute("migrate_cancel")
