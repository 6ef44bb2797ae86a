"""A real QEMU running the test guest, for forgeqmp's tests and its users' tests.

:class:`QemuInstance` launches QEMU (TCG by default) with N disks (qcow2 or raw, ``-blockdev`` +
``-device virtio-blk-pci,id=NAME``), a QMP unix socket, and two serial ports on unix sockets with
log files a relaunched QEMU appends to: ttyS0 carries the guest's ready marker and its counter,
ttyS1 the guest's command shell (see :mod:`forgeqmp.testing.guest`). With ``profile=`` the command
line is written the way a hosting platform writes it instead (Proxmox-style, libvirt-style: see
:mod:`forgeqmp.testing.platforms`), with the same sockets and pidfile.

The API is synchronous and thread-safe: async tests call it through ``anyio.to_thread.run_sync``.
Background threads stay connected to both serial sockets and reconnect on their own when QEMU is
replaced by another process started with the same argv (forgeqmp's discard does exactly that), so
the counter and the shell keep working across a discard.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import attrs

from forgeqmp.adapters.process import is_alive, wait_gone
from forgeqmp.testing.builds import QemuBuild
from forgeqmp.testing.guest import (
    COUNTER_RE,
    READY_RE,
    encode_command,
    guest_image,
    parse_frame,
    pattern_md5,
    pattern_shell,
)
from forgeqmp.testing.platforms import LaunchPlan, PlatformProfile, qmp_sync

_T = TypeVar("_T")

__all__ = ["DiskImage", "DiskSpec", "GuestCommandError", "QemuInstance"]


#: The files QEMU and the harness create in an instance's workdir (besides the disk images).
_QEMU_FILES = (
    "qmp.sock", "console.sock", "shell.sock", "qemu.pid", "console.log", "shell.log", "qemu.log",
)  # fmt: skip


@attrs.frozen
class DiskSpec:
    """A disk to give the guest: its qdev id, image format and size.

    ``legacy_drive`` gives it the way Proxmox and older tools do, as a legacy
    ``-drive if=none,id=drive-NAME,file=...,format=...`` (plus ``drive_options``, e.g.
    ``detect-zeroes=unmap,discard=unmap,cache=none,aio=native,throttling.iops-total=500``)
    instead of ``-blockdev`` nodes; ``device_options`` are added to its ``-device`` (e.g.
    ``iothread=io0``, with the ``-object iothread,id=io0`` in ``extra_args``).
    """

    name: str
    format: str = "qcow2"
    size_mib: int = 64
    legacy_drive: bool = False
    drive_options: str = ""
    device_options: str = ""

    def __attrs_post_init__(self) -> None:
        if self.format not in ("qcow2", "raw"):
            raise ValueError(f"disk format must be qcow2 or raw, not {self.format!r}")
        if self.size_mib < 1:
            raise ValueError("disk size must be at least 1 MiB")


@attrs.frozen
class DiskImage:
    """A disk of a running instance: its spec and its image file."""

    name: str
    format: str
    size_mib: int
    path: str


class GuestCommandError(RuntimeError):
    """A guest shell command exited with a non-zero status."""

    def __init__(self, command: str, status: int, output: str) -> None:
        self.command = command
        self.status = status
        self.output = output
        super().__init__(f"guest command failed with status {status}: {command}\n{output}")


class _SerialReader(threading.Thread):
    """Keeps a connection to a QEMU serial socket, reconnecting when QEMU is replaced."""

    def __init__(self, path: str, on_data: Callable[[bytes], None]) -> None:
        super().__init__(name=f"forgeqmp-serial-{os.path.basename(path)}", daemon=True)
        self.path = path
        self._on_data = on_data
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.connected = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                self._halt.wait(0.02)
                continue
            with self._lock:
                self._sock = sock
            self.connected.set()
            try:
                while not self._halt.is_set():
                    data = sock.recv(65536)
                    if not data:
                        break
                    self._on_data(data)
            except OSError:
                pass
            finally:
                self.connected.clear()
                with self._lock:
                    self._sock = None
                sock.close()

    def send(self, data: bytes, timeout: float) -> None:
        if not self.connected.wait(timeout):
            raise TimeoutError(f"not connected to {self.path} within {timeout:g} s")
        with self._lock:
            if self._sock is None:
                raise ConnectionError(f"{self.path} disconnected")
            self._sock.sendall(data)

    def stop(self) -> None:
        self._halt.set()
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
        self.join(5)


class QemuInstance:
    """One QEMU running the test guest. Use it as a context manager, or call :meth:`stop`."""

    def __init__(
        self,
        build: QemuBuild,
        workdir: str | os.PathLike[str],
        disks: Sequence[DiskSpec] = (DiskSpec("disk0"),),
        *,
        memory_mib: int = 512,
        accel: str = "tcg",
        extra_args: Sequence[str] = (),
        monitor_fd: bool = False,
        profile: PlatformProfile | None = None,
    ) -> None:
        """``monitor_fd``: start QEMU the way libvirt does, with the QMP socket created here and
        passed as an inherited descriptor (``-chardev socket,id=charmonitor,fd=N,server=on,
        wait=off -mon chardev=charmonitor,id=monitor,mode=control``) instead of ``-qmp unix:``;
        the socket is at :attr:`qmp_socket` all the same. ``profile``: write the command line
        the way a platform does (see :mod:`forgeqmp.testing.platforms`); None for the harness's
        own (a profile brings its own monitor, so ``monitor_fd`` applies without one)."""
        if accel not in ("tcg", "kvm"):
            raise ValueError(f"accel must be tcg or kvm, not {accel!r}")
        self.build = build
        self.workdir = Path(workdir).absolute()
        self.specs = tuple(disks)
        self.memory_mib = memory_mib
        self.accel = accel
        self.extra_args = tuple(extra_args)
        self.monitor_fd = monitor_fd
        self.profile = profile
        self.qmp_socket = str(self.workdir / "qmp.sock")
        self.console_socket = str(self.workdir / "console.sock")
        self.shell_socket = str(self.workdir / "shell.sock")
        self.pidfile = self.workdir / "qemu.pid"
        self.disks = tuple(
            DiskImage(d.name, d.format, d.size_mib, str(self.workdir / f"{d.name}.{d.format}"))
            for d in self.specs
        )
        self._created: list[Path] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._console = bytearray()
        self._shell = bytearray()
        #: (host monotonic time, boot id, counter) for every counter line seen.
        self._counters: list[tuple[float, str, int]] = []
        #: (host monotonic time, boot id) for every ready marker seen.
        self._ready: list[tuple[float, str]] = []
        self._readers: list[_SerialReader] = []
        self.argv: tuple[str, ...] = ()
        self._plan: LaunchPlan | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def _make_argv(self, monitor: int | None = None) -> tuple[str, ...]:
        if self.profile is not None:
            image = guest_image(modules=self.profile.guest_modules(), pvh=self.profile.pvh)
            self._plan = self.profile.plan(self, image.kernel, image.initrd)
            return (*self._plan.argv, *self.extra_args)
        image = guest_image()
        w = self.workdir
        argv = self.build.system_argv(
            "-machine", "q35", "-accel", self.accel, "-m", str(self.memory_mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", f"console=ttyS0 forge.disks={len(self.disks)} quiet",
            "-chardev", f"socket,id=console,path={self.console_socket},server=on,wait=off,"
            f"logfile={w / 'console.log'},logappend=on",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=shell,path={self.shell_socket},server=on,wait=off,"
            f"logfile={w / 'shell.log'},logappend=on",
            "-serial", "chardev:shell",
            *(
                ("-qmp", f"unix:{self.qmp_socket},server=on,wait=off")
                if monitor is None
                else (
                    "-chardev", f"socket,id=charmonitor,fd={monitor},server=on,wait=off",
                    "-mon", "chardev=charmonitor,id=monitor,mode=control",
                )
            ),
            "-pidfile", str(self.pidfile),
        )  # fmt: skip
        for i, (disk, spec) in enumerate(zip(self.disks, self.specs, strict=True)):
            backend = f"drive-{disk.name}" if spec.legacy_drive else f"{disk.name}-fmt"
            device = f"virtio-blk-pci,id={disk.name},drive={backend},serial={disk.name}"
            if i == 0:
                device += ",bootindex=1"
            if spec.device_options:
                device += "," + spec.device_options
            if spec.legacy_drive:
                drive = f"if=none,id={backend},file={disk.path},format={disk.format}"
                if spec.drive_options:
                    drive += "," + spec.drive_options
                argv += ["-drive", drive, "-device", device]
                continue
            argv += [
                "-blockdev", f"driver=file,filename={disk.path},node-name={disk.name}-file",
                "-blockdev", f"driver={disk.format},file={disk.name}-file,node-name={disk.name}-fmt",
                "-device", device,
            ]  # fmt: skip
        return (*argv, *self.extra_args)

    def start(self, timeout: float = 120.0) -> QemuInstance:
        """Create the disks, launch QEMU and wait until the guest is ready (its shell listening)."""
        if not self.workdir.exists():
            self.workdir.mkdir(parents=True)
            self._created.append(self.workdir)
        # QEMU's own files: ours to remove at cleanup unless they were there before.
        self._created += [
            path for name in _QEMU_FILES if not (path := self.workdir / name).exists()
        ]
        if self.profile is not None:
            self._created += [p for p in self.profile.files(self) if not p.exists()]
        for disk in self.disks:
            subprocess.run(
                [str(self.build.img), "create", "-q", "-f", disk.format, disk.path,
                 f"{disk.size_mib}M"],
                check=True,
                env=self.build.environ(),
            )  # fmt: skip
            self._created.append(Path(disk.path))
        monitor: socket.socket | None = None
        if self.monitor_fd and self.profile is None:  # as libvirt: bind and listen here
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.qmp_socket)
            monitor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            monitor.bind(self.qmp_socket)
            monitor.listen(8)
        self.argv = self._make_argv(monitor.fileno() if monitor is not None else None)
        pass_fds = self._plan.pass_fds if self._plan is not None else ()
        if monitor is not None:
            pass_fds = (monitor.fileno(),)
        log = open(self.workdir / "qemu.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self._process = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env=self.build.environ(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        finally:
            log.close()
            if monitor is not None:
                monitor.close()
            else:
                for fd in pass_fds:  # QEMU has its copy; ours would keep a dead QEMU's socket open
                    os.close(fd)
        if self._plan is not None:
            try:
                self._finish_platform_start(self._plan, timeout)
            except BaseException:
                self.stop()
                raise
        self._readers = [
            _SerialReader(self.console_socket, self._on_console),
            _SerialReader(self.shell_socket, self._on_shell),
        ]
        for reader in self._readers:
            reader.start()
        try:
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _finish_platform_start(self, plan: LaunchPlan, timeout: float) -> None:
        """Wait for a ``-daemonize`` parent to exit 0; send ``cont`` to a ``-S`` QEMU."""
        assert self._process is not None
        if plan.daemonize:
            try:
                code = self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"QEMU did not daemonize within {timeout:g} s") from None
            if code != 0:
                log = (self.workdir / "qemu.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"QEMU exited with status {code}: {log}")
        if plan.start_paused:
            qmp_sync(self.qmp_socket, ["cont"], timeout)

    def __enter__(self) -> QemuInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The pid of the QEMU running now (from its pidfile: QEMU may have been relaunched)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int(self.pidfile.read_text().strip())
                if self._is_ours(pid):
                    return pid
            time.sleep(0.02)
        raise RuntimeError(f"no QEMU of this instance is running ({self.pidfile})")

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.pidfile).encode() in cmdline and is_alive(pid)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop this instance's QEMU (only the one whose pidfile and argv are ours) and the
        readers. Safe to call twice, and when QEMU already exited."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(self.pidfile.read_text().strip())
            if self._is_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                if not wait_gone(pid, timeout):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    wait_gone(pid, timeout)
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait(timeout)
        for reader in self._readers:
            reader.stop()
        self._readers = []

    def cleanup(self) -> None:
        """Stop, then remove the files this instance created (and nothing else)."""
        self.stop()
        for path in reversed(self._created):
            with contextlib.suppress(FileNotFoundError):
                if path.is_dir():
                    with contextlib.suppress(OSError):
                        path.rmdir()  # only if empty: never someone else's files
                else:
                    path.unlink()
        self._created.clear()

    # --- the console: ready marker and counter -----------------------------------------------

    def _on_console(self, data: bytes) -> None:
        with self._cond:
            self._console += data
            while b"\n" in self._console:
                line, _, rest = self._console.partition(b"\n")
                self._console = bytearray(rest)
                now = time.monotonic()
                if m := COUNTER_RE.search(line):
                    self._counters.append((now, m["boot"].decode(), int(m["n"])))
                elif m := READY_RE.search(line):
                    self._ready.append((now, m["boot"].decode()))
            self._cond.notify_all()

    def wait_ready(
        self, *, since: float | None = None, new_boot: bool = False, timeout: float = 120.0
    ) -> str:
        """Wait for a ready marker (after ``since``, host monotonic time; or of a boot not seen
        before if ``new_boot``); returns its boot id."""
        known = {boot for _t, boot in self._ready} if new_boot else set()

        def found() -> str | None:
            for t, boot in self._ready:
                if (since is None or t >= since) and boot not in known:
                    return boot
            return None

        boot = self._wait_found(found, timeout, f"the guest was not ready within {timeout:g} s")
        # The shell socket must be connected, and the guest's shell loop must have opened ttyS1:
        # bytes that reach a serial port no process has open are dropped by the guest kernel,
        # and the ready marker can come first (the loop starts in the background). Ping it.
        if not self._readers[1].connected.wait(timeout):
            raise TimeoutError("the guest shell socket did not connect")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run("true", timeout=1)
                return boot
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the guest shell did not answer") from None

    def counter(self) -> tuple[str, int]:
        """The latest (boot id, counter) the guest printed."""
        with self._cond:
            if not self._counters:
                raise RuntimeError("the guest printed no counter yet")
            _t, boot, n = self._counters[-1]
            return boot, n

    def wait_counter(
        self, *, min_value: int | None = None, since: float | None = None, timeout: float = 60.0
    ) -> tuple[str, int]:
        """Wait for a counter line (received after ``since``, with a value of at least
        ``min_value``) and return the first such (boot id, counter)."""

        def found() -> tuple[str, int] | None:
            for t, boot, n in self._counters:
                if (since is None or t >= since) and (min_value is None or n >= min_value):
                    return boot, n
            return None

        if min_value is None and since is None:
            since = time.monotonic()
        return self._wait_found(
            found, timeout, f"no counter line as asked for within {timeout:g} s"
        )

    def wait_counter_rewind(
        self, *, since: float, timeout: float = 60.0
    ) -> tuple[tuple[str, int], tuple[str, int]]:
        """Wait for the counter to go back: the first line received after ``since`` (host
        monotonic time, taken *before* the restore is asked for) whose value is lower than the
        line before it, or of another boot. Returns ((boot, counter) of the line before the
        rewind, (boot, counter) of the first line after it).

        This is how a memory restore shows, independent of how long the caller took to look:
        the restored guest goes on from its counter at the snapshot, and its first line is
        compared with the old guest's last one, not with a reading taken earlier."""

        def found() -> tuple[tuple[str, int], tuple[str, int]] | None:
            for (_t0, boot0, n0), (t1, boot1, n1) in itertools.pairwise(self._counters):
                if t1 >= since and (boot1 != boot0 or n1 < n0):
                    return (boot0, n0), (boot1, n1)
            return None

        return self._wait_found(found, timeout, f"the counter did not go back within {timeout:g} s")

    def _wait_found(self, found: Callable[[], _T | None], timeout: float, failure: str) -> _T:
        """Wait on the console until ``found()`` returns a value and return it; TimeoutError
        with ``failure`` if it still returns None after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(failure)
            result = found()
        assert result is not None
        return result

    def counter_history(self) -> list[tuple[float, str, int]]:
        """Every (host monotonic time, boot id, counter) seen so far."""
        with self._cond:
            return list(self._counters)

    def boot_ids(self) -> list[str]:
        """Boot ids of every ready marker seen, in order."""
        with self._cond:
            return [boot for _t, boot in self._ready]

    # --- the shell ---------------------------------------------------------------------------

    def _on_shell(self, data: bytes) -> None:
        with self._cond:
            self._shell += data
            self._cond.notify_all()

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run ``command`` in the guest shell; returns (exit status, output)."""
        command_id = secrets.token_hex(8)
        self._readers[1].send(encode_command(command_id, command, int(timeout) + 1), timeout)
        with self._cond:
            if not self._cond.wait_for(
                lambda: parse_frame(self._shell, command_id) is not None, timeout + 1
            ):
                raise TimeoutError(f"the guest did not answer within {timeout:g} s: {command}")
            frame = parse_frame(self._shell, command_id)
            assert frame is not None
            del self._shell[: frame.end]
        return frame.status, frame.output.decode(errors="replace")

    def check(self, command: str, timeout: float = 120.0) -> str:
        """Run ``command`` in the guest; its output, or :class:`GuestCommandError`."""
        status, output = self.run(command, timeout)
        if status != 0:
            raise GuestCommandError(command, status, output)
        return output

    def device_of(self, disk: str) -> str:
        """The guest's /dev/vdX (or /dev/sdX, a SCSI disk) of the disk whose qdev id (and
        serial) is ``disk``."""
        out = self.check(
            f'for d in /sys/block/vd*; do [ "$(cat $d/serial)" = {disk} ] && echo ${{d##*/}}; done; '
            # A SCSI disk's serial is in its VPD page 0x80, after a 4-byte header.
            f'for d in /sys/block/sd*; do [ "$(tail -c +5 $d/device/vpd_pg80 2>/dev/null)" = '
            f"{disk} ] && echo ${{d##*/}}; done; true"
        ).split()
        if len(out) != 1:
            raise GuestCommandError(f"find disk {disk}", 1, " ".join(out))
        return f"/dev/{out[0]}"

    def write_disk(
        self, disk: str, mib: int, *, seed: str = "forge", offset_mib: int = 0, timeout: float = 600
    ) -> str:
        """Write ``mib`` MiB of a deterministic pattern (see :func:`pattern_md5`) at ``offset_mib``
        through the guest with direct I/O; returns the md5 the host expects for it."""
        device = self.device_of(disk)
        self.check(
            f"({pattern_shell(seed, offset_mib, mib)}) | dd of={device} bs=1M seek={offset_mib} "
            f"oflag=direct iflag=fullblock 2>/dev/null && sync",
            timeout,
        )
        return pattern_md5(seed, offset_mib, mib)

    def disk_md5(self, disk: str, mib: int, *, offset_mib: int = 0, timeout: float = 600) -> str:
        """The md5 of ``mib`` MiB at ``offset_mib`` of the disk, read in the guest with direct I/O."""
        device = self.device_of(disk)
        out = self.check(
            f"dd if={device} bs=1M skip={offset_mib} count={mib} iflag=direct 2>/dev/null | md5sum",
            timeout,
        )
        return out.split()[0]

    def fill_memory(self, mib: int, timeout: float = 600) -> None:
        """Make ``mib`` MiB of guest RAM hold data (a file in the guest's RAM-backed /dev/shm)."""
        self.check(f"dd if=/dev/urandom of=/dev/shm/fill bs=1M count={mib} 2>/dev/null", timeout)
