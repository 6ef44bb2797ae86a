"""Commit while the guest rewrites its disk without pause: the commit must still finish (within
its timeout), and the guest must not stall for long. One disk with N MiB written before the
commit; during it, a guest loop rewrites the same N MiB over and over (direct I/O). Reported:
the commit's seconds, the longest switch pause (QEMU's STOP→RESUME), the guest's longest stall
(the longest gap between two of its counter lines, printed every 0.2 s, while the commit ran)
and how many MiB the guest rewrote meanwhile.

A second case makes the guest outwrite the copy, which the TCG guest cannot do against a copy at
full speed: the commit's jobs run with a copy speed of :data:`SLOW_COPY` bytes/s (the test-only
hook of :mod:`forgeqmp.adapters.crashpoints`), below what the guest rewrites, on a disk of
:data:`SLOW_MIB` MiB. Without forgeqmp's write bound that commit never finishes; reported are
the same numbers, plus the write bounds forgeqmp applied (bytes/s, writes/s) and how long from
the first bound to the disk merged.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.commit import CHUNK_MIB, _commit, _enable, write_data
from benchmarks.common import Lab, Rows, Settings, run_async, say
from forgeqmp.adapters import crashpoints
from forgeqmp.testing import DiskSpec, QemuInstance

#: The commit's deadline here (s): a commit that cannot converge fails the run instead of
#: hanging it.
TIMEOUT = 600.0
#: The outwritten case: the commit job's copy speed (bytes/s) and the disk's rewritten MiB.
SLOW_COPY = 2 << 20
SLOW_MIB = 16
_BOUND_RE = re.compile(r"bounding its writes to (\d+) B/s, (\d+) writes/s")


class _Bounds(logging.Handler):
    """The write bounds forgeqmp's commit logs, with when (monotonic s)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[float, int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = _BOUND_RE.search(record.getMessage())
        if found:
            self.seen.append((time.monotonic(), int(found[1]), int(found[2])))


@contextmanager
def _slow_copy() -> Iterator[_Bounds]:
    """The commit's copy slowed to :data:`SLOW_COPY` (test-only hook), its bounds collected."""
    saved = {k: os.environ.get(k) for k in (crashpoints.ENABLE_ENV, crashpoints.SPEED_ENV)}
    os.environ[crashpoints.ENABLE_ENV] = "1"
    os.environ[crashpoints.SPEED_ENV] = str(SLOW_COPY)
    bounds = _Bounds()
    logger = logging.getLogger("forgeqmp.commit_driver")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(bounds)
    try:
        yield bounds
    finally:
        logger.removeHandler(bounds)
        logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _rewrite(
    vm: QemuInstance, disk: str, mib: int, stop: threading.Event, written: list[int]
) -> None:
    """Rewrite the disk's first ``mib`` MiB in the guest, 16 MiB a command, until ``stop``."""
    dev = vm.device_of(disk)
    chunks = max(1, mib // CHUNK_MIB)
    i = 0
    while not stop.is_set():
        vm.check(
            f"dd if=/dev/shm/blk of={dev} bs=1M count={CHUNK_MIB} "
            f"seek={(i % chunks) * CHUNK_MIB} oflag=direct 2>/dev/null",
            timeout=600,
        )
        written[0] += CHUNK_MIB
        i += 1


def _longest_stall(vm: QemuInstance, start: float, end: float) -> float | None:
    """The longest gap (s) between two counter lines of the guest inside [start, end]."""
    times = [t for t, _boot, _n in vm.counter_history() if start <= t <= end]
    if len(times) < 2:
        return None
    return max(b - a for a, b in itertools.pairwise(times))


def measure(lab: Lab, settings: Settings, rows: Rows) -> None:
    build = settings.newest
    cases = [(mib, None) for mib in settings.commit_mib] + [(SLOW_MIB, SLOW_COPY)]
    for mib, copy in cases:
        vm = lab.guest(build, 256, [DiskSpec("disk0", "qcow2", mib + 64)])
        try:
            vm.check(f"dd if=/dev/urandom of=/dev/shm/blk bs=1M count={CHUNK_MIB} 2>/dev/null")
            case = {"build": build.name, "mib_per_disk": mib}
            if copy is not None:
                case["copy_mib_s"] = copy >> 20
            row = rows.get(**case)
            for run in range(settings.runs):
                state_dir = lab.path(f"state-writer-{mib}-{copy or 0}-{run}")
                run_async(_enable, vm, state_dir, ["disk0"])
                write_data(vm, ["disk0"], mib)
                stop, written = threading.Event(), [0]
                writer = threading.Thread(target=_rewrite, args=(vm, "disk0", mib, stop, written))
                writer.start()
                time.sleep(1.0)  # the writer is going before the commit starts
                bounds = _Bounds()
                t0 = time.monotonic()
                try:
                    if copy is None:
                        forge_s, pause_ms, _cpu = run_async(_commit, vm, state_dir)
                    else:
                        with _slow_copy() as bounds:
                            forge_s, pause_ms, _cpu = run_async(_commit, vm, state_dir)
                finally:
                    t1 = time.monotonic()
                    stop.set()
                    writer.join(600)
                stall = _longest_stall(vm, t0, t1)
                row.add("forge_s", forge_s)
                row.add("pause_ms", pause_ms)
                row.add("stall_ms", None if stall is None else stall * 1000)
                row.add("rewritten_mib", float(written[0]))
                slowed = ""
                if copy is not None:
                    first = bounds.seen[0][0] if bounds.seen else None
                    row.add("bounded_s", None if first is None else t1 - first)
                    row.add("bounds", float(len(bounds.seen)))
                    slowed = (
                        f" (copy slowed to {copy >> 20} MiB/s; write bounds "
                        f"{', '.join(f'{b}/{n}' for _t, b, n in bounds.seen) or 'none'} B/s/"
                        f"writes/s; first bound to merged "
                        f"{'?' if first is None else f'{t1 - first:.1f}'} s)"
                    )
                say(
                    f"    commit under a rewriting guest, {mib} MiB run {run + 1}: "
                    f"{forge_s:.2f} s, switch pause {pause_ms} ms, longest guest stall "
                    f"{'?' if stall is None else f'{stall * 1000:.0f}'} ms, guest rewrote "
                    f"{written[0]} MiB meanwhile{slowed}"
                )
        finally:
            lab.drop(vm)
