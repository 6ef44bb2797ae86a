"""What every section shares: the run's settings, figures (median, min, max of n runs), guests
with cleanup, the guest's counter stall, the memory dirtier, and a few host helpers."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio

from forgeqmp.adapters.process import is_alive, wait_gone
from forgeqmp.testing import DiskSpec, QemuBuild, QemuInstance

T = TypeVar("T")
MIB = 1 << 20


def say(text: str = "") -> None:
    """Progress on stderr (stdout carries the table)."""
    print(text, file=sys.stderr, flush=True)


def run_async(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run a coroutine function to completion on anyio's asyncio backend (forgeqmp's)."""
    return anyio.run(functools.partial(fn, *args, **kwargs), backend="asyncio")


# --- settings ----------------------------------------------------------------------------------


@dataclass
class Settings:
    """What one benchmark run measures; ``quick`` shrinks every section."""

    quick: bool
    runs: int
    builds: list[QemuBuild]
    sections: list[str]
    #: Guest sizes (MiB) of the enable and discard sections.
    guest_mib: list[int]
    #: MiB written per disk in the commit section.
    commit_mib: list[int]
    commit_disks: list[int]
    #: Concurrent instances of the scale section, and their guest size.
    scale_counts: list[int]
    scale_guest_mib: int
    #: QMP round trips per run of the overhead section.
    round_trips: int
    #: Fraction of guest RAM the guest fills before anything is measured.
    touched: float = 0.75
    #: The same for the scale section's small guests: a 128 MiB guest has 80 MiB for itself (the
    #: kernel keeps the rest), and filling 64 MiB of it gets the filling dd OOM-killed.
    scale_touched: float = 0.25
    workroot: Path = Path("/tmp")

    @property
    def newest(self) -> QemuBuild:
        """The build the build-independent sections run on (commit, overhead, scale)."""
        return self.builds[0]


# --- figures -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured quantity over n runs."""

    values: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def min(self) -> float:
        return float(min(self.values))

    @property
    def max(self) -> float:
        return float(max(self.values))

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "n": len(self.values),
            "values": self.values,
        }


@dataclass
class Row:
    """One line of a section's table: what was measured (``case``) and its figures."""

    case: dict[str, Any]
    figures: dict[str, Figure] = field(default_factory=dict)
    #: Derived values (ratios of medians, notes).
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float | None) -> None:
        """Append one run's value of ``name`` (None: not measured in that run)."""
        if value is None:
            return
        self.figures.setdefault(name, Figure([])).values.append(float(value))

    def median(self, name: str) -> float | None:
        figure = self.figures.get(name)
        return figure.median if figure and figure.values else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "figures": {k: v.as_dict() for k, v in self.figures.items()},
            **({"extra": self.extra} if self.extra else {}),
        }


class Rows:
    """The rows of a section, found by their case (created on first use, in order)."""

    def __init__(self) -> None:
        self._rows: dict[tuple[tuple[str, Any], ...], Row] = {}

    def get(self, **case: Any) -> Row:
        key = tuple(sorted(case.items()))
        if key not in self._rows:
            self._rows[key] = Row(dict(case))
        return self._rows[key]

    def find(self, **case: Any) -> Row | None:
        """The row whose case includes every given item, or None."""
        for row in self._rows.values():
            if all(row.case.get(k) == v for k, v in case.items()):
                return row
        return None

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows.values())


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def rotated(items: Sequence[T], run: int) -> list[T]:
    """``items`` starting at a different one each run, so no variant always goes first."""
    if not items:
        return []
    k = run % len(items)
    return [*items[k:], *items[:k]]


# --- guests --------------------------------------------------------------------------------------


class Lab:
    """Owns everything a benchmark run starts: guests, QEMU processes, scratch files.

    Everything is removed by :meth:`close`, also when a section fails or the run is interrupted.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.workroot.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="forgeqmp-bench-", dir=settings.workroot))
        self._guests: list[QemuInstance] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._counter = itertools.count()
        #: Highest number of other QEMU processes (not this run's) seen at a section boundary.
        self.others_seen = 0

    def path(self, name: str) -> Path:
        """A fresh, unique path under the run's scratch directory."""
        return self.root / f"{next(self._counter):03d}-{name}"

    def guest(
        self,
        build: QemuBuild,
        memory_mib: int,
        disks: Sequence[DiskSpec] = (DiskSpec("disk0", "qcow2", 64),),
        *,
        start: bool = True,
    ) -> QemuInstance:
        """A test guest on ``build`` (started unless ``start`` is false), stopped at close."""
        vm = QemuInstance(
            build, self.path(f"vm-{build.name}-{memory_mib}"), disks, memory_mib=memory_mib
        )
        self._guests.append(vm)
        if start:
            vm.start(timeout=300)
        return vm

    def drop(self, vm: QemuInstance) -> None:
        """Stop a guest now and remove its files."""
        vm.cleanup()
        with contextlib.suppress(ValueError):
            self._guests.remove(vm)

    def adopt(self, process: subprocess.Popen[bytes]) -> None:
        """A QEMU this run started by itself (raw relaunches): killed at close if still running."""
        self._processes.append(process)

    def reap(self) -> None:
        """Collect the exit status of this run's own QEMU children that have exited."""
        for process in list(self._processes):
            if process.poll() is not None:
                self._processes.remove(process)

    def note_others(self) -> int:
        """Count QEMU processes on the machine that are not this run's (other people's work)."""
        count = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline.split(b"\0", 1)[0] and str(self.root).encode() not in (
                cmdline
            ):
                count += 1
        self.others_seen = max(self.others_seen, count)
        return count

    def close(self) -> None:
        for vm in reversed(self._guests):
            with contextlib.suppress(Exception):
                vm.cleanup()
        self._guests.clear()
        for process in self._processes:
            if process.poll() is None and is_alive(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            with contextlib.suppress(Exception):
                process.wait(10)
        self._processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fill(vm: QemuInstance, fraction: float) -> int:
    """Touch ``fraction`` of the guest's RAM with random data (harness ``fill_memory``); MiB.

    The guest's kernel keeps ~50 MiB for itself: filling nearly all the rest panics it ("System
    is deadlocked on memory"), so small guests need a smaller fraction. The deadline allows
    5 MB/s (the guest fills at ~40 MB/s under TCG): a dead guest fails the run in minutes."""
    mib = int(vm.memory_mib * fraction)
    vm.fill_memory(mib, timeout=max(120, mib // 5))
    return mib


# --- the guest's view: the counter ---------------------------------------------------------------


def counter_stall_ms(vm: QemuInstance, since: float, until: float) -> float | None:
    """How much longer than usual the guest's counter stayed silent around [since, until] (ms).

    The guest prints a counter line about every 0.2 s; a pause of the VM delays the next line by
    its length. This is the largest gap between consecutive lines from the last one before
    ``since`` to the first one after ``until``, minus the median gap of the 5 s before ``since``.
    Wait for a line after ``until`` before calling it.
    """
    history = [(t, boot) for t, boot, _n in vm.counter_history()]
    times = [t for t, _boot in history]
    before = [t for t in times if since - 5 <= t <= since]
    usual = (
        statistics.median(b - a for a, b in itertools.pairwise(before)) if len(before) > 2 else 0.2
    )
    first = max((i for i, t in enumerate(times) if t <= since), default=None)
    last = min((i for i, t in enumerate(times) if t >= until), default=None)
    if first is None or last is None or last <= first:
        return None
    gap = max(b - a for a, b in itertools.pairwise(times[first : last + 1]))
    return max(0.0, (gap - usual) * 1000)


def restored_counter_after(
    vm: QemuInstance, when: float, resumed: float, timeout: float = 60.0
) -> float:
    """Host time of the restored guest's first counter line: the first line received after
    ``resumed`` (the restored VM's ``cont``; the old QEMU was gone before the new one started),
    checked to be the same boot going on from an earlier state: at most one more than the last
    value printed before ``when`` (the discard's start). It may be that one more: when the
    discard follows the enable at once, the old guest printed nothing after the snapshot, and
    the value alone cannot tell a restored counter from one that went on, only the time can."""
    before = [(b, n) for t, b, n in vm.counter_history() if t < when]
    boot, last = before[-1] if before else (None, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, b, n in vm.counter_history():
            if t >= resumed:
                if b != boot or n > last + 1:
                    raise RuntimeError(
                        f"the guest's first counter line after the restore is {b} {n}, not the "
                        f"same boot ({boot}) going on from at most {last + 1}"
                    )
                return t
        time.sleep(0.005)
    raise TimeoutError(f"the restored guest printed no counter line within {timeout:g} s")


def next_counter_after(vm: QemuInstance, when: float, timeout: float = 60.0) -> float:
    """Host time of the first counter line received after ``when``."""
    vm.wait_counter(since=when, timeout=timeout)
    return next(t for t, _b, _n in vm.counter_history() if t >= when)


# --- the guest's view: dirtying memory -----------------------------------------------------------


class Dirtier:
    """A guest loop rewriting 64 MiB of the filled RAM with copies of other filled pages (non-zero,
    so QEMU really sends them) for as long as it runs: memory dirtied while the save runs."""

    CHUNK_MIB = 64

    def __init__(self, vm: QemuInstance) -> None:
        self.vm = vm
        self.pid: int | None = None
        self.mb_per_s: float | None = None

    def _copy(self) -> str:
        c = self.CHUNK_MIB
        return f"dd if=/dev/shm/fill of=/dev/shm/fill bs=1M count={c} skip={c} conv=notrunc 2>/dev/null"

    def measure(self, rounds: int = 4) -> float:
        """The loop's dirty rate in MB/s (guest-side dd, timed on the host)."""
        started = time.monotonic()
        self.vm.check(f"i=0; while [ $i -lt {rounds} ]; do {self._copy()}; i=$((i + 1)); done")
        self.mb_per_s = rounds * self.CHUNK_MIB * MIB / 1e6 / (time.monotonic() - started)
        return self.mb_per_s

    def start(self) -> None:
        out = self.vm.check(
            f"setsid sh -c 'while :; do {self._copy()}; done' </dev/null >/dev/null 2>&1 & echo $!"
        )
        self.pid = int(out.split()[-1])

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(Exception):
                self.vm.run(f"kill -TERM -{self.pid} 2>/dev/null || kill {self.pid}", timeout=30)
            self.pid = None


# --- host helpers --------------------------------------------------------------------------------


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the file really occupies (a mapped-ram file is RAM-sized but sparse)."""
    return os.stat(path).st_blocks * 512


def kill_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, one process of ours; returns when it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, timeout)


class CpuMeter:
    """The CPU the machine had to spare between :meth:`start` and :meth:`stop`, and what one
    process used: ``idle_cores`` (the machine's idle time per second, iowait counted idle) and
    ``proc_cores`` (the process's user + system time per second, all its threads), both in cores.
    A 10 ms tick (``/proc``'s clock) against runs of tenths of a second to seconds."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK")
        self._start = self._read()

    def _ticks(self, path: str) -> float:
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(path).read_text().rsplit(")", 1)[1].split()
            return (int(stat[11]) + int(stat[12])) / self._tick
        return 0.0

    def _read(self) -> tuple[float, float, float, float]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        idle = (int(fields[3]) + int(fields[4])) / self._tick
        if self.pid is None:
            return time.monotonic(), idle, 0.0, 0.0
        process = self._ticks(f"/proc/{self.pid}/stat")
        main = self._ticks(f"/proc/{self.pid}/task/{self.pid}/stat")
        return time.monotonic(), idle, process, main

    def stop(self) -> dict[str, float]:
        """``idle_cores``; with a pid also ``proc_cores`` and ``main_cores`` (its main thread's:
        QEMU's main loop, where block jobs without an iothread run)."""
        end = self._read()
        seconds = max(end[0] - self._start[0], 1e-9)
        got = {"idle_cores": (end[1] - self._start[1]) / seconds}
        if self.pid is not None:
            got["proc_cores"] = (end[2] - self._start[2]) / seconds
            got["main_cores"] = (end[3] - self._start[3]) / seconds
        return got


def unlink_all(paths: Iterable[str | os.PathLike[str]]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def machine() -> dict[str, Any]:
    """The machine the figures come from."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "loadavg": os.getloadavg(),
    }
