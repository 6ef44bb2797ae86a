"""Enable: guest pause, counter stall, save rate and total time of every strategy forgeqmp offers
on a build, each next to the raw recipe with the same strategy and transport, plus a raw plain
``file:`` save; idle and while the guest dirties memory.

Each run is cleaned up by a commit of the (nearly empty) overlay, untimed, so the next one starts
from the same guest. The variants take turns within a run (a different one first each run),
grouped by strategy, and each group starts with an untimed raw save of its strategy: a save
right after one of another strategy (or the first of a QEMU process) is several times slower,
whoever drives it (a ``mapped-ram`` save at 2 GiB: 2.6-3.9 s after a ``precopy`` one, 0.5-0.7 s
after a ``mapped-ram`` one), which would otherwise be charged to whichever variant comes first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs

import forgeqmp
from benchmarks import raw as rawqmp
from benchmarks.common import (
    CpuMeter,
    Dirtier,
    Lab,
    Row,
    Rows,
    Settings,
    allocated_bytes,
    counter_stall_ms,
    next_counter_after,
    ratio,
    rotated,
    run_async,
    say,
    unlink_all,
)
from forgeqmp.adapters import hashahead
from forgeqmp.core.plans.enable import Strategy, choose_strategy, default_strategy
from forgeqmp.testing import QemuInstance


@dataclass(frozen=True)
class Variant:
    """One way of saving: who drives it (forgeqmp or raw), strategy and transport."""

    impl: str
    strategy: str
    transport: str
    #: forgeqmp picks the transport itself; ``forced`` means the benchmark overrode its choice.
    forced: bool = False
    #: False: forgeqmp's hashing of the stream while QEMU writes it is turned off, so the whole
    #: digest is computed after the save (what hashing ahead gains or costs, side by side).
    hash_ahead: bool = True
    #: What forgeqmp does when no strategy is asked for on this build (the targets' case).
    default: bool = False

    @property
    def label(self) -> str:
        return (
            f"{self.strategy} / {self.transport}"
            + (" (forced)" if self.forced else "")
            + ("" if self.hash_ahead else " (digest after the save)")
        )


async def _features(socket: str) -> forgeqmp.Features:
    async with forgeqmp.connect(socket) as vm:
        return await vm.features()


def variants(vm: QemuInstance) -> list[Variant]:
    """forgeqmp's strategies on this build (its own transport choice, plus precopy forced onto
    ``fd:`` where it would pick the file transport), each with its raw twin, and raw ``file:``."""
    features = run_async(_features, vm.qmp_socket)
    default = default_strategy(features)
    found: list[Variant] = []
    for strategy in Strategy:
        try:
            _s, transport = choose_strategy(features, strategy)
        except forgeqmp.FeatureMissing:
            continue
        found.append(
            Variant("forgeqmp", strategy.value, transport.value, default=strategy is default)
        )
        found.append(Variant("raw", strategy.value, transport.value))
        if strategy is Strategy.PRECOPY:
            found.append(Variant("forgeqmp", strategy.value, transport.value, hash_ahead=False))
        if strategy is Strategy.PRECOPY and transport.value != "fd" and features.fd_transport:
            found.append(Variant("forgeqmp", strategy.value, "fd", forced=True))
            found.append(Variant("raw", strategy.value, "fd"))
    if features.file_transport:
        found.append(Variant("raw", "precopy", "file"))
    return found


def _without_file_transport(features: forgeqmp.Features) -> forgeqmp.Features:
    return attrs.evolve(features, migration_transports=frozenset())


async def forge_once(vm: QemuInstance, state_dir: Path, variant: Variant) -> dict[str, Any]:
    """One forgeqmp enable (timed), then an untimed commit to get the guest back."""
    progress: dict[str, Any] = {}

    def on_progress(event: forgeqmp.ProgressEvent) -> None:
        if event.step == "active":
            progress.update(event.detail)

    async with forgeqmp.connect(vm.qmp_socket, state_dir=state_dir) as instance:
        features = await instance.features()  # probed once per QEMU process: not timed
        if variant.forced:
            # forgeqmp has no public transport option: make its probe see no file transport.
            instance._ctx._features = (instance.conn.peer.pid, _without_file_transport(features))
        start = hashahead.HashAhead.start
        if not variant.hash_ahead:
            hashahead.HashAhead.start = _no_hashing_ahead  # type: ignore[method-assign,assignment]
        try:
            cpu = CpuMeter(vm.pid)
            t0 = time.monotonic()
            record = await instance.enable(strategy=variant.strategy, on_progress=on_progress)
            t1 = time.monotonic()
            used = cpu.stop()
        finally:
            hashahead.HashAhead.start = start  # type: ignore[method-assign]
        migration = await instance.conn.execute("query-migrate")
        assert record.memory is not None
        written = allocated_bytes(record.memory.path)
        fsync_s = _fsync_s(record.memory.path)
        await instance.commit()
    return {
        "t0": t0,
        "t1": t1,
        "pause_ms": record.pause_ms,
        "written": written,
        "migration": migration,
        "save_s": progress.get("save_seconds"),
        "fsync_s": fsync_s,
        "digest_s": progress.get("digest_seconds"),
        "ahead_mib": progress.get("hashed_while_saving", 0) / 2**20,
        **used,
    }


def _no_hashing_ahead(_fd: int) -> None:
    """HashAhead.start turned off: the digest is all computed after the save."""


def _fsync_s(memory_file: str) -> float:
    """Seconds an fsync of the memory file takes right after the enable (untimed for it): the
    storage's time to have the memory state on disk, which Active does not wait for."""
    fd = os.open(memory_file, os.O_RDONLY)
    try:
        t0 = time.monotonic()
        os.fsync(fd)
        return time.monotonic() - t0
    finally:
        os.close(fd)


async def raw_once(vm: QemuInstance, lab: Lab, variant: Variant) -> dict[str, Any]:
    """One raw enable (timed), then an untimed raw commit."""
    memory = str(lab.path("raw-memory.bin"))
    try:
        async with rawqmp.Raw(vm.qmp_socket) as raw:
            cpu = CpuMeter(vm.pid)
            t0 = time.monotonic()
            targets = (await rawqmp.disks(raw))[:1]
            session = await rawqmp.enable(
                raw,
                targets,
                memory,
                strategy=variant.strategy,
                transport=variant.transport,
                qemu_img=str(vm.build.img),
                env=vm.build.environ(),
                tag=os.urandom(3).hex(),
            )
            t1 = time.monotonic()
            used = cpu.stop()
            migration = await raw.cmd("query-migrate")
            written = allocated_bytes(memory)
            await rawqmp.commit(raw, session)
    finally:
        unlink_all([memory])
    return {
        "t0": t0,
        "t1": t1,
        "pause_ms": session.pause_ms,
        "written": written,
        "migration": migration,
        "save_s": session.save_s,
        **used,
    }


def measure(
    vm: QemuInstance, lab: Lab, settings: Settings, rows: Rows, guest_mib: int, touched_mib: int
) -> None:
    """The enable matrix on one (filled) guest: every variant, idle then dirtying."""
    build = vm.build.name
    state_dir = lab.path("state-enable")
    found = variants(vm)
    dirtier = Dirtier(vm)
    rate = dirtier.measure()
    say(
        f"  enable: QEMU {build}, {guest_mib} MiB ({touched_mib} MiB touched), "
        f"{len(found)} variants, dirtier {rate:.0f} MB/s"
    )
    # The first save of a QEMU process is several times slower than the next ones, whoever
    # drives it (measured: 3.2-3.7 s of QEMU time instead of 0.5 s at 2 GiB, the guest pause
    # unchanged): one untimed forgeqmp enable first, so no variant of the matrix pays it. Its
    # figures are kept as a row of their own (one run: there is only one first save).
    first = next(v for v in found if v.impl == "forgeqmp")
    got = run_async(forge_once, vm, state_dir, first)
    next_counter_after(vm, time.monotonic())
    row = rows.get(
        build=build,
        guest_mib=guest_mib,
        load="idle, first save of this QEMU (1 run)",
        impl=first.impl,
        variant=first.label,
    )
    row.case.update(strategy=first.strategy, transport=first.transport, touched_mib=touched_mib)
    _add_figures(row, vm, got)
    groups: dict[str, list[Variant]] = {}
    for variant in found:
        groups.setdefault(variant.strategy, []).append(variant)
    for load in ("idle", "dirtying"):
        if load == "dirtying":
            dirtier.start()
        try:
            for run in range(settings.runs):
                for group in rotated(list(groups.values()), run):
                    run_async(raw_once, vm, lab, next(v for v in group if v.impl == "raw"))
                    _measure_group(vm, lab, rows, group, run, state_dir, load, rate, touched_mib)
        finally:
            dirtier.stop()
    _ratios(rows, build, guest_mib)


def _measure_group(
    vm: QemuInstance,
    lab: Lab,
    rows: Rows,
    group: list[Variant],
    run: int,
    state_dir: Path,
    load: str,
    rate: float,
    touched_mib: int,
) -> None:
    """One timed run of each variant of one strategy (after that group's warm-up save)."""
    build = vm.build.name
    for variant in rotated(group, run):
        if variant.impl == "forgeqmp":
            got = run_async(forge_once, vm, state_dir, variant)
        else:
            got = run_async(raw_once, vm, lab, variant)
        # A line after the cleanup too, so the next run's window does not start
        # inside this one's cleanup (forgeqmp's commit pauses the guest to pivot).
        next_counter_after(vm, time.monotonic())
        row = rows.get(
            build=build,
            guest_mib=vm.memory_mib,
            load=load,
            impl=variant.impl,
            variant=variant.label,
        )
        row.case.update(
            strategy=variant.strategy,
            transport=variant.transport,
            touched_mib=touched_mib,
            default=variant.default,
        )
        if load == "dirtying":
            row.extra["dirty_mb_s"] = round(rate)
        stall = _add_figures(row, vm, got)
        say(
            f"    {load:8} run {run + 1} {variant.impl:8} {variant.label:32} "
            f"pause {got['pause_ms'] or 0:7.1f} ms  stall {stall or 0:6.0f} ms  "
            f"total {got['t1'] - got['t0']:.2f} s"
        )


def _add_figures(row: Row, vm: QemuInstance, got: dict[str, Any]) -> float | None:
    """One run's figures into ``row``; returns the counter stall (ms)."""
    stall = counter_stall_ms(vm, got["t0"], got["t1"])
    qemu_ms = float(got["migration"].get("total-time") or 0) or None
    row.add("pause_ms", got["pause_ms"])
    row.add("stall_ms", stall)
    row.add("qemu_downtime_ms", got["migration"].get("downtime"))
    row.add("save_s", qemu_ms / 1000 if qemu_ms else got["save_s"])
    if qemu_ms:
        row.add("save_gb_s", got["written"] / 1e9 / (qemu_ms / 1000))
    row.add("written_mib", got["written"] / 2**20)
    row.add("total_s", got["t1"] - got["t0"])
    for name in ("fsync_s", "digest_s", "ahead_mib", "proc_cores", "idle_cores"):
        if got.get(name) is not None:
            row.add(name, got[name])
    return stall


def _ratios(rows: Rows, build: str, guest_mib: int) -> None:
    """forgeqmp / raw of the same strategy and transport (medians), per load."""
    for row in rows:
        c = row.case
        if c["build"] != build or c["guest_mib"] != guest_mib or c["impl"] != "forgeqmp":
            continue
        twin = rows.find(
            build=build,
            guest_mib=guest_mib,
            load=c["load"],
            impl="raw",
            strategy=c["strategy"],
            transport=c["transport"],
        )
        if twin is None:
            continue
        for name in ("pause_ms", "total_s", "save_s"):
            r = ratio(row.median(name), twin.median(name))
            if r is not None:
                row.extra[f"{name}_vs_raw"] = round(r, 3)
        # The save alone: the raw twin's, with nothing beside it (forgeqmp's own save may be
        # slowed by what runs beside it, which would flatter a ratio to it).
        r = ratio(row.median("total_s"), twin.median("save_s"))
        if r is not None:
            row.extra["total_vs_raw_save"] = round(r, 3)
