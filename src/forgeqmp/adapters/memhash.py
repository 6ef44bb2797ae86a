"""The memory file's fingerprint: what enable records and discard verifies before resuming.

A flipped byte inside a RAM page of the memory file loads silently and corrupts the guest (see the
QEMU recipe), so enable records a digest and discard verifies it while QEMU loads the file. The
digest guards against corruption (storage, a stray write, a truncated copy), not tampering: whoever
can write the memory file can write the record beside it (docs/security.md). So it need not be a
cryptographic hash, only a strong checksum, and it competes with QEMU's load for the same cores:
enable records **XXH3-128** (:data:`ALGORITHM`), several times faster than SHA-256 here (measured
by ``python -m benchmarks.digest``). Records written before the algorithm was recorded carry the
chunked SHA-256 below (``"sha256"``), which is still verified.

``"xxh3-128"`` hashes only the data of a sparse file (a mapped-ram file is mostly holes), and the
layout of that data, so a hole that became data (even zeros) or a changed length is caught. It is
the XXH3-128 of::

    b"forgeqmp-memory xxh3-128 1\\n" || le64(file size)
    || for each window k (WINDOW bytes at k * WINDOW) that holds data, in order:
           le64(k) || XXH3-128(the window's stream)

where a window's stream is, for each data extent clipped to the window, in order of offset,
``le64(offset) || le64(length) || the extent's bytes``. Data extents are what ``SEEK_DATA`` /
``SEEK_HOLE`` report (a file system without them has one extent: the whole file). Windows are
hashed on several threads, each through read-only mappings of at most 4 MiB of the file at a
time (the page cache hashed in place, no copy), by :mod:`forgeqmp.adapters.memwindows`; a
precopy save's windows are mostly hashed while QEMU writes it (:mod:`forgeqmp.adapters.hashahead`),
and :func:`hash_reusing` reuses them.

``"sha256"`` (records of older forgeqmp) is the SHA-256 of the concatenated SHA-256 digests of
consecutive :data:`CHUNK_SIZE`-byte chunks of the whole file, holes read as zeros.

Both read with ``pread`` or a mapping only: the file offset of the descriptor is never moved, so
the same open file can be handed to QEMU (which reads the stream at that offset) while it is
hashed. The size is checked before each mapping; a file truncated *while* a mapping of its end is
read would end the process with SIGBUS. Only whoever can write the private state dir can do that
(the same who can kill the process; docs/security.md), and recover finishes an operation killed
that way.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

import xxhash

from forgeqmp.adapters import memwindows

# WINDOW is memwindows' (re-exported here for readers of the digest's definition; patch it there).
from forgeqmp.adapters.memwindows import WINDOW, Extents, data_extents
from forgeqmp.core.record import DIGEST_ALGORITHMS, LEGACY_DIGEST_ALGORITHM

__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "CHUNK_SIZE",
    "WINDOW",
    "KnownWindows",
    "data_extents",
    "hash_fd",
    "hash_file",
    "hash_reusing",
]

#: The algorithm enable records now.
ALGORITHM: Final = "xxh3-128"
#: Every algorithm :func:`hash_fd` computes (and so discard can verify).
ALGORITHMS: Final = (ALGORITHM, LEGACY_DIGEST_ALGORITHM)
assert set(ALGORITHMS) == set(DIGEST_ALGORITHMS)

#: Bytes per independently hashed chunk of the ``"sha256"`` digest.
CHUNK_SIZE = 64 * 1024 * 1024
_MAGIC: Final = b"forgeqmp-memory xxh3-128 1\n"
_U64: Final = struct.Struct("<Q")
#: Windows already hashed: index -> (the window's data extents, its XXH3-128).
KnownWindows = Mapping[int, tuple[Extents, bytes]]
_T = TypeVar("_T")


def hash_fd(fd: int, *, algorithm: str = ALGORITHM, threads: int | None = None) -> tuple[str, int]:
    """Digest by ``algorithm`` of the file open as ``fd`` (its offset is never moved).

    Returns ``(hex digest, size in bytes)``. Blocking: run it in a worker thread from async code.

    :raises ValueError: an algorithm this forgeqmp does not know.
    """
    size = os.fstat(fd).st_size
    workers = threads or os.cpu_count() or 1
    if algorithm == ALGORITHM:
        return _xxh3_128(fd, size, workers, {})[0], size
    if algorithm == LEGACY_DIGEST_ALGORITHM:
        return _chunked_sha256(fd, size, workers), size
    raise ValueError(
        f"unknown memory digest algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}"
    )


def hash_reusing(
    fd: int, known: KnownWindows, *, threads: int | None = None
) -> tuple[str, int, int]:
    """The ``"xxh3-128"`` :func:`hash_fd` of the file open as ``fd``, reusing the digests of
    windows already hashed (while the file was written: :mod:`forgeqmp.adapters.hashahead`):
    ``known`` maps window indexes to ``(data extents, XXH3-128)``, and a window's is reused when
    its extents are still those, and hashed again otherwise. Returns ``(hex digest, size in
    bytes, bytes of data whose digest was reused)``."""
    size = os.fstat(fd).st_size
    digest, reused = _xxh3_128(fd, size, threads or os.cpu_count() or 1, known)
    return digest, size, reused


def hash_file(
    path: str, *, algorithm: str = ALGORITHM, threads: int | None = None
) -> tuple[str, int]:
    """:func:`hash_fd` of the file at ``path`` (opened read-only, never following a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return hash_fd(fd, algorithm=algorithm, threads=threads)
    finally:
        os.close(fd)


def _xxh3_128(fd: int, size: int, workers: int, known: KnownWindows) -> tuple[str, int]:
    """The digest, and the bytes of the windows whose digest came from ``known``."""
    windows = memwindows.windows_of(data_extents(fd, size))
    todo = [k for k, extents in windows.items() if k not in known or known[k][0] != extents]
    digests = _parallel(lambda k: memwindows.window_digest(fd, windows[k]), todo, workers)
    hashed = dict(zip(todo, digests, strict=True))
    digest = xxhash.xxh3_128(_MAGIC)
    digest.update(_U64.pack(size))
    reused = 0
    for index, extents in windows.items():
        digest.update(_U64.pack(index))
        if index in hashed:
            digest.update(hashed[index])
        else:
            digest.update(known[index][1])
            reused += sum(length for _offset, length in extents)
    return digest.hexdigest(), reused


def _sha256_chunk(fd: int, offset: int, length: int) -> bytes:
    digest = hashlib.sha256()
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(memwindows.READ, end - offset), offset)
        if not data:
            break
        digest.update(data)
        offset += len(data)
    return digest.digest()


def _chunked_sha256(fd: int, size: int, workers: int) -> str:
    offsets = list(range(0, size, CHUNK_SIZE))
    digests = _parallel(lambda off: _sha256_chunk(fd, off, CHUNK_SIZE), offsets, workers)
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _parallel(fn: Callable[[_T], bytes], items: list[_T], workers: int) -> list[bytes]:
    """``fn`` of each item, in order, on up to ``workers`` threads (hashing releases the GIL)."""
    if len(items) <= 1 or workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(
        max_workers=min(workers, len(items)), thread_name_prefix="forgeqmp-hash"
    ) as pool:
        return list(pool.map(fn, items))
