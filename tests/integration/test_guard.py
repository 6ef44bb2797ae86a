"""The guard on real QEMU (every installed build): while a session is active,
``Instance.execute_guarded`` refuses each mapped command that applies to the VM and nothing in
QEMU changes; once the session is committed the same commands pass the guard (the harmless ones
are really run). One enable per build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import forgeqmp
from forgeqmp.cli import main
from forgeqmp.core.guard import check_qmp_command
from forgeqmp.core.states import State
from forgeqmp.errors import OperationBlocked, QMPCommandError

from .helpers import run

pytestmark = pytest.mark.qemu

#: A NIC without a backend (nothing leaves the VM) and without a boot ROM, for set_link.
NIC = ("-device", "virtio-net-pci,id=nic0,romfile=")


def refused_commands(record: forgeqmp.SessionRecord, tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    """One call per mapped command that applies to this VM, each naming the forged disk."""
    disk = record.disks[0]
    assert disk.overlay_node is not None
    assert disk.overlay_file_node is not None
    size = disk.virtual_size
    return [
        ("block_resize", {"node-name": disk.overlay_node, "size": size}),
        ("block_resize", {"node-name": disk.device_node, "size": size}),
        # Not in the record: recognised in QEMU's graph by its file, the original image.
        ("block_resize", {"node-name": f"{disk.name}-file", "size": size}),
        ("blockdev-del", {"node-name": disk.overlay_node}),
        ("blockdev-del", {"node-name": disk.overlay_file_node}),
        ("device_del", {"id": disk.name}),
        ("blockdev-add", {"driver": "raw", "node-name": "peek", "file": disk.device_node}),
        (
            "blockdev-snapshot-sync",
            {"node-name": disk.overlay_node, "snapshot-file": str(tmp / "s.qcow2")},
        ),
        (
            "blockdev-backup",
            {"job-id": "b", "device": disk.overlay_node, "target": "x", "sync": "full"},
        ),
        ("drive-backup", {"device": disk.device_node, "target": str(tmp / "b"), "sync": "full"}),
        ("drive-mirror", {"device": disk.overlay_node, "target": str(tmp / "m"), "sync": "full"}),
        ("block-stream", {"device": disk.overlay_node}),
        ("block-commit", {"device": disk.overlay_node}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": disk.overlay_node}),
        ("eject", {"id": disk.name}),
        ("set_link", {"name": "nic0", "up": False}),
        ("migrate", {"uri": "exec:cat >/dev/null"}),
        ("snapshot-save", {"job-id": "s", "tag": "t", "vmstate": disk.overlay_node, "devices": []}),
        (
            "transaction",
            {
                "actions": [
                    {
                        "type": "blockdev-snapshot-sync",
                        "data": {
                            "node-name": disk.overlay_node,
                            "snapshot-file": str(tmp / "t.qcow2"),
                        },
                    }
                ]
            },
        ),
        ("human-monitor-command", {"command-line": "savevm before"}),
        ("human-monitor-command", {"command-line": f"block_resize {disk.overlay_node} 1G"}),
    ]


async def observe(vm: forgeqmp.Instance) -> dict[str, Any]:
    """What a refused command could have changed: the block graph, jobs, migration, runstate."""
    conn = vm.conn
    blocks = await conn.execute("query-block")
    nodes = await conn.execute("query-named-block-nodes", {"flat": True})
    return {
        "attached": sorted(
            (b["qdev"], b["inserted"]["node-name"], b["inserted"]["image"]["virtual-size"])
            for b in blocks
            if b.get("inserted")
        ),
        "nodes": sorted(n["node-name"] for n in nodes),
        "jobs": await conn.execute("query-jobs"),
        "migration": (await conn.execute("query-migrate")).get("status"),
        "runstate": await vm.runstate(),
        "exports": await conn.execute("query-block-exports"),
    }


def test_execute_guarded_refuses_during_a_session_and_allows_after(  # type: ignore[no-untyped-def]
    qemu_factory, tmp_path: Path
) -> None:
    vm = qemu_factory(memory_mib=256, extra_args=NIC)
    state = tmp_path / "state"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(state)]

    async def during() -> forgeqmp.SessionRecord:
        async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as inst:
            # No session yet: guarded commands go through.
            await inst.execute_guarded("set_link", {"name": "nic0", "up": True})
            record = await inst.enable()
            assert record.state is State.ACTIVE
            before = await observe(inst)
            for command, arguments in refused_commands(record, scratch):
                with pytest.raises(OperationBlocked) as info:
                    await inst.execute_guarded(command, arguments)
                message = str(info.value)
                assert record.session_id in message, message
                assert "is active" in message
                assert "'forgeqmp commit'" in message
                assert info.value.exit_code == 3
            assert await observe(inst) == before
            assert list(scratch.iterdir()) == []
            # Power and queries are never refused; quit is allowed while Active (pure check).
            assert (await inst.execute_guarded("query-status"))["status"] == "running"
            await inst.execute_guarded("stop")
            await inst.execute_guarded("cont")
            check_qmp_command(record, "quit")
            with pytest.raises(OperationBlocked):
                inst.check("disk-resize")
            assert inst.check("console") is not None
            return record

    record = run(during)
    assert main([*base, "check", "backup"]) == 3
    assert main([*base, "check", "restart"]) == 0

    async def after() -> None:
        async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as inst:
            committed = await inst.commit()
            assert committed.state is State.COMMITTED
            disk = committed.disks[0]
            nodes = await inst.conn.execute("query-named-block-nodes", {"flat": True})
            # Every command refused before passes the guard now.
            for command, arguments in refused_commands(record, scratch):
                check_qmp_command(committed, command, arguments, block_nodes=nodes)
            # The harmless ones really run: a resize to the current size, a link toggle.
            await inst.execute_guarded(
                "block_resize", {"node-name": disk.device_node, "size": disk.virtual_size}
            )
            await inst.execute_guarded("set_link", {"name": "nic0", "up": False})
            await inst.execute_guarded("set_link", {"name": "nic0", "up": True})
            # The guard lets this through; QEMU itself refuses (the overlay node is gone).
            with pytest.raises(QMPCommandError):
                await inst.execute_guarded(
                    "blockdev-del", {"node-name": record.disks[0].overlay_node}
                )
            inst.check("disk-resize")

    run(after)
    assert main([*base, "check", "backup"]) == 0
