"""The test guest started with a command line written the way hosting platforms write theirs.

forgeqmp must work on the QEMU command lines platforms really run, not only on the harness's own.
A *platform profile* gives :class:`~forgeqmp.testing.QemuInstance` (``profile=``) the argv to start
the test guest with, keeping what the harness needs (the two serial ports on unix sockets, a
pidfile, the QMP socket at ``instance.qmp_socket``):

- :data:`proxmox_style`: what Proxmox VE's ``qm`` starts: ``-machine type=q35,accel=tcg``, UEFI
  (OVMF code read-only on pflash 0, a writable copy of the vars on pflash 1 as
  ``drive-efidisk0``), legacy ``-drive if=none,id=drive-NAME`` disks (the first on a virtio-scsi
  ``scsi-hd`` with a bootindex, the others on ``virtio-blk-pci`` each on its own iothread), an ISO
  in an ``ide-cd``, ``-daemonize -pidfile``, QMP and VNC on unix sockets, a guest-agent channel and
  a user netdev. The kernel is loaded by OVMF through fw_cfg (``-kernel`` of the bzImage: OVMF
  boots it through its EFI stub; the harness's PVH ELF needs no firmware and OVMF cannot load it).
- :data:`libvirt_style`: what libvirt starts: ``-S`` (the harness sends ``cont`` over QMP, as
  libvirt does once it has configured the VM), ``-no-user-config -nodefaults``, JSON ``-blockdev``
  protocol and format nodes named ``libvirt-N-storage`` / ``libvirt-N-format``, JSON ``-device``,
  and the QMP monitor passed as an inherited fd (``-chardev socket,id=charmonitor,fd=N,server=on,
  wait=off``): the harness creates the listening socket at ``instance.qmp_socket`` and passes it.

A relaunch of an inherited-fd command line needs the fd again: :func:`libvirt_launcher` is a
forgeqmp launcher (see :mod:`forgeqmp.adapters.launcher`) that recreates the listening socket at the QMP
path and starts the argv with it, the way libvirt would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from forgeqmp.testing.guest import GUEST_MODULES
from forgeqmp.testing.setup import setup_command

if TYPE_CHECKING:
    from forgeqmp.adapters.launcher import LaunchSpec
    from forgeqmp.testing.instance import QemuInstance

__all__ = [
    "SCSI_GUEST_MODULES",
    "LaunchPlan",
    "LibvirtStyle",
    "PlatformProfile",
    "ProxmoxStyle",
    "find_ovmf",
    "libvirt_launcher",
    "libvirt_style",
    "make_iso",
    "proxmox_style",
    "qmp_sync",
]

#: The guest modules a virtio-scsi disk needs besides the harness's virtio ones, in dependency
#: order (insmod resolves nothing; sd_mod needs t10-pi, which needs both CRC modules and the
#: crypto algorithms they ask for at load time).
SCSI_GUEST_MODULES: tuple[str, ...] = (
    "scsi_common",
    "scsi_mod",
    "crct10dif_common",
    "crct10dif_generic",
    "crc-t10dif",
    "crc64",
    "crc64_rocksoft_generic",
    "crc64-rocksoft",
    "t10-pi",
    "sd_mod",
    "virtio_scsi",
)

#: Where Debian's ``ovmf`` package puts the 4 MiB UEFI code and vars templates.
_OVMF_DIRS = ("/usr/share/OVMF",)
_OVMF_CODE = "OVMF_CODE_4M.fd"
_OVMF_VARS = "OVMF_VARS_4M.fd"


def find_ovmf() -> tuple[Path, Path]:
    """The OVMF code and vars templates (``python -m forgeqmp.testing setup`` installs Debian's ``ovmf``)."""
    for directory in _OVMF_DIRS:
        code, variables = Path(directory, _OVMF_CODE), Path(directory, _OVMF_VARS)
        if code.is_file() and variables.is_file():
            return code, variables
    raise FileNotFoundError(
        f"UEFI firmware {_OVMF_CODE}/{_OVMF_VARS} not found in {', '.join(_OVMF_DIRS)}: "
        f"run {setup_command()} (it installs the ovmf package)"
    )


def make_iso(path: Path, label: str = "FORGEISO") -> None:
    """Write a small ISO 9660 image at ``path`` (genisoimage, from ``python -m forgeqmp.testing setup``)."""
    tool = shutil.which("genisoimage") or shutil.which("xorrisofs") or shutil.which("mkisofs")
    if tool is None:
        raise FileNotFoundError(f"no ISO tool (genisoimage): run {setup_command()}")
    content = path.with_name(path.name + ".d")
    content.mkdir()
    try:
        (content / "README.TXT").write_text("forgeqmp platform-style test medium\n")
        subprocess.run(
            [tool, "-quiet", "-V", label, "-o", str(path), str(content)],
            check=True,
            capture_output=True,
        )
    finally:
        shutil.rmtree(content, ignore_errors=True)


def qmp_sync(path: str, commands: Sequence[str], timeout: float = 30.0) -> list[Any]:
    """Run QMP ``commands`` (no arguments) on a fresh connection, synchronously; their returns.

    The harness is synchronous; this is all it needs (``cont`` after a ``-S`` start) without an
    event loop. Events QEMU sends in between are skipped.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        stream = sock.makefile("rwb")

        def reply() -> dict[str, Any]:
            while time.monotonic() < deadline:
                line = stream.readline()
                if not line:
                    raise ConnectionError(f"QMP on {path} closed")
                message: dict[str, Any] = json.loads(line)
                if "event" not in message:
                    return message
            raise TimeoutError(f"QMP on {path} did not answer within {timeout:g} s")

        greeting = reply()
        if "QMP" not in greeting:
            raise ConnectionError(f"{path} does not speak QMP: {greeting}")
        results = []
        for command in ("qmp_capabilities", *commands):
            stream.write(json.dumps({"execute": command}).encode() + b"\n")
            stream.flush()
            answer = reply()
            if "error" in answer:
                raise RuntimeError(f"QMP {command} failed: {answer['error']}")
            results.append(answer.get("return"))
        return results[1:]


@attrs.frozen
class LaunchPlan:
    """How to start one platform-style QEMU: its argv and what goes with it."""

    argv: tuple[str, ...]
    #: File descriptors the child inherits (at the same numbers); closed in the parent after
    #: the start.
    pass_fds: tuple[int, ...] = ()
    #: The argv has ``-daemonize``: the started process exits 0 once QEMU runs in the background.
    daemonize: bool = False
    #: The argv has ``-S``: the harness sends ``cont`` over QMP once QEMU listens.
    start_paused: bool = False


class PlatformProfile:
    """A way to write the test guest's command line. Subclasses give :meth:`plan`."""

    #: Short name, for test ids.
    name = "harness"
    #: Boot the PVH ELF of the kernel (no firmware involved); False: the bzImage.
    pvh = True

    def guest_modules(self) -> tuple[str, ...]:
        """The kernel modules the guest loads (the harness's virtio set by default)."""
        return GUEST_MODULES

    def files(self, instance: QemuInstance) -> tuple[Path, ...]:
        """Files this profile creates in the instance's workdir (the harness removes them)."""
        return ()

    def plan(self, instance: QemuInstance, kernel: Path, initrd: Path) -> LaunchPlan:
        """The command line for ``instance`` (its disks already created); may create files."""
        raise NotImplementedError

    @staticmethod
    def serial_args(instance: QemuInstance) -> list[str]:
        """The two serial ports the harness reads (console with the counter, the shell)."""
        w = instance.workdir
        return [
            "-chardev", f"socket,id=console,path={instance.console_socket},server=on,wait=off,"
            f"logfile={w / 'console.log'},logappend=on",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=shell,path={instance.shell_socket},server=on,wait=off,"
            f"logfile={w / 'shell.log'},logappend=on",
            "-serial", "chardev:shell",
        ]  # fmt: skip


def _vm_uuid(instance: QemuInstance) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, str(instance.workdir)))


class ProxmoxStyle(PlatformProfile):
    """Proxmox VE's way (``qm showcmd``), adapted to the test guest. See the module doc."""

    name = "proxmox"
    pvh = False  # OVMF loads a bzImage (EFI stub) from fw_cfg, not a PVH ELF

    def guest_modules(self) -> tuple[str, ...]:
        return (*GUEST_MODULES, *SCSI_GUEST_MODULES)

    def files(self, instance: QemuInstance) -> tuple[Path, ...]:
        w = instance.workdir
        return (w / "efivars.fd", w / "cdrom.iso", w / "vnc.sock", w / "qga.sock")

    def plan(self, instance: QemuInstance, kernel: Path, initrd: Path) -> LaunchPlan:
        if not instance.disks:
            raise ValueError("a Proxmox-style guest needs at least one disk (its scsi0)")
        code, vars_template = find_ovmf()
        w = instance.workdir
        efivars, iso = w / "efivars.fd", w / "cdrom.iso"
        shutil.copyfile(vars_template, efivars)
        make_iso(iso)
        virtio = instance.disks[1:]
        argv = instance.build.system_argv(
            "-name", "vm100,debug-threads=on", "-no-shutdown",
            "-chardev", f"socket,id=qmp,path={instance.qmp_socket},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-pidfile", str(instance.pidfile), "-daemonize",
            "-smbios", f"type=1,uuid={_vm_uuid(instance)}",
            "-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={code}",
            "-drive", f"if=pflash,unit=1,id=drive-efidisk0,format=raw,file={efivars},"
            f"size={efivars.stat().st_size}",
            "-smp", "1,sockets=1,cores=1,maxcpus=1", "-nodefaults",
            "-boot", "menu=on,strict=on,reboot-timeout=1000",
            "-vnc", f"unix:{w / 'vnc.sock'}",
            "-cpu", "qemu64", "-m", str(instance.memory_mib),
        )  # fmt: skip
        for disk in virtio:
            argv += ["-object", f"iothread,id=iothread-{disk.name}"]
        argv += [
            "-device", "VGA,id=vga,bus=pcie.0,addr=0x1",
            "-chardev", f"socket,path={w / 'qga.sock'},server=on,wait=off,id=qga0",
            "-device", "virtio-serial,id=qga0,bus=pcie.0,addr=0x8",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-drive", f"file={iso},if=none,id=drive-ide2,media=cdrom,aio=threads",
            "-device", "ide-cd,bus=ide.1,unit=0,drive=drive-ide2,id=ide2,bootindex=101",
            "-device", "virtio-scsi-pci,id=scsihw0,bus=pcie.0,addr=0x5",
        ]  # fmt: skip
        scsi0 = instance.disks[0]
        argv += [
            "-drive", f"file={scsi0.path},if=none,id=drive-{scsi0.name},format={scsi0.format},"
            "cache=writeback,aio=threads,detect-zeroes=on",
            "-device", f"scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=drive-{scsi0.name},"
            f"id={scsi0.name},serial={scsi0.name},bootindex=100",
        ]  # fmt: skip
        for slot, disk in enumerate(virtio, start=0xA):
            argv += [
                "-drive", f"file={disk.path},if=none,id=drive-{disk.name},format={disk.format},"
                "cache=writeback,aio=threads,detect-zeroes=unmap,discard=on",
                "-device", f"virtio-blk-pci,drive=drive-{disk.name},id={disk.name},"
                f"serial={disk.name},bus=pcie.0,addr={slot:#x},iothread=iothread-{disk.name}",
            ]  # fmt: skip
        argv += [
            "-netdev", "type=user,id=net0",
            "-device", "virtio-net-pci,mac=BC:24:11:00:00:01,netdev=net0,bus=pcie.0,addr=0x12,"
            "id=net0,romfile=",
            "-machine", f"type=q35,accel={instance.accel}",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 forge.disks={len(virtio)} quiet",
            *self.serial_args(instance),
        ]  # fmt: skip
        return LaunchPlan(argv=tuple(argv), daemonize=True)


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class LibvirtStyle(PlatformProfile):
    """libvirt's way (``virsh domxml-to-native``, libvirt 9-11), adapted to the test guest.

    See the module doc. The monitor is an inherited fd: the harness listens at
    ``instance.qmp_socket`` itself and passes the socket to QEMU.
    """

    name = "libvirt"

    def plan(self, instance: QemuInstance, kernel: Path, initrd: Path) -> LaunchPlan:
        monitor = _listen(instance.qmp_socket)
        fd = monitor.detach()
        argv = instance.build.system_argv(
            "-name", "guest=forge-vm,debug-threads=on", "-S",
            "-object", json.dumps({"qom-type": "memory-backend-ram", "id": "pc.ram",
                                   "size": instance.memory_mib * 1024 * 1024}),
            "-machine", "q35,usb=off,dump-guest-core=off,memory-backend=pc.ram",
            "-accel", instance.accel, "-cpu", "qemu64",
            "-m", f"size={instance.memory_mib * 1024}k",
            "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
            "-uuid", _vm_uuid(instance), "-display", "none", "-no-user-config", "-nodefaults",
            "-chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control",
            "-rtc", "base=utc", "-no-shutdown", "-boot", "strict=on",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 forge.disks={len(instance.disks)} quiet",
            "-pidfile", str(instance.pidfile),
        )  # fmt: skip
        for port, _disk in enumerate(instance.disks, start=1):
            argv += ["-device", json.dumps({
                "driver": "pcie-root-port", "port": 15 + port, "chassis": port,
                "id": f"pci.{port}", "bus": "pcie.0", "addr": f"{0x1 + port:#x}",
            })]  # fmt: skip
        for n, disk in enumerate(instance.disks, start=1):
            argv += [
                "-blockdev", json.dumps({
                    "driver": "file", "filename": disk.path, "node-name": f"libvirt-{n}-storage",
                    "auto-read-only": True, "discard": "unmap",
                }),
                "-blockdev", json.dumps({
                    "node-name": f"libvirt-{n}-format", "read-only": False,
                    "driver": disk.format, "file": f"libvirt-{n}-storage",
                }),
            ]  # fmt: skip
        for port, disk in enumerate(instance.disks, start=1):
            device: dict[str, Any] = {
                "driver": "virtio-blk-pci", "bus": f"pci.{port}", "addr": "0x0",
                "drive": f"libvirt-{port}-format", "id": disk.name, "serial": disk.name,
            }  # fmt: skip
            if port == 1:
                device["bootindex"] = 1
            argv += ["-device", json.dumps(device)]
        argv += [*self.serial_args(instance), "-msg", "timestamp=on"]
        return LaunchPlan(argv=tuple(argv), pass_fds=(fd,), start_paused=True)


#: The Proxmox-style profile (see the module doc).
proxmox_style = ProxmoxStyle()
#: The libvirt-style profile (see the module doc).
libvirt_style = LibvirtStyle()

_MONITOR_FD = re.compile(r"^(socket,id=charmonitor,fd=)(\d+)(,.*)?$")


def _spawn_with_monitor(spec: LaunchSpec) -> subprocess.Popen[bytes]:
    monitor = _listen(spec.qmp_socket)
    try:
        fd = monitor.fileno()
        argv = list(spec.argv)
        replaced = 0
        for i, arg in enumerate(argv):
            if m := _MONITOR_FD.match(arg):
                argv[i] = f"{m[1]}{fd}{m[3] or ''}"
                replaced += 1
        if replaced != 1:
            raise ValueError(f"expected one charmonitor fd= chardev in the argv, found {replaced}")
        with open(spec.log_file or os.devnull, "ab") as log:
            return subprocess.Popen(
                argv,
                cwd=spec.cwd,
                env=dict(spec.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                pass_fds=(fd,),
            )
    finally:
        monitor.close()  # QEMU has its copy


async def libvirt_launcher(spec: LaunchSpec, *, timeout: float = 60.0) -> None:
    """A forgeqmp launcher for command lines whose monitor is an inherited fd, as libvirt's is.

    It does what libvirt does on every start: creates the listening monitor socket at the QMP
    path, writes its fd number into ``-chardev socket,id=charmonitor,fd=N``, starts QEMU with that
    fd inherited (stdio to ``spec.log_file``) and returns once QMP answers there.
    """
    from forgeqmp.adapters.launcher import wait_for_qmp

    process = _spawn_with_monitor(spec)
    try:
        await wait_for_qmp(spec.qmp_socket, timeout, process)
    except BaseException:
        if process.poll() is None:
            process.kill()
        raise
