"""forgeqmp on command lines written the way platforms write them (issue 12 item 8), on every
installed QEMU build: Proxmox-style (q35 + OVMF pflash, legacy ``-drive if=none`` on virtio-scsi
and on a virtio-blk with an iothread, an ISO in an ide-cd, ``-daemonize -pidfile``, QMP/VNC/agent
on unix sockets, user netdev) and libvirt-style (``-S`` then ``cont``, JSON ``-blockdev``
``libvirt-N-storage/format`` nodes, JSON ``-device``, the monitor an inherited fd).

Each checks that discard restores memory (the same boot goes on from its counter at enable) on
byte-identical base images (hashed on the host before enable and after discard), that the
relaunched QEMU has the same devices and media, pidfile and daemonization, and that commit leaves
every disk's block options as they were.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any

import pytest

import forgeqmp
from forgeqmp.adapters.launcher import LaunchSpec
from forgeqmp.adapters.process import is_alive
from forgeqmp.adapters.qmp import connect as qmp_connect
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.core.disks import Disk, select_disks
from forgeqmp.core.states import State
from forgeqmp.errors import PrerequisiteError
from forgeqmp.testing import DiskSpec, QemuInstance
from forgeqmp.testing.platforms import libvirt_launcher, libvirt_style, proxmox_style

from .helpers import files_under, run, sha256_of

pytestmark = pytest.mark.qemu

PROXMOX_DISKS = [DiskSpec("scsi0", "raw", 48), DiskSpec("virtio1", "qcow2", 64)]
LIBVIRT_DISKS = [DiskSpec("virtio-disk0", "qcow2", 64), DiskSpec("virtio-disk1", "raw", 48)]
MIB = 8

# --- what QEMU shows --------------------------------------------------------------------------

#: Keys of a query-block ``inserted`` / ``image`` that change with the data, not the options.
_VOLATILE_IMAGE = {"actual-size", "dirty-flag"}


def _options(entry: dict[str, Any]) -> dict[str, Any]:
    """One query-block entry as its options: everything but the data-dependent sizes and the
    node-names QEMU generates itself ("#blockNNN", new in every QEMU process)."""
    view = {k: v for k, v in entry.items() if k not in ("inserted", "io-status")}
    inserted = entry.get("inserted")
    if inserted:
        ins = dict(inserted)
        if str(ins.get("node-name", "")).startswith("#"):
            ins["node-name"] = "(generated)"
        ins["image"] = {k: v for k, v in ins["image"].items() if k not in _VOLATILE_IMAGE}
        view["inserted"] = ins
    return view


def _key(entry: dict[str, Any]) -> str:
    return str(entry.get("qdev") or entry.get("device"))


async def _observe(socket: str) -> dict[str, Any]:
    async with qmp_connect(socket) as conn:
        blocks = await conn.execute("query-block")
        peripherals = await conn.execute("qom-list", {"path": "/machine/peripheral"})
        iothreads = {}
        for p in peripherals:
            if p["type"].startswith("child<virtio-blk"):
                path = f"/machine/peripheral/{p['name']}"
                iothreads[p["name"]] = await conn.execute(
                    "qom-get", {"path": path, "property": "iothread"}
                )
        status = await conn.execute("query-status")
        return {
            "peer": conn.peer.pid,
            "blocks": {_key(b): _options(b) for b in blocks},
            "devices": sorted((p["name"], p["type"]) for p in peripherals),
            "iothreads": iothreads,
            "status": status["status"],
        }


def option_changes(before: dict[str, Any], after: dict[str, Any], path: str = "") -> list[str]:
    """Every option that differs between two views, as "device.key: old -> new"."""
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key, "(absent)"), after.get(key, "(absent)")
        where = f"{path}.{key}" if path else str(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += option_changes(old, new, where)
        elif old != new:
            changes.append(f"{where}: {old!r} -> {new!r}")
    return changes


def observe(vm: QemuInstance) -> dict[str, Any]:
    """The VM as QEMU shows it: block options per device, devices, iothreads, run state."""
    return run(_observe, vm.qmp_socket)


def daemonized(pid: int) -> bool:
    """QEMU runs in the background: not our child, in another session, stdin on /dev/null."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ppid, session = int(fields[1]), int(fields[3])
    return (
        ppid != os.getpid()
        and session != os.getsid(0)
        and os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    )


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


# --- the forge operations with an optional launcher ---------------------------------------------


def _connect_kwargs(launcher: Any) -> dict[str, Any]:
    """The launcher as the API takes it at connect (the launcher engineer's work, issue 12 item
    1), where connect() accepts one; operations get it as well (discard/recover take it now)."""
    if launcher is not None and "launcher" in inspect.signature(forgeqmp.connect).parameters:
        return {"launcher": launcher}
    return {}


async def _disks(vm: QemuInstance, state: Path) -> tuple[Disk, ...]:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as i:
        return await i.disks()


async def _enable(vm: QemuInstance, state: Path, launcher: Any, **kw: Any) -> Any:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state, **_connect_kwargs(launcher)) as i:
        return await i.enable(**kw)


async def _commit(vm: QemuInstance, state: Path, launcher: Any) -> Any:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state, **_connect_kwargs(launcher)) as i:
        return await i.commit()


async def _discard(vm: QemuInstance, state: Path, launcher: Any) -> Any:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state, **_connect_kwargs(launcher)) as i:
        return await i.discard(**({"launcher": launcher} if launcher is not None else {}))


# --- the cycles -------------------------------------------------------------------------------


def discard_cycle(
    vm: QemuInstance, state: Path, names: list[str], launcher: Any = None
) -> tuple[dict[str, Any], dict[str, Any], forgeqmp.SessionRecord]:
    """Write A, hash the bases, enable the named disks, write B, discard: checks memory and
    disks came back; returns QEMU's view before enable and after discard, and the record."""
    sums = {d: vm.write_disk(d, MIB, seed=f"{d}A") for d in names}
    for d in names:  # a guest fsync: QEMU writes the image's metadata out (sync(1) does not)
        vm.check(f"sync -d {vm.device_of(d)}")
    before = observe(vm)
    bases = {vm_disk.name: vm_disk.path for vm_disk in vm.disks if vm_disk.name in names}
    hashes = {d: sha256_of(p) for d, p in bases.items()}
    at_enable = vm.wait_counter()

    record = run(_enable, vm, state, launcher, disks=names)
    assert record.state is State.ACTIVE
    assert sorted(d.name for d in record.disks) == sorted(names)
    assert {d.name: d.base_file for d in record.disks} == bases
    assert record.qemu.pid == before["peer"] == vm.pid

    for d in names:
        assert vm.write_disk(d, MIB, seed=f"{d}B") != sums[d]
    latest = vm.wait_counter(min_value=at_enable[1] + 10)

    asked = time.monotonic()
    done = run(_discard, vm, state, launcher)
    assert done.state is State.DISCARDED, done.error
    assert done.memory_restored is True, done.error
    _last, resumed = vm.wait_counter_rewind(since=asked)
    assert resumed[0] == at_enable[0]  # the same boot...
    assert at_enable[1] <= resumed[1] < latest[1]  # ...from its counter at enable
    assert {d: sha256_of(p) for d, p in bases.items()} == hashes
    for d in names:
        assert vm.disk_md5(d, MIB) == sums[d]
    for disk in record.disks:
        assert disk.overlay_file is not None
        assert not os.path.exists(disk.overlay_file)
    return before, observe(vm), record


def check_relaunched(
    vm: QemuInstance, before: dict[str, Any], after: dict[str, Any], *, daemon: bool
) -> None:
    """The relaunched QEMU: a new process named by the pidfile, daemonized like the first one
    (or not), running, with the same devices, iothreads, media and block options."""
    assert after["status"] == "running"
    new_pid = int(vm.pidfile.read_text())
    assert new_pid == after["peer"] != before["peer"]
    assert not is_alive(before["peer"])  # (a zombie when it was the harness's own child)
    assert daemonized(new_pid) is daemon
    assert ("-daemonize" in cmdline(new_pid)) is daemon
    assert after["devices"] == before["devices"]
    assert after["iothreads"] == before["iothreads"]
    changes = option_changes(before["blocks"], after["blocks"])
    assert not changes, changes


def commit_cycle(vm: QemuInstance, state: Path, names: list[str], launcher: Any = None) -> None:
    """Enable, write, commit: the writes are on the bases and every block option is as before."""
    before = observe(vm)
    run(_enable, vm, state, launcher, disks=names)
    sums = {d: vm.write_disk(d, MIB, seed=f"{d}C", offset_mib=MIB) for d in names}
    done = run(_commit, vm, state, launcher)
    assert done.state is State.COMMITTED, done.error
    after = observe(vm)
    assert after["status"] == "running"
    assert after["devices"] == before["devices"]
    assert after["iothreads"] == before["iothreads"]
    for d in names:
        assert vm.disk_md5(d, MIB, offset_mib=MIB) == sums[d]
    changes = option_changes(before["blocks"], after["blocks"])
    assert not changes, changes


# --- Proxmox-style ----------------------------------------------------------------------------


def proxmox_vm(qemu_factory: Any) -> QemuInstance:
    vm: QemuInstance = qemu_factory(disks=PROXMOX_DISKS, profile=proxmox_style)
    return vm


def test_proxmox_style_guest_as_started(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The harness really starts what it claims: daemonized, OVMF pflash, ISO, iothread."""
    vm = proxmox_vm(qemu_factory)
    seen = observe(vm)
    assert daemonized(vm.pid)
    assert seen["peer"] == vm.pid
    blocks = seen["blocks"]
    assert blocks["ide2"]["removable"] is True
    assert blocks["ide2"]["inserted"]["file"].endswith("cdrom.iso")
    assert blocks["ide2"]["tray_open"] is False
    assert blocks["scsi0"]["inserted"]["detect_zeroes"] == "on"
    assert blocks["/machine/peripheral/virtio1/virtio-backend"]["inserted"]["detect_zeroes"] == (
        "unmap"
    )
    pflash = [b for b in blocks.values() if b.get("device") == "drive-efidisk0"]
    assert len(pflash) == 1
    assert pflash[0]["inserted"]["ro"] is False
    assert seen["iothreads"] == {"virtio1": "/objects/iothread-virtio1"}
    assert vm.device_of("scsi0").startswith("/dev/sd")
    assert vm.device_of("virtio1").startswith("/dev/vd")
    # What enable chooses from: the primary disk by bootindex is scsi0 (100; the CD is 101),
    # and the CD-ROM is never forgeable.
    disks = {d.name: d for d in run(_disks, vm, tmp_path / "state")}
    assert select_disks(list(disks.values())).forged == (disks["scsi0"],)
    assert disks["scsi0"].bootindex == 100
    assert disks["ide2"].unforgeable_reason is not None
    assert {"scsi0", "virtio1"} <= {
        d.name for d in select_disks(list(disks.values()), all_disks=True).forged
    }
    pid = vm.pid
    vm.cleanup()  # the daemonized QEMU is stopped and every file the profile made is removed
    assert not is_alive(pid)
    assert not vm.workdir.exists()


def test_proxmox_style_discard(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = proxmox_vm(qemu_factory)
    before, after, record = discard_cycle(vm, tmp_path / "state", ["scsi0", "virtio1"])
    check_relaunched(vm, before, after, daemon=True)
    assert after["blocks"]["ide2"]["inserted"]["file"].endswith("cdrom.iso")
    assert len(record.unforged_disks) == 1  # the UEFI vars store, writable, left out


def test_proxmox_style_disk_names_are_stable(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = proxmox_vm(qemu_factory)
    record = run(_enable, vm, tmp_path / "state", None, disks=["scsi0", "virtio1"])
    try:
        assert len(record.unforged_disks) == 1
        assert not record.unforged_disks[0].startswith("#"), record.unforged_disks
    finally:
        run(_discard, vm, tmp_path / "state", None)


def test_proxmox_style_commit_keeps_options(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = proxmox_vm(qemu_factory)
    commit_cycle(vm, tmp_path / "state", ["scsi0", "virtio1"])


# --- libvirt-style ----------------------------------------------------------------------------


def libvirt_vm(qemu_factory: Any) -> QemuInstance:
    vm: QemuInstance = qemu_factory(disks=LIBVIRT_DISKS, profile=libvirt_style)
    return vm


def test_libvirt_style_guest_as_started(qemu_factory) -> None:  # type: ignore[no-untyped-def]
    vm = libvirt_vm(qemu_factory)
    seen = observe(vm)
    assert seen["status"] == "running"  # started with -S, the harness sent cont
    argv = cmdline(vm.pid)
    assert "-S" in argv
    assert any(a.startswith("socket,id=charmonitor,fd=") for a in argv)
    assert seen["peer"] == vm.pid  # QEMU listen()s on the inherited socket again: its creds
    nodes = {k: b["inserted"]["node-name"] for k, b in seen["blocks"].items()}
    assert nodes == {
        "/machine/peripheral/virtio-disk0/virtio-backend": "libvirt-1-format",
        "/machine/peripheral/virtio-disk1/virtio-backend": "libvirt-2-format",
    }
    pid = vm.pid
    vm.cleanup()
    assert not is_alive(pid)
    assert not vm.workdir.exists()


def test_libvirt_style_enable_refused_without_launcher(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = libvirt_vm(qemu_factory)
    state = tmp_path / "state"
    with InstanceLock(StateDir(state)):
        pass
    before = observe(vm)
    files = {p: os.lstat(p).st_mode for p in files_under(vm.workdir, state)}
    try:
        with pytest.raises(PrerequisiteError, match="fd=") as caught:
            run(_enable, vm, state, None, all_disks=True)
        assert "launcher" in str(caught.value)
    finally:
        if os.path.exists(state / "session.json"):
            run(_discard, vm, state, libvirt_launcher)  # enable was not refused: undo it
    after = observe(vm)
    assert after == before  # the same QEMU, running, the same block graph and options
    assert {p: os.lstat(p).st_mode for p in files_under(vm.workdir, state)} == files


def test_libvirt_style_discard_and_commit_with_launcher(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = libvirt_vm(qemu_factory)
    launched: list[LaunchSpec] = []

    async def launcher(spec: LaunchSpec) -> None:
        launched.append(spec)
        await libvirt_launcher(spec)

    names = ["virtio-disk0", "virtio-disk1"]
    before, after, _record = discard_cycle(vm, tmp_path / "state", names, launcher)
    assert [s.incoming for s in launched] == [True]
    check_relaunched(vm, before, after, daemon=False)
    assert any(a.startswith("socket,id=charmonitor,fd=") for a in cmdline(vm.pid))
    # A second session on the relaunched QEMU, committed this time.
    commit_cycle(vm, tmp_path / "state2", names, launcher)
    assert len(launched) == 1
