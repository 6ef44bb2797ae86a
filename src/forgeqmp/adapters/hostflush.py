"""Write the host's dirty page cache of disk images to storage before the guest is paused.

Pausing a VM (``stop``, or the switchover of a memory save) makes QEMU flush every image, and
while the flush runs the guest is paused. After a commit has copied hundreds of MiB into an
original, that flush took 0.5 s here. Flushing the same files from this process first, while
the guest still runs, leaves QEMU's flush almost nothing to do (measured: 0.55 s → milliseconds).

A commit's copy into an original is made durable by QEMU (it flushes the original before the
job is ready), and that flush writes the whole copy out after it: a second pass as long as the
first on this storage (1 GiB: 0.45 s of flush after 0.6 s of copy). :func:`write_back_while`
starts the write-back of the original's dirty pages during the copy instead (Linux
``sync_file_range``, which starts write-out without waiting for it), so that the flush finds
little left to write.

This is an optimisation only: an image this process cannot open (another mount namespace, no
permission, not a local file) is skipped, and the flush is abandoned after a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread

#: Give up waiting for the host flush after this many seconds (QEMU's own flush still runs).
FLUSH_DEADLINE = 10.0


#: How often the write-back of a commit's original is started while its job copies.
WRITE_BACK_INTERVAL = 0.05
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages not yet submitted


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (None where there is none: not Linux, or no glibc)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.sync_file_range
        function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
        function.restype = ctypes.c_int
        return function
    return None


_start_write_out = _sync_file_range()


def _is_local_path(path: str) -> bool:
    """A path this process can open for an image QEMU has open: absolute and not one of QEMU's
    ``/dev/fdset/N`` names (those exist only inside QEMU)."""
    return os.path.isabs(path) and not path.startswith("/dev/fdset")


def _open_image(path: str) -> int | None:
    """A read-only descriptor of ``path`` if it is a local regular file or block device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        mode = 0
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return fd
    os.close(fd)
    return None


async def write_back_while(path: str | None, interval: float = WRITE_BACK_INTERVAL) -> None:
    """Start the write-back of ``path``'s dirty pages every ``interval`` s until cancelled (a
    task beside a job copying into it). Returns at once when the file is not a local image
    this process can open, or the system has no ``sync_file_range``."""
    if _start_write_out is None or path is None or not _is_local_path(path):
        return
    fd = _open_image(path)
    if fd is None:
        return
    try:
        while True:
            await anyio.to_thread.run_sync(_start_write_out, fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
            await anyio.sleep(interval)
    finally:
        os.close(fd)


def disarm_flush_on_close(fd: int) -> None:
    """Spend ext4's flush-on-close of the file open as ``fd`` now, while it is nearly empty.

    ext4 (``auto_da_alloc``, its default) marks a file truncated to size 0 and writes out all of
    its dirty pages when a description of it is next closed, blocking that close. QEMU's open of
    ``/dev/fdset/N`` for a ``file:`` save truncates the descriptor it was passed, so the memory
    file's whole save (1.6 GB: 0.6-1.0 s here) was written out in the first close after the save:
    the digest's own (enable waited for it) or QEMU's at ``remove-fd``, in its main loop (the
    guest's console stalled). Opening and closing a description of the file right after QEMU
    opened it clears the mark while there is almost nothing to write. Best effort: a failure
    changes nothing but the time.
    """
    with contextlib.suppress(OSError):
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))


def _fsync_paths(paths: tuple[str, ...]) -> None:
    for path in paths:
        fd = _open_image(path)
        if fd is not None:
            try:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
            finally:
                os.close(fd)


async def flush_host_images(paths: Iterable[str | None], deadline: float = FLUSH_DEADLINE) -> None:
    """fsync each local image file in ``paths`` (best effort, bounded by ``deadline``)."""
    local = tuple(dict.fromkeys(p for p in paths if p is not None and _is_local_path(p)))
    if not local:
        return
    with anyio.move_on_after(deadline):
        await anyio.to_thread.run_sync(_fsync_paths, local, abandon_on_cancel=True)


def image_files(query_block: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every image file of ``query-block``'s answer: each drive's image and its backing chain
    (QEMU's pause flushes them all)."""
    files: list[str] = []
    for entry in query_block:
        inserted = entry.get("inserted")
        image = inserted.get("image") if isinstance(inserted, Mapping) else None
        while isinstance(image, Mapping):
            name = image.get("filename")
            if isinstance(name, str) and name:
                files.append(name)
            image = image.get("backing-image")
    return files
