"""The pre-pause host flush: local image files are fsynced; anything else is skipped quietly."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest

from forgeqmp.adapters import hostflush


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths fsynced by hostflush (recorded, then really fsynced)."""
    seen: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(hostflush.os, "fsync", record)
    return seen


def test_local_images_are_fsynced_once(tmp_path: Path, fsynced: list[str]) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.raw"
    a.write_bytes(b"x" * 4096)
    b.write_bytes(b"y")
    anyio.run(hostflush.flush_host_images, [str(a), str(b), str(a)])
    assert fsynced == [str(a), str(b)]


def test_what_is_not_a_local_image_is_skipped(tmp_path: Path, fsynced: list[str]) -> None:
    link = tmp_path / "link"
    target = tmp_path / "target"
    target.write_bytes(b"z")
    link.symlink_to(target)
    paths = [
        None,
        "",
        "relative/image.qcow2",
        "/dev/fdset/3",
        str(tmp_path / "missing.qcow2"),
        str(tmp_path),  # a directory
        str(link),  # never followed
        "/dev/null",  # a character device
    ]
    anyio.run(hostflush.flush_host_images, paths)
    assert fsynced == []


def test_an_unreadable_image_does_not_fail_the_flush(tmp_path: Path, fsynced: list[str]) -> None:
    image = tmp_path / "image.qcow2"
    image.write_bytes(b"x")
    image.chmod(0)
    other = tmp_path / "other.qcow2"
    other.write_bytes(b"y")
    anyio.run(hostflush.flush_host_images, [str(image), str(other)])
    # root reads mode-0 files; anyone else skips it. Either way the other image is flushed.
    assert fsynced[-1] == str(other)


def test_a_slow_flush_is_abandoned_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "image.qcow2"
    image.write_bytes(b"x")
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def stuck_fsync(fd: int) -> None:
        started.set()
        release.wait(30)
        finished.set()

    monkeypatch.setattr(hostflush.os, "fsync", stuck_fsync)
    anyio.run(lambda: hostflush.flush_host_images([str(image)], deadline=0.1))
    try:
        assert started.wait(30)  # the fsync really ran (a flush that does nothing fails here)
        assert not finished.is_set()  # returned at the deadline, the fsync still under way
    finally:
        release.set()
    assert finished.wait(30)


def test_image_files_walks_every_backing_chain() -> None:
    query_block = [
        {
            "qdev": "d0",
            "inserted": {
                "image": {
                    "filename": "/s/overlay.qcow2",
                    "backing-image": {
                        "filename": "/v/d0.qcow2",
                        "backing-image": {"filename": "/v/b"},
                    },
                }
            },
        },
        {"qdev": "cd", "removable": True},  # an empty CD-ROM drive
        {"qdev": "d1", "inserted": {"image": {"filename": 'json:{"driver": "nbd"}'}}},
    ]
    assert hostflush.image_files(query_block) == [
        "/s/overlay.qcow2",
        "/v/d0.qcow2",
        "/v/b",
        'json:{"driver": "nbd"}',
    ]


def _fds_open_on(path: Path) -> list[str]:
    """This process's descriptors open on ``path`` (not a count of all of them: an earlier test's
    descriptor closed meanwhile by the garbage collector would change that)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(name)
        except FileNotFoundError:
            continue
    return found


def test_write_back_starts_until_cancelled_and_closes_its_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(b"x" * 65536)
    started: list[tuple[int, int, int, int]] = []

    def start_write_out(fd: int, offset: int, length: int, flags: int) -> int:
        assert os.fstat(fd).st_ino == image.stat().st_ino
        started.append((fd, offset, length, flags))
        return 0

    monkeypatch.setattr(hostflush, "_start_write_out", start_write_out)

    async def main() -> None:
        with anyio.move_on_after(0.3):
            await hostflush.write_back_while(str(image), interval=0.05)

    anyio.run(main)
    assert len(started) >= 3  # repeated while the job copies, not once
    assert {s[1:] for s in started} == {(0, 0, hostflush._SYNC_FILE_RANGE_WRITE)}
    assert _fds_open_on(image) == []


@pytest.mark.parametrize("path", [None, "relative.qcow2", "/dev/fdset/3", "/nonexistent/x.qcow2"])
def test_write_back_returns_at_once_for_what_is_not_a_local_image(
    path: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostflush, "_start_write_out", lambda *a: pytest.fail("started"))

    async def main() -> None:
        with anyio.fail_after(1):
            await hostflush.write_back_while(path)

    anyio.run(main)


def test_this_system_has_sync_file_range() -> None:
    # Debian 12 (glibc): the write-back is really started there, not silently skipped.
    assert hostflush._start_write_out is not None
    fd = os.open("/proc/self/exe", os.O_RDONLY)
    try:
        assert hostflush._start_write_out(fd, 0, 0, hostflush._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


def test_disarming_the_flush_on_close_changes_neither_the_file_nor_the_descriptor(
    tmp_path: Path,
) -> None:
    path = tmp_path / "memory"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 0)  # what QEMU's open of /dev/fdset/N does to the memory file
        os.write(fd, b"saved state")
        hostflush.disarm_flush_on_close(fd)
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(b"saved state")
        os.write(fd, b"!")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"saved state!"
    hostflush.disarm_flush_on_close(fd)  # a closed descriptor: nothing happens, no error
