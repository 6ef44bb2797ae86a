"""Block options survive a session (issue 12 item 5), on real QEMU (every installed build).

A legacy ``-drive`` the way Proxmox writes it (detect-zeroes=unmap, discard=unmap, cache=none,
aio=native, a throttle limit, on an iothread) and a ``-blockdev`` disk: the whole ``query-block``
and ``query-named-block-nodes`` view of each disk is the same before enable and after commit, and
before enable and after discard. QEMU itself resets ``detect-zeroes`` of such a drive when it is
snapshotted (a plain blockdev-snapshot + block-commit leaves ``detect_zeroes: off``); forgeqmp
gives the overlay the original's options and puts them back after the pivot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from forgeqmp.adapters import memhash
from forgeqmp.adapters.qmp import connect as qmp_connect
from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.errors import ForgeFailed
from forgeqmp.testing import DiskSpec

from .helpers import commit, discard, enable, run

pytestmark = pytest.mark.qemu

MIB = 1 << 20
LEGACY = DiskSpec(
    "virtio0",
    "qcow2",
    64,
    legacy_drive=True,
    drive_options="detect-zeroes=unmap,discard=unmap,cache=none,aio=native,"
    "throttling.iops-total=20000,throttling.bps-total=1000000000",
    device_options="iothread=io0",
)
MODERN = DiskSpec("disk1", "raw", 32)
IOTHREAD = ("-object", "iothread,id=io0")


async def _views(socket: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    async with qmp_connect(socket) as conn:
        return await conn.execute("query-block"), await conn.execute("query-named-block-nodes")


async def _iothread(socket: str, device: str) -> Any:
    async with qmp_connect(socket) as conn:
        return await conn.execute(
            "qom-get", {"path": f"/machine/peripheral/{device}", "property": "iothread"}
        )


def _clean(info: dict[str, Any], generated_names: bool) -> dict[str, Any]:
    """One node's or device's view minus what must change: the image's allocation info (the
    guest wrote), and node-names QEMU generates anew in every process (``#block123``: after a
    discard the relaunched QEMU picks others; nothing addresses a disk by them)."""
    info = dict(info)
    info.pop("image", None)
    if generated_names and str(info.get("node-name", "")).startswith("#"):
        info["node-name"] = "#generated"
    return info


def disk_view(socket: str, qdev: str, image: str, *, generated_names: bool = False) -> Any:
    """Everything QEMU shows of one disk: its query-block entry (device, throttling, cache,
    detect-zeroes, read-only...) and every named node on its image (format and file nodes)."""
    blocks, nodes = run(_views, socket)
    (entry,) = [dict(b) for b in blocks if b.get("qdev") == qdev]
    entry["inserted"] = _clean(entry["inserted"], generated_names)
    chain = sorted(
        (_clean(n, generated_names) for n in nodes if n.get("file") == image),
        key=lambda n: (n["drv"], str(n["node-name"])),
    )
    device = qdev.removeprefix("/machine/peripheral/").split("/")[0]
    return {"device": entry, "nodes": chain, "iothread": run(_iothread, socket, device)}


def _qdev(name: str) -> str:
    return f"/machine/peripheral/{name}/virtio-backend"


def _views_of(vm: Any, *, generated_names: bool = False) -> dict[str, Any]:
    return {
        d.name: disk_view(vm.qmp_socket, _qdev(d.name), d.path, generated_names=generated_names)
        for d in vm.disks
    }


def test_commit_keeps_every_block_option(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=[LEGACY, MODERN], extra_args=IOTHREAD)
    state = tmp_path / "state"
    before = _views_of(vm)
    legacy = before["virtio0"]["device"]["inserted"]
    # The drive really has what the test is about (else the comparison proves nothing).
    assert legacy["detect_zeroes"] == "unmap"
    assert legacy["cache"]["direct"] is True
    assert legacy["iops"] == 20000
    assert before["virtio0"]["device"]["device"] == "drive-virtio0"
    assert before["virtio0"]["iothread"] == "/objects/io0"

    record = run(enable, vm.qmp_socket, state, all_disks=True)
    (rec,) = [d for d in record.disks if d.name == "virtio0"]
    assert rec.overlay_file is not None
    # During the session the guest writes into the overlay, with the original's options.
    blocks, nodes = run(_views, vm.qmp_socket)
    (entry,) = [b for b in blocks if b.get("qdev") == _qdev("virtio0")]
    top = entry["inserted"]
    assert top["node-name"] == rec.overlay_node
    assert (top["detect_zeroes"], top["cache"], top["iops"], top["group"]) == (
        "unmap",
        legacy["cache"],
        20000,
        legacy["group"],
    )
    (file_node,) = [n for n in nodes if n["node-name"] == rec.overlay_file_node]
    assert file_node["cache"] == legacy["cache"]
    # detect-zeroes=unmap on the overlay: 16 MiB of zeros written by the guest allocate no data.
    vm.check(
        f"dd if=/dev/zero of={vm.device_of('virtio0')} bs=1M count=16 oflag=direct 2>/dev/null"
    )
    assert os.stat(rec.overlay_file).st_blocks * 512 < 4 * MIB
    vm.write_disk("disk1", 4, seed="session")

    record = run(commit, vm.qmp_socket, state)
    assert record.warnings == ()
    assert _views_of(vm) == before


def test_discard_keeps_every_block_option(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=[LEGACY, MODERN], extra_args=IOTHREAD)
    state = tmp_path / "state"
    before = _views_of(vm, generated_names=True)
    assert before["virtio0"]["device"]["inserted"]["detect_zeroes"] == "unmap"
    run(enable, vm.qmp_socket, state, all_disks=True)
    vm.write_disk("virtio0", 4, seed="session")
    record = run(discard, vm.qmp_socket, state)
    assert record.memory_restored is True
    assert _views_of(vm, generated_names=True) == before


def test_an_undone_enable_keeps_every_block_option(
    qemu_factory, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """An enable that fails after the snapshot commits the overlays back (the same pivot as a
    commit): the disks keep their options there too."""
    vm = qemu_factory(disks=[LEGACY, MODERN], extra_args=IOTHREAD)
    state = tmp_path / "state"
    before = _views_of(vm)

    def no_hash(*_args: object, **_kwargs: object) -> tuple[str, int]:
        raise OSError(5, "injected: the memory file cannot be read back")

    monkeypatch.setattr(memhash, "hash_reusing", no_hash)  # the digest enable computes
    with pytest.raises(ForgeFailed, match="injected"):
        run(enable, vm.qmp_socket, state, all_disks=True)
    saved = RecordStore(StateDir(state)).load()
    assert saved is not None
    assert saved.rolled_back is True
    assert saved.warnings == ()
    assert _views_of(vm) == before
