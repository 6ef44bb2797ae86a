"""Commit while the guest rewrites its disk without pause: the commit must still finish (within
its timeout), and the guest must not stall for long. One disk with N MiB written before the
commit; during it, a guest loop rewrites the same N MiB over and over (direct I/O). Reported:
the commit's seconds, the longest switch pause (QEMU's STOP→RESUME), the guest's longest stall
(the longest gap between two of its counter lines, printed every 0.2 s, while the commit ran)
and how many MiB the guest rewrote meanwhile.
"""

from __future__ import annotations

import itertools
import threading
import time

from benchmarks.commit import CHUNK_MIB, _commit, _enable, write_data
from benchmarks.common import Lab, Rows, Settings, run_async, say
from forgeqmp.testing import DiskSpec, QemuInstance

#: The commit's deadline here (s): a commit that cannot converge fails the run instead of
#: hanging it.
TIMEOUT = 600.0


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
    for mib in settings.commit_mib:
        vm = lab.guest(build, 256, [DiskSpec("disk0", "qcow2", mib + 64)])
        try:
            vm.check(f"dd if=/dev/urandom of=/dev/shm/blk bs=1M count={CHUNK_MIB} 2>/dev/null")
            row = rows.get(build=build.name, mib_per_disk=mib)
            for run in range(settings.runs):
                state_dir = lab.path(f"state-writer-{mib}-{run}")
                run_async(_enable, vm, state_dir, ["disk0"])
                write_data(vm, ["disk0"], mib)
                stop, written = threading.Event(), [0]
                writer = threading.Thread(target=_rewrite, args=(vm, "disk0", mib, stop, written))
                writer.start()
                time.sleep(1.0)  # the writer is going before the commit starts
                t0 = time.monotonic()
                try:
                    forge_s, pause_ms = run_async(_commit, vm, state_dir)
                finally:
                    t1 = time.monotonic()
                    stop.set()
                    writer.join(600)
                stall = _longest_stall(vm, t0, t1)
                row.add("forge_s", forge_s)
                row.add("pause_ms", pause_ms)
                row.add("stall_ms", None if stall is None else stall * 1000)
                row.add("rewritten_mib", float(written[0]))
                say(
                    f"    commit under a rewriting guest, {mib} MiB run {run + 1}: "
                    f"{forge_s:.2f} s, switch pause {pause_ms} ms, longest guest stall "
                    f"{'?' if stall is None else f'{stall * 1000:.0f}'} ms, guest rewrote "
                    f"{written[0]} MiB meanwhile"
                )
        finally:
            lab.drop(vm)
