"""``python -m benchmarks.digest [--mib 512,2048] [--runs 3] [--workdir DIR]``: the memory file's
digest candidates on a file in the page cache (no QEMU needed).

Measures, per file size, SHA-256 (hashlib, the chunked scheme of records before the digest
algorithm was recorded), BLAKE3 (the ``blake3`` package, its own threads; only if installed) and
XXH3-128 (the ``xxhash`` package) with one thread and with forgeqmp's threads, plus forgeqmp's
own :func:`forgeqmp.adapters.memhash.hash_fd` with each algorithm it knows. The file is written
once (random bytes: incompressible, no holes) and read once before the runs, so every run hashes
from the page cache. Prints a Markdown table (median, min, max of the runs, and GB/s of the
median) on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from forgeqmp.adapters import memhash

MIB = 1 << 20
_READ = 4 * MIB


def _stream(fd: int, size: int, update: Callable[[bytes], object]) -> None:
    offset = 0
    while offset < size:
        data = os.pread(fd, min(_READ, size - offset), offset)
        update(data)
        offset += len(data)


def _sha256_one_thread(fd: int, size: int) -> None:
    digest = hashlib.sha256()
    _stream(fd, size, digest.update)
    digest.hexdigest()


def _xxh3_one_thread(fd: int, size: int) -> None:
    digest = xxhash.xxh3_128()
    _stream(fd, size, digest.update)
    digest.hexdigest()


def _xxh3_threads(fd: int, size: int) -> None:
    chunk = memhash.CHUNK_SIZE

    def part(offset: int) -> bytes:
        digest = xxhash.xxh3_128()
        _stream_part(fd, offset, min(chunk, size - offset), digest.update)
        return digest.digest()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        b"".join(pool.map(part, range(0, size, chunk)))


def _stream_part(fd: int, offset: int, length: int, update: Callable[[bytes], object]) -> None:
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(_READ, end - offset), offset)
        update(data)
        offset += len(data)


def _blake3(fd: int, size: int) -> None:
    import blake3  # type: ignore[import-not-found]  # optional: measured only when installed

    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    _stream(fd, size, digest.update)
    digest.hexdigest()


def _memhash(algorithm: str) -> Callable[[int, int], None]:
    def run(fd: int, _size: int) -> None:
        memhash.hash_fd(fd, algorithm=algorithm)

    return run


def _candidates() -> dict[str, Callable[[int, int], None]]:
    found: dict[str, Callable[[int, int], None]] = {
        "SHA-256, 1 thread": _sha256_one_thread,
        "XXH3-128, 1 thread": _xxh3_one_thread,
        f"XXH3-128, {os.cpu_count()} threads": _xxh3_threads,
    }
    try:
        import blake3  # noqa: F401
    except ImportError:
        print("blake3 not installed: BLAKE3 not measured", file=sys.stderr)
    else:
        found["BLAKE3 (threaded)"] = _blake3
    for algorithm in memhash.ALGORITHMS:
        found[f"forgeqmp hash_fd {algorithm}"] = _memhash(algorithm)
    return found


def _make_file(directory: Path, mib: int) -> Path:
    path = directory / f"digest-{mib}.bin"
    with path.open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(MIB))
    with path.open("rb") as warm:  # into the page cache
        while warm.read(16 * MIB):
            pass
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", default="512,2048", help="file sizes in MiB, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args(argv)
    sizes = [int(m) for m in args.mib.split(",") if m.strip()]
    print("| file | digest | median s | min s | max s | GB/s (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="forgeqmp-bench-") as scratch:
        for mib in sizes:
            path = _make_file(Path(scratch), mib)
            size = path.stat().st_size
            fd = os.open(path, os.O_RDONLY)
            try:
                for name, run in _candidates().items():
                    times = []
                    for _ in range(args.runs):
                        began = time.perf_counter()
                        run(fd, size)
                        times.append(time.perf_counter() - began)
                    median = statistics.median(times)
                    print(
                        f"| {mib} MiB | {name} | {median:.3f} | {min(times):.3f} | "
                        f"{max(times):.3f} | {size / median / 1e9:.2f} |",
                        flush=True,
                    )
            finally:
                os.close(fd)
                path.unlink()


if __name__ == "__main__":
    main()
