"""The memory digest (:mod:`forgeqmp.adapters.memhash`) against independent implementations of its
definitions: ``"xxh3-128"`` (what enable records: the data extents of a sparse file, their layout
and the file's size) and ``"sha256"`` (records of older forgeqmp: SHA-256 over the SHA-256 digests
of consecutive CHUNK_SIZE-byte chunks). Chunks, windows and reads are made small here so that every
boundary case is a few KiB."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import struct
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeqmp.adapters import hashahead, memhash, memwindows, process
from forgeqmp.core.record import DIGEST_ALGORITHMS

BLOCK = 4096  # the file systems' block: holes and data extents come in whole blocks
CHUNK = 4096
WINDOW = 4 * BLOCK
READ = 1000  # not a divisor of CHUNK, WINDOW or BLOCK: reads end inside chunks and extents
ALGORITHMS = list(memhash.ALGORITHMS)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memhash, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(memwindows, "WINDOW", WINDOW)  # the workers hashing ahead are told it
    monkeypatch.setattr(memwindows, "READ", READ)  # the mappings' spans and the SHA-256 reads


def reference_sha256(data: bytes) -> str:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()


def le64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def stream_of(data: bytes, pieces: list[tuple[int, int]]) -> bytes:
    return b"".join(le64(o) + le64(n) + data[o : o + n] for o, n in pieces)


def reference(data: bytes, extents: list[tuple[int, int]]) -> str:
    """The ``"xxh3-128"`` digest of a file holding ``data`` whose data extents are ``extents``."""
    windows: dict[int, list[tuple[int, int]]] = {}
    for start, length in extents:
        offset, end = start, start + length
        while offset < end:
            k = offset // WINDOW
            stop = min(end, (k + 1) * WINDOW)
            windows.setdefault(k, []).append((offset, stop - offset))
            offset = stop
    digest = xxhash.xxh3_128(b"forgeqmp-memory xxh3-128 1\n" + le64(len(data)))
    for k in sorted(windows):
        digest.update(le64(k) + xxhash.xxh3_128(stream_of(data, windows[k])).digest())
    return digest.hexdigest()


def payload(size: int, seed: object = None) -> bytes:
    key = hashlib.sha256(f"{size} {seed}".encode()).digest()
    return (key * (size // 32 + 1))[:size]


def sparse(path: Path, size: int, data_blocks: list[int]) -> bytes:
    """A file of ``size`` bytes with data (never all zero) only in the given blocks; returns
    its contents as read (holes are zeros)."""
    content = bytearray(size)
    with path.open("wb") as out:
        out.truncate(size)
        for block in data_blocks:
            start = block * BLOCK
            piece = payload(min(BLOCK, size - start), seed=block)
            out.seek(start)
            out.write(piece)
            content[start : start + len(piece)] = piece
    return bytes(content)


def holes_supported(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return memhash.data_extents(fd) != [(0, os.fstat(fd).st_size)]
    finally:
        os.close(fd)


@pytest.fixture
def sparse_file(tmp_path: Path) -> Path:
    path = tmp_path / "memory.bin"
    sparse(path, 8 * BLOCK, [2])
    if not holes_supported(path):
        pytest.skip("this file system reports no holes (SEEK_DATA/SEEK_HOLE)")
    return path


# --- "xxh3-128" on dense files -----------------------------------------------------------------


def test_the_recorded_algorithms_are_the_computed_ones() -> None:
    assert set(memhash.ALGORITHMS) == set(DIGEST_ALGORITHMS)
    assert memhash.ALGORITHM == "xxh3-128"


def test_each_digest_has_the_length_a_record_takes(tmp_path: Path) -> None:
    path = tmp_path / "memory.bin"
    path.write_bytes(payload(3 * CHUNK))
    for algorithm, length in DIGEST_ALGORITHMS.items():
        digest, _size = memhash.hash_file(str(path), algorithm=algorithm)
        assert len(digest) == length
        assert digest == digest.lower()


@pytest.mark.parametrize(
    "size", [0, 1, READ, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW, 3 * WINDOW + READ + 7]
)
@pytest.mark.parametrize("threads", [1, 3, None])
def test_xxh3_of_a_dense_file_is_the_documented_one(
    tmp_path: Path, size: int, threads: int | None
) -> None:
    data = payload(size)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    extents = [(0, size)] if size else []
    assert memhash.hash_file(str(path), threads=threads) == (reference(data, extents), size)


def test_the_default_is_xxh3_not_a_plain_hash(tmp_path: Path) -> None:
    data = payload(2 * WINDOW)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    digest, _size = memhash.hash_file(str(path))
    assert digest == memhash.hash_file(str(path), algorithm="xxh3-128")[0]
    assert digest != xxhash.xxh3_128(data).hexdigest()


# --- "xxh3-128" on sparse files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "data_blocks"),
    [
        (8, [2]),
        (8, [0, 1, 2, 3, 4, 5, 6, 7]),  # dense, written block by block
        (13, [0, 3, 4, 5, 12]),  # an extent across a window boundary (blocks 3-5), data at the end
        (9, []),  # all hole
        (40, list(range(0, 40, 2))),  # many small extents, several in one read
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_xxh3_hashes_the_data_extents_as_documented(
    sparse_file: Path, blocks: int, data_blocks: list[int], threads: int
) -> None:
    size = blocks * BLOCK + 100  # a partial last block
    data = sparse(sparse_file, size, data_blocks)
    expected: list[tuple[int, int]] = []
    for block in data_blocks:
        start, end = block * BLOCK, min(size, (block + 1) * BLOCK)
        if expected and expected[-1][0] + expected[-1][1] == start:
            expected[-1] = (expected[-1][0], end - expected[-1][0])
        else:
            expected.append((start, end - start))
    fd = os.open(sparse_file, os.O_RDONLY)
    try:
        assert memhash.data_extents(fd) == expected
    finally:
        os.close(fd)
    assert memhash.hash_file(str(sparse_file), threads=threads) == (reference(data, expected), size)


def test_a_hole_that_became_data_changes_the_digest(sparse_file: Path) -> None:
    data = sparse(sparse_file, 8 * BLOCK, [2])
    before = memhash.hash_file(str(sparse_file))
    with sparse_file.open("r+b") as f:  # zeros, as the hole read: the bytes are the same
        f.seek(5 * BLOCK)
        f.write(bytes(BLOCK))
    assert sparse_file.read_bytes() == data
    after = memhash.hash_file(str(sparse_file))
    assert after[1] == before[1]
    assert after[0] != before[0]
    # The old SHA-256 reads holes as zeros and cannot tell: that is why the layout is hashed.
    assert memhash.hash_file(str(sparse_file), algorithm="sha256") == (
        reference_sha256(data),
        len(data),
    )


def test_data_that_became_a_hole_changes_the_digest(sparse_file: Path) -> None:
    sparse(sparse_file, 8 * BLOCK, [2, 3])
    before = memhash.hash_file(str(sparse_file))
    sparse(sparse_file, 8 * BLOCK, [2])
    assert memhash.hash_file(str(sparse_file))[0] != before[0]


def test_a_longer_trailing_hole_changes_the_digest(sparse_file: Path) -> None:
    sparse(sparse_file, 8 * BLOCK, [2])
    before = memhash.hash_file(str(sparse_file))
    os.truncate(sparse_file, 9 * BLOCK)  # same extents, one more block of hole
    after = memhash.hash_file(str(sparse_file))
    assert after[1] == 9 * BLOCK
    assert after[0] != before[0]


@pytest.mark.parametrize("where", [0, BLOCK - 1, WINDOW - 1, WINDOW, 3 * WINDOW - 1])
def test_one_flipped_byte_in_a_sparse_file_changes_the_digest(
    sparse_file: Path, where: int
) -> None:
    blocks = sorted({0, (WINDOW - 1) // BLOCK, WINDOW // BLOCK, (3 * WINDOW - 1) // BLOCK})
    data = sparse(sparse_file, 3 * WINDOW, blocks)
    before = memhash.hash_file(str(sparse_file))
    with sparse_file.open("r+b") as f:
        f.seek(where)
        f.write(bytes([data[where] ^ 0x01]))
    after = memhash.hash_file(str(sparse_file))
    assert after[1] == before[1]
    assert after[0] != before[0]


# --- both algorithms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, READ, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + READ + 7]
)
@pytest.mark.parametrize("threads", [1, 3, None])
def test_the_old_sha256_digest_is_still_the_documented_one(
    tmp_path: Path, size: int, threads: int | None
) -> None:
    data = payload(size)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    assert memhash.hash_file(str(path), algorithm="sha256", threads=threads) == (
        reference_sha256(data),
        size,
    )


def test_the_old_sha256_is_not_the_plain_sha256_of_a_multi_chunk_file(tmp_path: Path) -> None:
    data = payload(2 * CHUNK)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    digest, _size = memhash.hash_file(str(path), algorithm="sha256")
    assert digest != hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("where", [0, CHUNK - 1, CHUNK, 2 * CHUNK + 5, 3 * CHUNK - 1])
def test_one_flipped_byte_anywhere_changes_the_digest(
    tmp_path: Path, algorithm: str, where: int
) -> None:
    data = payload(3 * CHUNK)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    before = memhash.hash_file(str(path), algorithm=algorithm)
    flipped = bytearray(data)
    flipped[where] ^= 0x01
    path.write_bytes(bytes(flipped))
    after = memhash.hash_file(str(path), algorithm=algorithm)
    assert after[1] == before[1]
    assert after[0] != before[0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_truncated_or_extended_file_changes_the_digest(tmp_path: Path, algorithm: str) -> None:
    data = payload(2 * CHUNK)
    path = tmp_path / "memory.bin"
    path.write_bytes(data)
    whole = memhash.hash_file(str(path), algorithm=algorithm)
    path.write_bytes(data[:-1])
    assert memhash.hash_file(str(path), algorithm=algorithm)[0] != whole[0]
    path.write_bytes(data + b"\0")
    assert memhash.hash_file(str(path), algorithm=algorithm)[0] != whole[0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hash_fd_leaves_the_file_offset_alone(sparse_file: Path, algorithm: str) -> None:
    """QEMU may be reading the stream from this very open file (``fd:`` migration) meanwhile."""
    data = sparse(sparse_file, 2 * WINDOW + 3, [0, 5, 6])
    fd = os.open(sparse_file, os.O_RDONLY)
    try:
        os.lseek(fd, 17, os.SEEK_SET)
        expected = (
            reference_sha256(data)
            if algorithm == "sha256"
            else reference(data, [(0, BLOCK), (5 * BLOCK, 2 * BLOCK)])
        )
        assert memhash.hash_fd(fd, algorithm=algorithm) == (expected, len(data))
        assert os.lseek(fd, 0, os.SEEK_CUR) == 17
    finally:
        os.close(fd)


def test_an_unknown_algorithm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "memory.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown memory digest algorithm 'md5'"):
        memhash.hash_file(str(path), algorithm="md5")


def test_hash_file_never_follows_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target.bin"
    target.write_bytes(payload(10))
    link = tmp_path / "memory.bin"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic links"):  # ELOOP: O_NOFOLLOW refused it
        memhash.hash_file(str(link))


# --- hashing a stream while it is written (memwindows.GrowingFile, hashahead.HashAhead) ----------


@contextlib.contextmanager
def open_stream(path: Path, *, write: bool = True) -> Iterator[int]:
    """The file at ``path`` open (``write``: emptied or created, for writing); closed after."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def advance(
    stream: memwindows.GrowingFile, known: dict[int, tuple[list[tuple[int, int]], bytes]]
) -> int:
    """Hash what ``stream`` has grown past into ``known``; returns how many windows."""
    found = {index: (extents, digest) for index, extents, digest in stream.advance()}
    known.update(found)
    return len(found)


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=3 * WINDOW), min_size=0, max_size=12),
    advance_every=st.integers(min_value=1, max_value=3),
)
@settings(max_examples=60, deadline=None)
def test_a_stream_hashed_while_written_has_the_digest_of_the_whole_file(
    sizes: list[int], advance_every: int
) -> None:
    data = payload(sum(sizes), seed=len(sizes))
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    known: dict[int, tuple[list[tuple[int, int]], bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.bin"
        with open_stream(path) as fd:
            stream = memwindows.GrowingFile(fd)
            for n, (a, b) in enumerate(itertools.pairwise(offsets), 1):
                os.write(fd, data[a:b])
                if n % advance_every == 0:
                    advance(stream, known)
            got = memhash.hash_reusing(fd, known)[:2]
        assert len(known) == len(data) // WINDOW or advance_every > 1
        assert got == memhash.hash_file(str(path))
        assert got == (reference(data, [(0, len(data))] if data else []), len(data))


def test_advance_hashes_only_the_windows_the_file_has_grown_past(tmp_path: Path) -> None:
    data = payload(3 * WINDOW + 5)
    known: dict[int, tuple[list[tuple[int, int]], bytes]] = {}
    with open_stream(tmp_path / "memory.bin") as fd:
        stream = memwindows.GrowingFile(fd)
        os.write(fd, data[: WINDOW - 1])
        assert advance(stream, known) == 0
        os.write(fd, data[WINDOW - 1 : 2 * WINDOW + 1])
        assert advance(stream, known) == 2
        assert sorted(known) == [0, 1]
        assert known[1][0] == [(WINDOW, WINDOW)]
        assert advance(stream, known) == 0
        os.write(fd, data[2 * WINDOW + 1 :])
        assert advance(stream, known) == 1
        assert memhash.hash_reusing(fd, known)[:2] == (reference(data, [(0, len(data))]), len(data))


def test_a_window_whose_layout_changed_after_it_was_hashed_is_hashed_again(
    sparse_file: Path,
) -> None:
    """Not what a precopy writer does; if the layout moves anyway, the digest still follows it."""
    data = bytearray(payload(3 * WINDOW))
    known: dict[int, tuple[list[tuple[int, int]], bytes]] = {}
    with open_stream(sparse_file) as fd:
        os.write(fd, data)
        assert advance(memwindows.GrowingFile(fd), known) == 3
        os.ftruncate(fd, BLOCK)  # the first window keeps one block, the others become holes
        os.ftruncate(fd, 3 * WINDOW)
        data[BLOCK:] = bytes(len(data) - BLOCK)
        got = memhash.hash_reusing(fd, known)[:2]
    assert got == (reference(bytes(data), [(0, BLOCK)]), len(data))
    assert got == memhash.hash_file(str(sparse_file))


def test_bytes_rewritten_after_they_were_hashed_make_a_digest_discard_refuses(
    tmp_path: Path,
) -> None:
    """The documented limit: a writer that goes back over hashed bytes (a precopy save does not)
    leaves a digest that is not the file's, so discard's verification refuses the file."""
    path = tmp_path / "memory.bin"
    data = payload(2 * WINDOW)
    known: dict[int, tuple[list[tuple[int, int]], bytes]] = {}
    with open_stream(path) as fd:
        os.write(fd, data)
        advance(memwindows.GrowingFile(fd), known)
        os.pwrite(fd, b"\xff", 3)
        got = memhash.hash_reusing(fd, known)[:2]
    assert got == (reference(data, [(0, len(data))]), len(data))
    assert got != memhash.hash_file(str(path))


def test_a_result_line_reads_back_and_anything_else_is_refused() -> None:
    line = memwindows.format_result(7, [(0, 5), (4096, 9)], bytes(range(16)))
    assert memwindows.parse_result(line.rstrip(b"\n")) == (7, [(0, 5), (4096, 9)], bytes(range(16)))
    for bad in (
        b"",
        b"7",
        b"7 00 0+5",
        b"-1 " + bytes(range(16)).hex().encode() + b" 0+5",
        b"7 " + bytes(range(16)).hex().encode() + b" 0+0",
        b"x y z",
    ):
        with pytest.raises(ValueError, match="not a window's result"):
            memwindows.parse_result(bad)


def wait_until(condition: object, what: str, seconds: float = 60) -> None:
    """Poll ``condition()`` until true (a worker at the idle priority may wait for a core)."""
    assert callable(condition)
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.005)


def is_gone(pid: int) -> bool:
    """True when ``pid`` is no process (reaped), not even a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "X"
    except FileNotFoundError:
        return True


def test_the_worker_hashes_the_stream_as_it_grows(tmp_path: Path) -> None:
    # At the normal priority: on a busy test machine an idle-priority worker may get no CPU.
    data = payload(4 * WINDOW + 9)
    with open_stream(tmp_path / "memory.bin") as fd:
        ahead = hashahead.HashAhead.start(fd, idle=False)
        assert ahead is not None
        try:
            for offset in range(0, len(data), WINDOW // 3):
                os.write(fd, data[offset : offset + WINDOW // 3])

            def all_taken() -> bool:
                ahead.take()
                return ahead.bytes_ahead == 4 * WINDOW  # every whole window, not the tail

            wait_until(all_taken, "the worker's results for 4 windows")
        finally:
            known = ahead.stop()
        assert sorted(known) == [0, 1, 2, 3]
        digest, size, reused = memhash.hash_reusing(fd, known)
        assert (digest, size) == (reference(data, [(0, len(data))]), len(data))
        assert reused == 4 * WINDOW
    wait_until(lambda: is_gone(ahead.pid), "the killed worker reaped")
    assert ahead.stop() == known  # stopping again is harmless


def test_the_worker_runs_at_the_idle_priority(tmp_path: Path) -> None:
    with open_stream(tmp_path / "memory.bin") as fd:
        ahead = hashahead.HashAhead.start(fd)
        assert ahead is not None
        try:
            wait_until(lambda: os.sched_getscheduler(ahead.pid) == os.SCHED_IDLE, "SCHED_IDLE")
        finally:
            ahead.stop()
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the controller is untouched


def test_windows_hashed_again_are_not_counted_as_reused(sparse_file: Path) -> None:
    data = payload(3 * WINDOW)
    known: dict[int, tuple[list[tuple[int, int]], bytes]] = {}
    with open_stream(sparse_file) as fd:
        os.write(fd, data)
        advance(memwindows.GrowingFile(fd), known)
        os.ftruncate(fd, WINDOW + BLOCK)  # window 1 keeps one block: hashed again
        _digest, _size, reused = memhash.hash_reusing(fd, known)
    assert reused == WINDOW  # window 0 only


def test_the_worker_ends_on_its_own_when_the_controller_is_gone(tmp_path: Path) -> None:
    """Its stop pipe closes with the controller: it exits instead of hashing on."""
    with open_stream(tmp_path / "memory.bin") as fd:
        ahead = hashahead.HashAhead.start(fd, idle=False)
        assert ahead is not None
        os.close(ahead._stop)  # what the controller's death does to the pipe
        ended: list[int] = []

        def exited() -> bool:
            pid, status = os.waitpid(ahead.pid, os.WNOHANG)
            if pid:
                ended.append(os.waitstatus_to_exitcode(status))
            return bool(pid)

        wait_until(exited, "the worker's own exit")
        assert ended == [0]
        os.close(ahead._results)
        if ahead._pidfd is not None:
            os.close(ahead._pidfd)


def test_the_worker_does_not_import_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as root beside guest RAM, it must not pick up a module planted where it was started."""
    planted = tmp_path / "cwd"
    planted.mkdir()
    marker = tmp_path / "imported"
    for name in ("xxhash", "mmap", "select", "struct"):
        (planted / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('{name}')\n")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    data = payload(WINDOW)
    with open_stream(tmp_path / "memory.bin") as fd:
        os.write(fd, data)
        ahead = hashahead.HashAhead.start(fd, idle=False)
        assert ahead is not None
        try:

            def taken() -> bool:
                ahead.take()
                return ahead.bytes_ahead == WINDOW

            wait_until(taken, "the worker's result")
        finally:
            ahead.stop()
    assert not marker.exists()


def test_without_a_python_to_run_it_there_is_no_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = sys.executable
    with open_stream(tmp_path / "memory.bin") as fd:
        for executable in ("", "/bin/false", "/usr/sbin/uwsgi"):
            monkeypatch.setattr(sys, "executable", executable)
            assert hashahead.HashAhead.start(fd) is None
        monkeypatch.setattr(sys, "executable", python)
        monkeypatch.setattr(sys, "frozen", True, raising=False)  # PyInstaller and the like
        assert hashahead.HashAhead.start(fd) is None


def test_a_worker_that_fails_leaves_the_digest_to_after_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memwindows, "__file__", str(tmp_path / "missing.py"))  # cannot load
    data = payload(2 * WINDOW)
    with open_stream(tmp_path / "memory.bin") as fd:
        ahead = hashahead.HashAhead.start(fd, idle=False)
        assert ahead is not None
        os.write(fd, data)
        wait_until(lambda: not process.is_alive(ahead.pid), "the failed worker's exit")
        known = ahead.stop()
        assert known == {}
        assert memhash.hash_reusing(fd, known) == (
            reference(data, [(0, len(data))]),
            len(data),
            0,
        )


def test_results_that_are_not_results_are_all_dropped() -> None:
    """A worker that says anything else (another program at sys.executable) is not believed."""
    sleeper = os.posix_spawn("/bin/sleep", ["sleep", "60"], os.environ)
    results_r, results_w = os.pipe()
    stop_r, stop_w = os.pipe()
    os.set_blocking(results_r, False)
    ahead = hashahead.HashAhead(sleeper, results_r, stop_w)
    good = memwindows.format_result(0, [(0, WINDOW)], bytes(16))
    os.write(results_w, good + good.replace(b"0 ", b"1 ", 1))
    ahead.take()
    assert ahead.bytes_ahead == 2 * WINDOW
    os.write(results_w, b"Python 3.11.7\n")
    assert ahead.stop() == {}
    wait_until(lambda: is_gone(sleeper), "the killed worker reaped")
    for f in (results_w, stop_r):
        os.close(f)


def test_the_worker_keeps_only_its_own_descriptors(tmp_path: Path) -> None:
    """A descriptor the embedding left inheritable (a lock, a socket) must not live on in it; and
    the memory file it gets is read-only."""
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)
    try:
        with open_stream(tmp_path / "memory.bin") as fd:
            ahead = hashahead.HashAhead.start(fd, idle=False)
            assert ahead is not None
            try:

                def own_only() -> bool:
                    return sorted(map(int, os.listdir(f"/proc/{ahead.pid}/fd"))) == [0, 1, 2, 3]

                wait_until(own_only, "the worker closed what it inherited")
                flags = int(
                    Path(f"/proc/{ahead.pid}/fdinfo/3").read_text().split("flags:")[1].split()[0],
                    8,
                )
                assert flags & os.O_ACCMODE == os.O_RDONLY
            finally:
                ahead.stop()
    finally:
        os.close(leaked_r)
        os.close(leaked_w)


def test_hashing_ahead_never_asks_for_the_extents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SEEK_DATA/SEEK_HOLE take the inode lock QEMU's writes take: a worker starved at the idle
    priority must not hold it. The extents are asked once the save is done, by hash_fd."""
    data = payload(2 * WINDOW + 3)
    known: dict[int, tuple[list[tuple[int, int]], bytes]] = {}
    with open_stream(tmp_path / "memory.bin") as fd:
        os.write(fd, data)
        real_lseek = os.lseek

        def lseek(fd_: int, offset: int, how: int) -> int:
            assert how not in (os.SEEK_DATA, os.SEEK_HOLE), "hashing ahead asked for extents"
            return real_lseek(fd_, offset, how)

        monkeypatch.setattr(os, "lseek", lseek)
        assert advance(memwindows.GrowingFile(fd), known) == 2
        monkeypatch.setattr(os, "lseek", real_lseek)
        assert memhash.hash_reusing(fd, known)[:2] == (reference(data, [(0, len(data))]), len(data))


def test_results_written_before_the_worker_was_halted_are_still_taken(tmp_path: Path) -> None:
    """The enable kills the worker in the guest's pause (halt) and takes its results after."""
    data = payload(2 * WINDOW)
    line_bytes = sum(
        len(memwindows.format_result(k, [(k * WINDOW, WINDOW)], bytes(16))) for k in range(2)
    )
    with open_stream(tmp_path / "memory.bin") as fd:
        ahead = hashahead.HashAhead.start(fd, idle=False)
        assert ahead is not None
        os.write(fd, data)

        def waiting() -> int:
            return struct.unpack("i", fcntl.ioctl(ahead._results, termios.FIONREAD, b"\0" * 4))[0]

        wait_until(lambda: waiting() >= line_bytes, "the worker's two results in the pipe")
        ahead.halt()
        wait_until(lambda: not process.is_alive(ahead.pid), "the halted worker dead")
        known = ahead.stop()
        assert sorted(known) == [0, 1]
        assert memhash.hash_reusing(fd, known)[:2] == (reference(data, [(0, len(data))]), len(data))
