"""Discard: from the call to the VM running again (``cont`` done: forgeqmp's ``running`` event; the
call returns after removing the files) and to the guest's first counter line, forgeqmp vs a
bare ``migrate-incoming`` of the *same* memory file (the raw sequence).

Each run: a forgeqmp enable (untimed) whose memory file is hard-linked aside, forgeqmp's discard
(timed; it verifies the file's digest, XXH3-128 of its data extents, while QEMU restarts and
loads it), then the raw sequence
restoring the linked file (timed; no verification). The parts of the raw sequence (quit, launch,
load) and the verification alone are timed too: they say where the time goes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import forgeqmp
from benchmarks import raw as rawqmp
from benchmarks.common import (
    CpuMeter,
    Lab,
    Rows,
    Settings,
    ratio,
    restored_counter_after,
    rotated,
    run_async,
    say,
)
from forgeqmp.adapters import memhash
from forgeqmp.core.plans.enable import Strategy, choose_strategy, default_strategy
from forgeqmp.testing import QemuInstance

#: Capabilities a load of a save with this strategy needs on the destination.
_LOAD_CAPS = {"mapped-ram": ("multifd", "mapped-ram")}


async def _enable(vm: QemuInstance, state_dir: Path, strategy: str) -> forgeqmp.SessionRecord:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state_dir) as instance:
        return await instance.enable(strategy=strategy)


async def _discard(
    vm: QemuInstance, state_dir: Path
) -> tuple[forgeqmp.SessionRecord, float, float, float, float | None]:
    """forgeqmp's discard: the record, and when it was called, when the VM ran again (its
    ``running`` progress event, sent once ``cont`` is done), when the call returned (after
    removing the overlays and the memory file), and the machine's idle cores until running."""
    running: list[float] = []

    def on_progress(event: forgeqmp.ProgressEvent) -> None:
        if event.step == "running":
            running.append(time.monotonic())
            idle.update(cpu.stop())

    idle: dict[str, float] = {}
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state_dir) as instance:
        cpu = CpuMeter()
        t0 = time.monotonic()
        record = await instance.discard(on_progress=on_progress)
        t1 = time.monotonic()
        return record, t0, running[0] if running else t1, t1, idle.get("idle_cores")


async def _raw_discard(
    vm: QemuInstance, memory: str, transport: str, caps: tuple[str, ...], log: str
) -> tuple[rawqmp.RawRestore, float, float]:
    """The raw restore: its timings, when it began, and the machine's idle cores during it."""
    raw = await rawqmp.Raw(vm.qmp_socket).connect()
    pid = vm.pid
    cpu = CpuMeter()
    t0 = time.monotonic()
    try:
        restored = await rawqmp.discard(
            raw,
            pid,
            vm.argv,
            str(vm.workdir),
            vm.build.environ(),
            memory,
            transport=transport,
            capabilities=caps,
            log=log,
        )
        idle = cpu.stop()["idle_cores"]
    finally:
        await raw.close()
    return restored, t0, idle


async def _features(socket: str) -> forgeqmp.Features:
    async with forgeqmp.connect(socket) as vm:
        return await vm.features()


def measure(vm: QemuInstance, lab: Lab, settings: Settings, rows: Rows, guest_mib: int) -> None:
    """The discard comparison on one (filled) guest, for precopy and (where offered) mapped-ram."""
    build = vm.build.name
    features = run_async(_features, vm.qmp_socket)
    strategies = []
    for strategy in (Strategy.PRECOPY, Strategy.MAPPED_RAM):
        try:
            choose_strategy(features, strategy)
        except forgeqmp.FeatureMissing:
            continue
        strategies.append(strategy.value)
    transport = "file" if features.file_transport else "fd"
    default = default_strategy(features).value
    state_dir = lab.path("state-discard")
    say(f"  discard: QEMU {build}, {guest_mib} MiB, strategies {', '.join(strategies)}")
    for run in range(settings.runs):
        for strategy in rotated(strategies, run):
            record = run_async(_enable, vm, state_dir, strategy)
            assert record.memory is not None
            kept = str(lab.path("kept-memory.bin"))
            os.link(record.memory.path, kept)
            try:
                got = _one(vm, lab, state_dir, kept, strategy, transport)
            finally:
                os.unlink(kept)
            row = rows.get(build=build, guest_mib=guest_mib, strategy=strategy)
            row.case["default"] = strategy == default
            for name, value in got.items():
                row.add(name, value)
            say(
                f"    run {run + 1} {strategy:10} forgeqmp {got['forge_s']:.2f} s (to counter "
                f"{got['forge_counter_s']:.2f} s), raw {got['raw_s']:.2f} s (launch "
                f"{got['raw_launch_s']:.2f} + load {got['raw_load_s']:.2f}), verify alone "
                f"{got['verify_s']:.2f} s"
            )
    for row in rows:
        if row.case["build"] == build and row.case["guest_mib"] == guest_mib:
            r = ratio(row.median("forge_s"), row.median("raw_s"))
            if r is not None:
                row.extra["forge_vs_raw"] = round(r, 3)


def _one(
    vm: QemuInstance, lab: Lab, state_dir: Path, kept: str, strategy: str, transport: str
) -> dict[str, Any]:
    done, t0, t_running, t1, forge_idle = run_async(_discard, vm, state_dir)
    if not done.memory_restored:
        raise RuntimeError(f"forgeqmp's discard did not restore the memory: {done.error}")
    forge_counter = restored_counter_after(vm, t0, t_running) - t0
    started = time.monotonic()
    memhash.hash_file(kept)  # what forgeqmp verifies, alone (the file is in the page cache)
    verify_s = time.monotonic() - started
    size = os.stat(kept).st_blocks * 512
    restored, r0, raw_idle = run_async(
        _raw_discard,
        vm,
        kept,
        transport,
        _LOAD_CAPS.get(strategy, ()),
        str(lab.path("raw-qemu.log")),
    )
    lab.adopt(restored.process)
    timings = restored.timings
    raw_counter = (
        restored_counter_after(
            vm, r0, r0 + timings["quit_s"] + timings["launch_s"] + timings["load_s"]
        )
        - r0
    )
    lab.reap()
    return {
        "forge_s": t_running - t0,
        "forge_call_s": t1 - t0,
        "forge_resume_s": done.resume_seconds,
        "forge_counter_s": forge_counter,
        "raw_s": restored.timings["total_s"],
        "raw_quit_s": restored.timings["quit_s"],
        "raw_launch_s": restored.timings["launch_s"],
        "raw_load_s": restored.timings["load_s"],
        "raw_counter_s": raw_counter,
        "verify_s": verify_s,
        "memory_mib": size / 2**20,
        "forge_idle_cores": forge_idle,
        "raw_idle_cores": raw_idle,
    }
