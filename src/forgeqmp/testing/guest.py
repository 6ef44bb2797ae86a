"""The test guest: a busybox initramfs, built in pure Python, and the two wire protocols it speaks.

Integration tests need a guest that boots in seconds under TCG and that makes the effects of a live
snapshot *observable*:

- memory: a counter printed on the console (ttyS0) about five times a second. Its value lives only in
  guest RAM, so a memory restore shows the counter going back to its value at snapshot time under the
  same boot id, and a cold boot shows a new boot id with the counter restarting at 0;
- disks: a command shell on the second serial port (ttyS1), so tests write data through the guest's
  own block layer (with direct I/O, bypassing the guest page cache) and read it back.

The initramfs is a gzip'd ``newc`` cpio written here without any cpio binary, cached by a hash of
every input (busybox, the kernel modules, the init script, this module's format version), so building
it costs nothing after the first test run and a changed input can never reuse a stale image.

This module holds both ends of each protocol (the guest's ``/init`` and the host-side encoders and
parsers) so the two cannot drift apart. Nothing here starts QEMU; see :mod:`forgeqmp.testing.instance`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import io
import lzma
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from forgeqmp.testing.builds import forgeqmp_prefix
from forgeqmp.testing.setup import guest_missing, setup_command

__all__ = [
    "COUNTER_RE",
    "GUEST_MODULES",
    "INIT_SCRIPT",
    "READY_RE",
    "CommandFrame",
    "GuestImage",
    "build_initramfs",
    "cache_dir",
    "encode_command",
    "guest_image",
    "init_script",
    "parse_frame",
    "pattern_block",
    "pattern_md5",
    "pvh_kernel",
    "write_cpio",
]

#: Bumped whenever the cpio layout changes, so cached images built by older code are not reused.
_FORMAT_VERSION = "forgeqmp-initramfs-1"

#: The virtio modules, in the only order that works: each needs the ones before it. insmod (unlike
#: modprobe) resolves no dependencies, and a wrong order is silent: no /dev/vd* appears, and a
#: ``dd of=/dev/vda`` then fills a file in the RAM root instead of a disk.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)

#: ``FORGE-READY boot=<id> disks=<n>``: printed once per boot on ttyS0 when the shell is listening.
READY_RE = re.compile(rb"FORGE-READY boot=(?P<boot>[0-9a-f-]+) disks=(?P<disks>\d+)")
#: ``FORGE-COUNTER <boot-id> <n>``: printed on ttyS0 about every 0.2 s.
COUNTER_RE = re.compile(rb"FORGE-COUNTER (?P<boot>[0-9a-f-]+) (?P<n>\d+)")

#: Bytes per line of the deterministic disk pattern; 16384 lines make one MiB.
_PATTERN_LINE = 64
MIB = 1024 * 1024

# The guest's /init. Design notes, because each line is there for a reason:
# - the counter loop and the shell loop are separate background subshells: the counter never writes
#   to ttyS1, so command output can never interleave with it;
# - ttyS1 is put in raw mode without echo: no CR/LF translation (output bytes arrive unchanged), no
#   echo of the command line, no signal characters;
# - commands arrive base64-encoded on one line (any byte, newline or quote is safe to send), run with
#   stdin from /dev/null (they cannot eat the command stream) under a guest-side `timeout`, so a
#   command the host gave up on cannot block the shell forever;
# - output is framed as "FORGE-BEGIN <id>\n" <output> "\nFORGE-END <id> <status>\n" with a random
#   id per command: the host takes exactly the bytes between the two markers, and stale output of an
#   earlier command can never be mistaken for the answer to the current one;
# - FORGE-READY is printed after the shell loop has been started, so a command sent right after it
#   is read.
_INIT_TEMPLATE = r"""#!/bin/busybox sh
# forgeqmp test guest: see forgeqmp/testing/guest.py for the protocol.
/bin/busybox mkdir -p /proc /sys /dev /tmp /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/shm
mount -t tmpfs -o size=100% tmpfs /dev/shm
for m in @MODULES@; do
    insmod /lib/modules/$m.ko || echo "FORGE-ERROR insmod $m failed" >/dev/ttyS0
done

want=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in forge.disks=*) want=${arg#forge.disks=} ;; esac
done
count_disks() { ls /sys/block 2>/dev/null | grep -c '^vd'; }
tries=0
while [ "$(count_disks)" -lt "$want" ] && [ $tries -lt 300 ]; do
    sleep 0.05
    tries=$((tries + 1))
done
boot=$(cat /proc/sys/kernel/random/uuid)

shell_loop() {
    stty -F /dev/ttyS1 raw -echo
    exec </dev/ttyS1 >/dev/ttyS1 2>&1
    while IFS= read -r line; do
        set -- $line
        [ "$1" = FORGE-CMD ] && [ $# -eq 4 ] || continue
        id=$2
        tmo=$3
        cmd=$(printf '%s' "$4" | base64 -d 2>/dev/null) || cmd='echo "forge: undecodable command"; exit 254'
        printf 'FORGE-BEGIN %s\n' "$id"
        timeout -s KILL "$tmo" sh -c "$cmd" </dev/null 2>&1
        st=$?
        printf '\nFORGE-END %s %s\n' "$id" "$st"
    done
    echo "FORGE-ERROR shell loop ended" >/dev/ttyS0
}

counter_loop() {
    exec >/dev/ttyS0 2>&1
    n=0
    while :; do
        echo "FORGE-COUNTER $boot $n"
        n=$((n + 1))
        sleep 0.2
    done
}

shell_loop &
echo "FORGE-READY boot=$boot disks=$(count_disks)" >/dev/ttyS0
counter_loop &
while :; do
    wait
    sleep 1
done
"""


def init_script(modules: Iterable[str] = GUEST_MODULES) -> str:
    """The guest's /init loading ``modules`` in the given order (each after those it needs)."""
    return _INIT_TEMPLATE.replace("@MODULES@", " ".join(modules))


INIT_SCRIPT = init_script()


def cache_dir() -> Path:
    """Where built initramfs images are kept: ``$FORGEQMP_CACHE``, else ``~/.cache/forgeqmp``."""
    env = os.environ.get("FORGEQMP_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "forgeqmp"


@attrs.frozen
class CpioEntry:
    """One member of a newc archive; ``data`` is the file content or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Serialize ``entries`` as an uncompressed ``newc`` (070701) cpio archive, the format the kernel
    unpacks for an initramfs. Owner root, mtime 0, so identical inputs give identical bytes."""
    out = io.BytesIO()

    def pad4() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    def member(ino: int, entry: CpioEntry) -> None:
        name = entry.name.encode() + b"\0"
        fields = (
            ino,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.write(name)
        pad4()
        out.write(entry.data)
        pad4()

    ino = 0
    for ino, entry in enumerate(entries, start=1):
        member(ino, entry)
    member(ino + 1, CpioEntry("TRAILER!!!", 0))
    # The kernel reads the archive in 512-byte blocks like cpio(1) writes it; pad to be safe.
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


def _initramfs_entries(busybox: bytes, modules: dict[str, bytes], init: str) -> list[CpioEntry]:
    dirs = ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "sbin", "usr", "usr/bin"]
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in dirs]
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox))
    entries.append(CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    entries.extend(
        CpioEntry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data)
        for name, data in modules.items()
    )
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, init.encode()))
    return entries


def _find_module(modules_dir: Path, name: str) -> Path:
    """The plain ``.ko`` of ``name`` in a /lib/modules/<version> tree (uncompressed, as insmod needs)."""
    hits = sorted(modules_dir.rglob(f"{name}.ko"))
    if not hits:
        raise FileNotFoundError(
            f"kernel module {name}.ko not found under {modules_dir}; run {setup_command()}"
        )
    return hits[0]


@attrs.frozen
class GuestImage:
    """What QEMU boots: the kernel and the cached initramfs built for it."""

    kernel: Path
    initrd: Path
    kernel_version: str


def build_initramfs(
    busybox: Path,
    modules_dir: Path,
    *,
    init: str = INIT_SCRIPT,
    cache: Path | None = None,
    module_names: Sequence[str] = GUEST_MODULES,
) -> Path:
    """Return the path of the gzip'd initramfs for these inputs, building it on a cache miss.

    The cache key hashes every input byte, so changing busybox, a module or the init script gives a
    new file. The file is written to a temporary name and renamed, so concurrent test processes that
    build the same image at once both end with a complete file.
    """
    bb = busybox.read_bytes()
    modules = {name: _find_module(modules_dir, name).read_bytes() for name in module_names}
    key = hashlib.sha256()
    key.update(_FORMAT_VERSION.encode() + b"\0" + init.encode() + b"\0")
    key.update(hashlib.sha256(bb).digest())
    for name, data in modules.items():
        key.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    directory = cache if cache is not None else cache_dir()
    target = directory / f"initramfs-{key.hexdigest()[:24]}.cpio.gz"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    archive = write_cpio(_initramfs_entries(bb, modules, init))
    fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(archive)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def guest_image(
    prefix: Path | None = None,
    *,
    cache: Path | None = None,
    modules: Sequence[str] = GUEST_MODULES,
    pvh: bool = True,
) -> GuestImage:
    """The test guest from ``<prefix>/guest`` (default ``$FORGEQMP_PREFIX``, ``/opt/forgeqmp``).

    ``modules``: the kernel modules its /init loads, in order (more drivers for other disk
    buses). ``pvh``: the PVH ELF when the kernel has one (fastest, no firmware); False for the
    bzImage itself, which a UEFI firmware (OVMF) boots through its EFI stub.

    Raises :class:`FileNotFoundError` naming the missing ingredient and the script that installs it.
    """
    key = (prefix if prefix is not None else forgeqmp_prefix(), cache, tuple(modules), pvh)
    image = _guest_image(*key)
    if not (image.kernel.exists() and image.initrd.exists()):  # a cache emptied meanwhile
        _guest_image.cache_clear()
        image = _guest_image(*key)
    return image


@functools.cache
def _guest_image(
    prefix: Path, cache: Path | None, modules: tuple[str, ...], pvh: bool
) -> GuestImage:
    """:func:`guest_image`, built once per process and arguments (a test session boots many
    guests from one image; the files themselves are cached on disk too)."""
    missing = guest_missing(prefix)  # the set-up's own list of the ingredients
    if missing:
        raise FileNotFoundError(
            f"test guest ingredient {missing[0]} is missing; run {setup_command()}"
        )
    guest = prefix / "guest"
    kernel = guest / "vmlinuz"
    busybox = guest / "busybox"
    modules_dir = guest / "modules"
    version_file = guest / "kernel-version"
    version = version_file.read_text().strip() if version_file.exists() else "unknown"
    bootable = (pvh_kernel(kernel, cache=cache) if pvh else None) or kernel
    initrd = build_initramfs(
        busybox, modules_dir, init=init_script(modules), cache=cache, module_names=modules
    )
    return GuestImage(bootable, initrd, version)


#: ELF note of a kernel that can be entered directly in 32-bit protected mode (PVH boot).
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether the (64-bit little-endian) ELF has a ``Xen`` PHYS32_ENTRY note in a PT_NOTE segment."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, phentsize, phnum = (
        int.from_bytes(elf[32:40], "little"),
        int.from_bytes(elf[54:56], "little"),
        int.from_bytes(elf[56:58], "little"),
    )
    for i in range(phnum):
        ph = elf[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        if int.from_bytes(ph[0:4], "little") != 4:  # PT_NOTE
            continue
        offset, size = int.from_bytes(ph[8:16], "little"), int.from_bytes(ph[32:40], "little")
        notes, pos = elf[offset : offset + size], 0
        while pos + 12 <= len(notes):
            namesz, descsz, kind = (
                int.from_bytes(notes[pos + k : pos + k + 4], "little") for k in (0, 4, 8)
            )
            name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_kernel(vmlinuz: Path, *, cache: Path | None = None) -> Path | None:
    """The uncompressed ELF kernel inside ``vmlinuz``, if it supports PVH boot; else None.

    QEMU loads such an ELF directly (``-kernel vmlinux``): no firmware real-mode boot and no
    decompression under TCG, which measured 6-8 s shorter from start to the first console line on
    both QEMU 7.2 and 10.0. Extracted once (pure Python, the payload is xz or gzip) and cached by
    the hash of the bzImage.
    """
    data = vmlinuz.read_bytes()
    directory = cache if cache is not None else cache_dir()
    target = directory / f"vmlinux-{hashlib.sha256(data).hexdigest()[:24]}.elf"
    if target.is_file():
        return target
    elf = b""
    for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b\x08"):
        start = data.find(magic)
        if start < 0:
            continue
        # The payload is followed by other data: decompressor objects stop at the stream's end.
        with contextlib.suppress(lzma.LZMAError, zlib.error):
            if magic.startswith(b"\xfd"):
                elf = lzma.LZMADecompressor().decompress(data[start:])
            else:
                elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start:])
        if elf:
            break
    if not elf or not _has_pvh_entry(elf):
        return None
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vmlinux-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(elf)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# --- the shell protocol on ttyS1 ------------------------------------------------------------------


def encode_command(command_id: str, command: str, timeout: int) -> bytes:
    """One request line: ``FORGE-CMD <id> <guest timeout s> <base64 of the command>``.

    Base64 makes every command a single line of safe characters, whatever quotes or newlines it has.
    """
    if not re.fullmatch(r"[A-Za-z0-9]+", command_id):
        raise ValueError(f"command id must be alphanumeric, got {command_id!r}")
    payload = base64.b64encode(command.encode()).decode("ascii")
    return f"FORGE-CMD {command_id} {max(1, int(timeout))} {payload}\n".encode()


@attrs.frozen
class CommandFrame:
    """A complete answer from the guest shell; ``end`` is the buffer offset just after it."""

    status: int
    output: bytes
    end: int


def parse_frame(buffer: bytes | bytearray, command_id: str) -> CommandFrame | None:
    """Find the complete answer to ``command_id`` in the bytes read from ttyS1, or None if not yet.

    The output is exactly the bytes between ``FORGE-BEGIN <id>\\n`` and ``\\nFORGE-END <id> <st>\\n``;
    anything around the frame (stale answers, noise) is ignored.
    """
    begin = f"FORGE-BEGIN {command_id}\n".encode()
    start = buffer.find(begin)
    if start < 0:
        return None
    body = start + len(begin)
    end_re = re.compile(rb"\nFORGE-END " + command_id.encode() + rb" (\d+)\n")
    # The guest always writes "\n" before FORGE-END, so the output never swallows that newline.
    match = end_re.search(buffer, body)
    if match is None:
        return None
    return CommandFrame(int(match.group(1)), bytes(buffer[body : match.start()]), match.end())


# --- the deterministic disk pattern ---------------------------------------------------------------


def _pattern_line(seed: str, block: int) -> bytes:
    text = f"forge {seed} {block:08d}"
    return text.encode().ljust(_PATTERN_LINE - 1)[: _PATTERN_LINE - 1] + b"\n"


def pattern_block(seed: str, block: int) -> bytes:
    """MiB number ``block`` (counted from the start of the disk) of the pattern written for ``seed``.

    Each MiB names its own position, so data that landed at the wrong offset does not verify.
    """
    return _pattern_line(seed, block) * (MIB // _PATTERN_LINE)


def pattern_md5(seed: str, offset_mib: int, mib: int) -> str:
    """The md5 of ``mib`` MiB of the pattern starting at MiB ``offset_mib``, computed on the host."""
    digest = hashlib.md5(usedforsecurity=False)
    for block in range(offset_mib, offset_mib + mib):
        digest.update(pattern_block(seed, block))
    return digest.hexdigest()


def pattern_shell(seed: str, offset_mib: int, mib: int) -> str:
    """A guest shell pipeline printing the same bytes as :func:`pattern_block` on stdout.

    Each MiB is built by doubling in RAM (4 KiB of lines, x16, x16) rather than by ``yes | head -c
    1M``: busybox moves a pipe in small reads, which under TCG made that 6-7x slower.
    """
    line = (
        f"\"$(printf '%-{_PATTERN_LINE - 1}.{_PATTERN_LINE - 1}s' "
        f'"$(printf \'forge %s %08d\' {seed} $i)")"'
    )
    a, b = "/dev/shm/.forge-pattern-a.$$", "/dev/shm/.forge-pattern-b.$$"
    return (
        f"i={offset_mib}; while [ $i -lt {offset_mib + mib} ]; do "
        f"yes {line} | head -c 4096 > {a}; cat {' '.join([a] * 16)} > {b}; "
        f"cat {' '.join([b] * 16)}; i=$((i + 1)); done; rm -f {a} {b}"
    )
