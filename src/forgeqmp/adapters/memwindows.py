"""The windows of the memory digest, and the worker that hashes a save while QEMU writes it.

The ``"xxh3-128"`` digest (:mod:`forgeqmp.adapters.memhash` defines it) is built from the XXH3-128
of each :data:`WINDOW`-byte window of the file that holds data. This module computes one window's
digest and the data extents it is made of, and holds :func:`worker_main`, the loop of the process
that hashes a precopy save window by window while QEMU writes it
(:mod:`forgeqmp.adapters.hashahead` starts it).

It needs only the standard library and ``xxhash``, and imports nothing of forgeqmp: the worker
process loads this file by its path, so it starts in a few ms instead of importing forgeqmp's
dependencies (0.3 s of CPU).

Everything here reads with ``pread``-like calls or read-only mappings: the file offset of the
descriptor is never moved (QEMU may be reading the stream at that offset). The size is checked
before each mapping; a file truncated *while* a mapping of its end is read would end the process
with SIGBUS (see memhash).
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct
from collections.abc import Iterator
from typing import Final

import xxhash

#: Bytes per independently hashed window of the ``"xxh3-128"`` digest.
WINDOW = 64 * 1024 * 1024
#: Bytes mapped at a time.
READ = 4 * 1024 * 1024
EXTENT: Final = struct.Struct("<QQ")

Extents = list[tuple[int, int]]


def data_extents(fd: int, size: int | None = None) -> Extents:
    """The data extents ``(offset, length)`` of the file open as ``fd``, in order, within its
    first ``size`` bytes (default: its size). The whole file when the file system cannot tell.

    The seeks happen on a second open file description of the same file, so the offset of ``fd``
    (which QEMU may be reading from) never moves.
    """
    if size is None:
        size = os.fstat(fd).st_size
    if size == 0:
        return []
    probe = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not os.path.samestat(os.fstat(probe), os.fstat(fd)):
            raise OSError(errno.ESTALE, "the reopened memory file is another file")
        extents: Extents = []
        offset = 0
        while offset < size:
            try:
                start = os.lseek(probe, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset
                    break
                if exc.errno == errno.EINVAL and offset == 0:  # SEEK_DATA not supported
                    return [(0, size)]
                raise
            if start >= size:
                break
            end = min(os.lseek(probe, start, os.SEEK_HOLE), size)
            extents.append((start, end - start))
            offset = end
        return extents
    finally:
        os.close(probe)


def windows_of(extents: Extents) -> dict[int, Extents]:
    """The extents clipped to each WINDOW-byte window that holds data, by window index."""
    windows: dict[int, Extents] = {}
    for start, length in extents:
        offset, end = start, start + length
        while offset < end:
            index = offset // WINDOW
            stop = min(end, (index + 1) * WINDOW)
            windows.setdefault(index, []).append((offset, stop - offset))
            offset = stop
    return windows


def reads(extents: Extents) -> Iterator[tuple[int, int, list[tuple[int, int, bytes]]]]:
    """The extents' records, grouped into reads that span at most READ bytes: ``(offset,
    length, pieces)``, each piece ``(offset, length, header)`` where header is the extent's
    ``le64(offset) || le64(length)`` on its first piece and empty on the others. Many small
    extents cost one mapping, not one each (the holes between them are mapped but never
    touched, within that bound); the pieces do not change what is hashed."""
    group: list[tuple[int, int, bytes]] = []
    first = 0
    for start, length in extents:
        end = start + length
        for offset in range(start, end, READ):
            piece = min(READ, end - offset)
            if group and offset + piece - first > READ:
                yield first, group[-1][0] + group[-1][1] - first, group
                group = []
            if not group:
                first = offset
            group.append((offset, piece, EXTENT.pack(start, length) if offset == start else b""))
    if group:
        yield first, group[-1][0] + group[-1][1] - first, group


def window_digest(fd: int, extents: Extents) -> bytes:
    """The XXH3-128 of a window made of ``extents``, read through a mapping of each read's span
    (no copy: hashing the page cache in place takes half the time of pread into a buffer here)."""
    digest = xxhash.xxh3_128()
    for first, length, group in reads(extents):
        if first + length > os.fstat(fd).st_size:
            raise OSError(errno.EIO, "the memory file shrank while it was hashed")
        start = first - first % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(
            fd, first + length - start, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start
        ) as mapped:
            view = memoryview(mapped)
            try:
                for offset, piece, header in group:
                    digest.update(header)
                    digest.update(view[offset - start : offset - start + piece])
            finally:
                view.release()
    return digest.digest()


class GrowingFile:
    """A file written from its start to its end, byte after byte, and never gone back over (a
    precopy save, which QEMU writes as a stream): each WINDOW-byte window is final, and all data,
    once the file is past it.

    :meth:`advance` hashes every window the file has grown past since the last call as one data
    extent. It never asks the file system for the file's extents (``SEEK_DATA`` takes the lock of
    the inode that the writer's every ``write`` takes: a worker at the idle priority starved
    while holding it would stall the save), so the caller reuses a window's digest only if the
    window's data extents, asked once the writer is done, are that one extent. A writer that went
    back over bytes already hashed would make the digest built from them differ from the file's,
    which discard's verification reports (a cold start, never a wrong restore)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._next = 0  # the first window not hashed yet

    def advance(self) -> Iterator[tuple[int, Extents, bytes]]:
        """``(index, extents, digest)`` of each window now wholly below the file's size, in order
        (lazily: stop iterating to stop hashing)."""
        size = os.fstat(self._fd).st_size
        while (self._next + 1) * WINDOW <= size:
            index = self._next
            extents = [(index * WINDOW, WINDOW)]
            yield index, extents, window_digest(self._fd, extents)
            self._next = index + 1


#: The worker's descriptors: its stop pipe (readable: stop), its results, the memory file.
WORKER_STOP_FD: Final = 0
WORKER_RESULTS_FD: Final = 1
WORKER_FILE_FD: Final = 3


def format_result(index: int, extents: Extents, digest: bytes) -> bytes:
    """One line of the worker's results: ``index hex-digest offset+length,...``."""
    layout = ",".join(f"{offset}+{length}" for offset, length in extents)
    return f"{index} {digest.hex()} {layout}\n".encode("ascii")


def parse_result(line: bytes) -> tuple[int, Extents, bytes]:
    """:func:`format_result`'s line back; ValueError if it is not one."""
    try:
        index, digest, layout = line.decode("ascii").split(" ")
        extents = [(int(o), int(n)) for o, n in (part.split("+") for part in layout.split(","))]
        window = bytes.fromhex(digest)
        valid = int(index) >= 0 and len(window) == 16 and all(o >= 0 < n for o, n in extents)
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"not a window's result: {line!r}")
    return int(index), extents, window


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def worker_main(window: int, interval: float = 0.01) -> int:
    """The hashing worker's loop, with windows of ``window`` bytes (the parent's WINDOW): hash
    each window the memory file (WORKER_FILE_FD) has grown past and write its result line to
    WORKER_RESULTS_FD, looking every ``interval`` seconds, until WORKER_STOP_FD is readable (its
    other end closed or written: the save is over, or the controller is gone). Returns the exit
    status: 0, or 1 after an error reading the file (the enable then hashes what is left)."""
    global WINDOW
    WINDOW = window
    stream = GrowingFile(WORKER_FILE_FD)
    try:
        while True:
            for index, extents, digest in stream.advance():
                _write_all(WORKER_RESULTS_FD, format_result(index, extents, digest))
                if select.select([WORKER_STOP_FD], [], [], 0)[0]:
                    return 0
            if select.select([WORKER_STOP_FD], [], [], interval)[0]:
                return 0
    except OSError:
        return 1
