"""The memory digest (:mod:`forgeqmp.adapters.memhash`) against an independent implementation of its
definition: SHA-256 over the SHA-256 digests of consecutive CHUNK_SIZE-byte chunks. Chunks and
reads are made small here so that every boundary case is a few KiB."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from forgeqmp.adapters import memhash

CHUNK = 4096
READ = 1000  # not a divisor of CHUNK: reads end inside chunks


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memhash, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(memhash, "_READ", READ)


def reference(data: bytes) -> str:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()


def payload(size: int) -> bytes:
    return (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]


@pytest.mark.parametrize(
    "size", [0, 1, READ, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + READ + 7]
)
@pytest.mark.parametrize("threads", [1, 3, None])
def test_the_digest_is_the_documented_one(tmp_path: Path, size: int, threads: int | None) -> None:
    data = payload(size)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    assert memhash.hash_file(str(path), threads=threads) == (reference(data), size)


def test_it_is_not_the_plain_sha256_of_a_multi_chunk_file(tmp_path: Path) -> None:
    data = payload(2 * CHUNK)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    digest, _size = memhash.hash_file(str(path))
    assert digest != hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("where", [0, CHUNK - 1, CHUNK, 2 * CHUNK + 5, 3 * CHUNK - 1])
def test_one_flipped_byte_anywhere_changes_the_digest(tmp_path: Path, where: int) -> None:
    data = payload(3 * CHUNK)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    before = memhash.hash_file(str(path))
    flipped = bytearray(data)
    flipped[where] ^= 0x01
    path.write_bytes(bytes(flipped))
    after = memhash.hash_file(str(path))
    assert after[1] == before[1]
    assert after[0] != before[0]


def test_a_truncated_or_extended_file_changes_the_digest(tmp_path: Path) -> None:
    data = payload(2 * CHUNK)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    whole = memhash.hash_file(str(path))
    path.write_bytes(data[:-1])
    assert memhash.hash_file(str(path))[0] != whole[0]
    path.write_bytes(data + b"\0")
    assert memhash.hash_file(str(path))[0] != whole[0]


def test_hash_fd_leaves_the_file_offset_alone(tmp_path: Path) -> None:
    data = payload(2 * CHUNK + 3)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 17, os.SEEK_SET)
        assert memhash.hash_fd(fd) == (reference(data), len(data))
        assert os.lseek(fd, 0, os.SEEK_CUR) == 17
    finally:
        os.close(fd)


def test_hash_file_never_follows_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target.bin"
    target.write_bytes(payload(10))
    link = tmp_path / "memory.bin"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic links"):  # ELOOP: O_NOFOLLOW refused it
        memhash.hash_file(str(link))
