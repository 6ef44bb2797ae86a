"""Commit: forgeqmp's live commit vs the raw recipe's live commit vs an offline ``qemu-img
commit`` of the same overlay vs ``dd`` of the same bytes; 1 and 2 disks, N MiB written per disk.

Each run: a forgeqmp enable, N MiB of random data written through the guest (direct I/O, then a
flush) onto each disk, copies of each overlay and its base (the overlay copy rebased onto the
base copy), then forgeqmp's commit (timed), ``qemu-img commit`` of the copies (timed, disks in
parallel), the same with ``-d`` (the overlay kept) and then ``rm`` of the overlay (what
forgeqmp's commit does: merge, then remove the overlay), ``dd`` of the overlay copy's first N MiB
over the base copy (``conv=fdatasync``, as qemu-img commit fdatasyncs; timed, disks in
parallel). forgeqmp's commit also reports the guest pause (QEMU's STOP→RESUME) of each disk's
switch back to its original; the table shows the longest. Then the same write onto a raw
enable's overlays and the raw commit (timed). A first, untimed round allocates the bases'
clusters, so every timed commit overwrites allocated clusters; every timed step starts with the
page cache written back (``sync``), so none pays for the write-back of the copies or of the
step before it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import forgeqmp
from benchmarks import raw as rawqmp
from benchmarks.common import CpuMeter, Lab, Rows, Settings, ratio, run_async, say, unlink_all
from forgeqmp.testing import DiskSpec, QemuInstance

CHUNK_MIB = 16


def write_data(vm: QemuInstance, disks: Sequence[str], mib: int) -> None:
    """``mib`` MiB of (non-zero, random) data onto each disk through the guest, then a flush."""
    for name in disks:
        dev = vm.device_of(name)
        vm.check(
            f"i=0; while [ $i -lt {mib // CHUNK_MIB} ]; do dd if=/dev/shm/blk of={dev} "
            f"bs=1M count={CHUNK_MIB} seek=$((i * {CHUNK_MIB})) oflag=direct 2>/dev/null || exit 1; "
            f"i=$((i + 1)); done; dd if=/dev/null of={dev} conv=notrunc,fsync 2>/dev/null",
            timeout=1200,
        )


async def _enable(
    vm: QemuInstance, state_dir: Path, disks: Sequence[str]
) -> forgeqmp.SessionRecord:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state_dir) as instance:
        return await instance.enable(list(disks))


async def _commit(
    vm: QemuInstance, state_dir: Path
) -> tuple[float, float | None, dict[str, float]]:
    """Seconds of forgeqmp's commit, the longest guest pause of a disk's switch (ms), and the
    CPU figures of :class:`CpuMeter` during it (QEMU's, its main loop's, the machine's idle)."""
    pauses: list[float] = []

    def on_progress(event: forgeqmp.ProgressEvent) -> None:
        if event.step == "disk-merged" and event.detail.get("pause_ms") is not None:
            pauses.append(float(event.detail["pause_ms"]))

    async with forgeqmp.connect(vm.qmp_socket, state_dir=state_dir) as instance:
        cpu = CpuMeter(vm.pid)
        t0 = time.monotonic()
        await instance.commit(on_progress=on_progress)
        seconds = time.monotonic() - t0
        return seconds, max(pauses, default=None), cpu.stop()


async def _raw_enable(vm: QemuInstance, lab: Lab, disks: Sequence[str]) -> rawqmp.RawSession:
    memory = str(lab.path("raw-memory.bin"))
    async with rawqmp.Raw(vm.qmp_socket) as raw:
        targets = [d for d in await rawqmp.disks(raw) if set(d.qdev.split("/")) & set(disks)]
        session = await rawqmp.enable(
            raw,
            targets,
            memory,
            strategy="precopy",
            transport="fd",
            qemu_img=str(vm.build.img),
            env=vm.build.environ(),
            tag=os.urandom(3).hex(),
        )
    unlink_all([memory])
    return session


async def _raw_commit(vm: QemuInstance, session: rawqmp.RawSession) -> float:
    async with rawqmp.Raw(vm.qmp_socket) as raw:
        return await rawqmp.commit(raw, session)


def _parallel(
    vm: QemuInstance, commands: Sequence[list[str]], idle: dict[str, float] | None = None
) -> float:
    """Run the commands at once; seconds until the last one is done (and the machine's idle
    cores meanwhile into ``idle``)."""
    cpu = CpuMeter()
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            c, env=vm.build.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for c in commands
    ]
    for p, c in zip(procs, commands, strict=True):
        _out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{c[0]} failed: {err.decode(errors='replace')}")
    seconds = time.monotonic() - t0
    if idle is not None:
        idle.update(cpu.stop())
    return seconds


def _copies(vm: QemuInstance, lab: Lab, record: forgeqmp.SessionRecord) -> list[tuple[str, ...]]:
    """(base copy, overlay copy rebased onto it, scratch copy of the overlay for dd) per disk."""
    copies = []
    for disk in record.disks:
        assert disk.overlay_file is not None
        base = str(lab.path("base-copy.qcow2"))
        overlay = str(lab.path("overlay-copy.qcow2"))
        scratch = str(lab.path("dd-target"))
        shutil.copyfile(disk.base_file, base)
        shutil.copyfile(disk.overlay_file, overlay)
        shutil.copyfile(disk.overlay_file, scratch)
        subprocess.run(
            [str(vm.build.img), "rebase", "-u", "-b", base, "-F", disk.base_format, overlay],
            check=True,
            env=vm.build.environ(),
        )
        copies.append((base, overlay, scratch))
    return copies


def measure(lab: Lab, settings: Settings, rows: Rows) -> None:
    build = settings.newest
    biggest = max(settings.commit_mib)
    names = [f"disk{i}" for i in range(max(settings.commit_disks))]
    vm = lab.guest(build, 256, [DiskSpec(n, "qcow2", biggest + 64) for n in names])
    try:
        vm.check(f"dd if=/dev/urandom of=/dev/shm/blk bs=1M count={CHUNK_MIB} 2>/dev/null")
        state_dir = lab.path("state-commit")
        say(
            f"  commit: QEMU {build.name}, disks {settings.commit_disks}, MiB {settings.commit_mib}"
        )
        run_async(_enable, vm, state_dir, names)  # allocate the bases' clusters: untimed
        write_data(vm, names, biggest)
        run_async(_commit, vm, state_dir)
        for mib in settings.commit_mib:
            for ndisks in settings.commit_disks:
                disks = names[:ndisks]
                row = rows.get(build=build.name, disks=ndisks, mib_per_disk=mib)
                for run in range(settings.runs):
                    got = _one(vm, lab, state_dir, disks, mib)
                    for name, value in got.items():
                        row.add(name, value)
                    say(
                        f"    {ndisks} disk(s) x {mib} MiB run {run + 1}: forgeqmp "
                        f"{got['forge_s']:.2f} s (switch pause {got['pause_ms']} ms), raw {got['raw_s']:.2f} s, qemu-img commit -d "
                        f"{got['qemu_img_d_s']:.2f} s / without -d {got['qemu_img_s']:.2f} s, "
                        f"dd {got['dd_s']:.2f} s"
                    )
                for name in ("raw_s", "qemu_img_d_s", "qemu_img_d_rm_s", "qemu_img_s", "dd_s"):
                    r = ratio(row.median("forge_s"), row.median(name))
                    if r is not None:
                        row.extra[f"forge_vs_{name.removesuffix('_s')}"] = round(r, 3)
    finally:
        lab.drop(vm)


def _one(
    vm: QemuInstance, lab: Lab, state_dir: Path, disks: Sequence[str], mib: int
) -> dict[str, Any]:
    record = run_async(_enable, vm, state_dir, disks)
    write_data(vm, disks, mib)
    copies = _copies(vm, lab, record)
    try:
        # The copies are GiBs of dirty page cache: written back before any timing, or the
        # kernel's write-back of them would run during (and slow) whichever is timed first.
        os.sync()
        forge_s, pause_ms, forge_cpu = run_async(_commit, vm, state_dir)
        os.sync()
        img = str(vm.build.img)
        # dd first: qemu-img commit (without -d) empties the overlay copy.
        dd_s = _parallel(
            vm,
            [
                [
                    "dd",
                    f"if={overlay}",
                    f"of={scratch}",
                    "bs=1M",
                    f"count={mib}",
                    "conv=notrunc,fdatasync",
                    "status=none",
                ]
                for _base, overlay, scratch in copies
            ],
        )
        os.sync()
        offline_cpu: dict[str, float] = {}
        keep_s = _parallel(vm, [[img, "commit", "-q", "-d", c[1]] for c in copies], offline_cpu)
        os.sync()
        empty_s = _parallel(vm, [[img, "commit", "-q", c[1]] for c in copies])
        # What forgeqmp does after merging: remove the overlay file. Timed on the scratch
        # copy of each overlay (same size and layout; the overlay copy was emptied above).
        os.sync()
        rm_s = _parallel(vm, [["rm", "-f", scratch] for _b, _o, scratch in copies])
    finally:
        unlink_all(p for c in copies for p in c)
    session = run_async(_raw_enable, vm, lab, disks)
    write_data(vm, disks, mib)
    os.sync()
    raw_s = run_async(_raw_commit, vm, session)
    return {
        "forge_s": forge_s,
        "pause_ms": pause_ms,
        "raw_s": raw_s,
        "qemu_img_d_s": keep_s,
        "qemu_img_d_rm_s": keep_s + rm_s,
        "qemu_img_s": empty_s,
        "dd_s": dd_s,
        "qemu_cores": forge_cpu["proc_cores"],
        "main_loop_cores": forge_cpu["main_cores"],
        "idle_cores": forge_cpu["idle_cores"],
        "offline_idle_cores": offline_cpu["idle_cores"],
    }
