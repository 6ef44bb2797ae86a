"""The platform-style command lines of the harness (pure logic, no QEMU): what each profile writes,
and the libvirt-style launcher passing a fresh listening socket as the monitor fd."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import anyio
import pytest

from forgeqmp.adapters.launcher import LaunchSpec
from forgeqmp.testing import DiskSpec, QemuBuild, QemuInstance
from forgeqmp.testing.platforms import (
    libvirt_launcher,
    libvirt_style,
    proxmox_style,
)

BUILD = QemuBuild("10.0", "10.0.2", Path("/usr/bin/qemu-system-x86_64"), Path("/usr/bin/qemu-img"))


def values(argv: tuple[str, ...], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def test_proxmox_style_argv(tmp_path: Path) -> None:
    try:
        from forgeqmp.testing.platforms import find_ovmf, make_iso

        find_ovmf()
        make_iso(tmp_path / "probe.iso")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    disks = [DiskSpec("scsi0", "raw"), DiskSpec("virtio1"), DiskSpec("virtio2")]
    vm = QemuInstance(BUILD, tmp_path, disks, profile=proxmox_style)
    plan = proxmox_style.plan(vm, Path("/k"), Path("/i"))
    argv = plan.argv
    assert plan.daemonize
    assert not plan.pass_fds
    assert "-daemonize" in argv
    assert values(argv, "-pidfile") == [str(vm.pidfile)]
    assert values(argv, "-machine") == ["type=q35,accel=tcg"]
    drives = values(argv, "-drive")
    assert drives[0].startswith("if=pflash,unit=0,format=raw,readonly=on,file=")
    assert drives[1].startswith(f"if=pflash,unit=1,id=drive-efidisk0,format=raw,file={tmp_path}")
    assert (tmp_path / "efivars.fd").stat().st_size > 0
    assert (tmp_path / "cdrom.iso").read_bytes()[0x8001:0x8006] == b"CD001"
    assert any("id=drive-scsi0" in d and "if=none" in d for d in drives)
    devices = values(argv, "-device")
    assert any(d.startswith("scsi-hd,") and "bootindex=100" in d for d in devices)
    assert any(d.startswith("ide-cd,") and "drive=drive-ide2" in d for d in devices)
    for name in ("virtio1", "virtio2"):
        assert f"iothread,id=iothread-{name}" in values(argv, "-object")
        assert any(f"id={name}," in d and f"iothread=iothread-{name}" in d for d in devices)
    assert "org.qemu.guest_agent.0" in " ".join(devices)
    assert values(argv, "-netdev") == ["type=user,id=net0"]
    assert values(argv, "-vnc")[0].startswith("unix:")
    assert values(argv, "-append")[0].split()[1] == "forge.disks=2"  # the virtio-blk disks
    assert set(proxmox_style.files(vm)) >= {tmp_path / "efivars.fd", tmp_path / "cdrom.iso"}


def test_libvirt_style_argv_passes_a_listening_monitor(tmp_path: Path) -> None:
    disks = [DiskSpec("virtio-disk0"), DiskSpec("virtio-disk1", "raw")]
    vm = QemuInstance(BUILD, tmp_path, disks, profile=libvirt_style)
    plan = libvirt_style.plan(vm, Path("/k"), Path("/i"))
    try:
        argv = plan.argv
        assert plan.start_paused
        assert "-S" in argv
        assert {"-no-user-config", "-nodefaults"} <= set(argv)
        (fd,) = plan.pass_fds
        assert f"socket,id=charmonitor,fd={fd},server=on,wait=off" in values(argv, "-chardev")
        sock = socket.socket(fileno=os.dup(fd))
        with sock:
            assert sock.getsockname() == vm.qmp_socket
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        blockdevs = [json.loads(b) for b in values(argv, "-blockdev")]
        assert [b["node-name"] for b in blockdevs] == [
            "libvirt-1-storage", "libvirt-1-format", "libvirt-2-storage", "libvirt-2-format",
        ]  # fmt: skip
        devices = [json.loads(d) for d in values(argv, "-device")]
        disks_on = {d["id"]: d["drive"] for d in devices if d["driver"] == "virtio-blk-pci"}
        assert disks_on == {"virtio-disk0": "libvirt-1-format", "virtio-disk1": "libvirt-2-format"}
    finally:
        for fd in plan.pass_fds:
            os.close(fd)


# Stands in for QEMU: checks that the fd its charmonitor argument names is a listening unix
# socket at the QMP path, reports that, then answers one QMP client (greeting, capabilities).
_CHILD = """
import json, socket, sys
arg = [a for a in sys.argv if a.startswith("socket,id=charmonitor,fd=")][0]
fd = int(arg.split("fd=")[1].split(",")[0])
s = socket.socket(fileno=fd)
ok = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1 and s.getsockname() == sys.argv[1]
open(sys.argv[2], "w").write(f"{fd} {ok}")
s.settimeout(60)
conn, _ = s.accept()
greeting = {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""},
            "capabilities": []}}
conn.sendall(json.dumps(greeting).encode() + b"\\n")
buf, dec = "", json.JSONDecoder()
while chunk := conn.recv(4096):  # messages need not end in a newline: decode the stream
    buf += chunk.decode()
    while buf.strip():
        try:
            msg, end = dec.raw_decode(buf.lstrip())
        except ValueError:
            break
        buf = buf.lstrip()[end:]
        conn.sendall(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\\n")
"""


def test_libvirt_launcher_recreates_the_monitor_socket(tmp_path: Path) -> None:
    qmp = str(tmp_path / "qmp.sock")
    report = tmp_path / "report"
    (tmp_path / "qmp.sock").write_text("stale")  # a stale file at the path is replaced
    spec = LaunchSpec(
        argv=(sys.executable, "-c", _CHILD, qmp, str(report), "-chardev",
              "socket,id=charmonitor,fd=33,server=on,wait=off"),
        cwd=str(tmp_path),
        env=dict(os.environ),
        qmp_socket=qmp,
        incoming=True,
        log_file=str(tmp_path / "log"),
    )  # fmt: skip

    async def main() -> None:
        await libvirt_launcher(spec, timeout=60)

    anyio.run(main, backend="asyncio")  # returns once "QMP" answered on the path
    fd, ok = report.read_text().split()
    assert ok == "True", (tmp_path / "log").read_text()
    assert fd != "33"  # the launcher's own socket, its number written into the argv


def test_libvirt_launcher_needs_exactly_one_monitor_fd(tmp_path: Path) -> None:
    spec = LaunchSpec(
        argv=("qemu", "-qmp", "unix:x,server=on"),
        cwd=str(tmp_path),
        env={},
        qmp_socket=str(tmp_path / "qmp.sock"),
        incoming=False,
    )

    async def main() -> None:
        await libvirt_launcher(spec, timeout=1)

    with pytest.raises(ValueError, match="charmonitor"):
        anyio.run(main, backend="asyncio")
