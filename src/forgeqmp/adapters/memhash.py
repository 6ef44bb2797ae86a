"""The memory file's fingerprint, computed in parallel threads.

A flipped byte inside a RAM page of the memory file loads silently and corrupts the guest (see the
QEMU recipe), so enable records a digest and discard verifies it before resuming. Hashing costs as
much as restoring, so the file is hashed in fixed chunks on several threads (hashlib releases the
GIL): the digest is the SHA-256 of the concatenated SHA-256 digests of consecutive
:data:`CHUNK_SIZE`-byte chunks. It is as collision-resistant as SHA-256 and reads the file once.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["CHUNK_SIZE", "hash_fd", "hash_file"]

#: Bytes per independently hashed chunk.
CHUNK_SIZE = 64 * 1024 * 1024
_READ = 4 * 1024 * 1024


def _hash_chunk(fd: int, offset: int, length: int) -> bytes:
    digest = hashlib.sha256()
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(_READ, end - offset), offset)
        if not data:
            break
        digest.update(data)
        offset += len(data)
    return digest.digest()


def hash_fd(fd: int, *, threads: int | None = None) -> tuple[str, int]:
    """Digest of the whole file open as ``fd`` (read with pread, the offset is untouched).

    Returns ``(hex digest, size in bytes)``. Blocking: run it in a worker thread from async code.
    """
    size = os.fstat(fd).st_size
    offsets = range(0, size, CHUNK_SIZE)
    workers = max(1, min(threads or os.cpu_count() or 1, len(offsets) or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="forgeqmp-hash") as pool:
        digests = list(pool.map(lambda off: _hash_chunk(fd, off, CHUNK_SIZE), offsets))
    return hashlib.sha256(b"".join(digests)).hexdigest(), size


def hash_file(path: str, *, threads: int | None = None) -> tuple[str, int]:
    """:func:`hash_fd` of the file at ``path`` (opened read-only, never following a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return hash_fd(fd, threads=threads)
    finally:
        os.close(fd)
