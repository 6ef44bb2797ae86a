"""Library overhead: a QMP round trip (``query-status``) through forgeqmp's QMPConnection vs bare
qemu.qmp's QMPClient, the feature probe forgeqmp runs once per QEMU process, and the controller's
peak RSS (a separate process doing one enable + commit, forgeqmp vs the raw recipe, vs the bare
interpreter with qemu.qmp imported)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio

from benchmarks import raw as rawqmp
from benchmarks.common import Lab, Rows, Settings, fill, ratio, rotated, run_async, say
from forgeqmp.adapters.featureprobe import probe
from forgeqmp.adapters.qmp import QMPConnection, _Deadlines
from forgeqmp.testing import QemuBuild, QemuInstance

ROOT = Path(__file__).resolve().parent.parent


async def _forge_round_trips(socket: str, n: int) -> float:
    async with QMPConnection(socket) as conn:
        t0 = time.perf_counter()
        for _ in range(n):
            await conn.execute("query-status")
        return time.perf_counter() - t0


async def _raw_round_trips(socket: str, n: int) -> float:
    async with rawqmp.Raw(socket) as raw:
        return await rawqmp.round_trips(raw, n)


async def _raw_with_deadline(socket: str, n: int) -> float:
    """Bare qemu.qmp with what forgeqmp adds per command, part 1: an anyio deadline."""
    async with rawqmp.Raw(socket) as raw:
        t0 = time.perf_counter()
        for _ in range(n):
            with anyio.fail_after(30):
                await raw.qmp.execute("query-status")
        return time.perf_counter() - t0


async def _raw_with_lock(socket: str, n: int) -> float:
    """Part 2: an anyio lock (forgeqmp serializes commands so fd passing stays in order)."""
    lock = anyio.Lock()
    async with rawqmp.Raw(socket) as raw:
        t0 = time.perf_counter()
        for _ in range(n):
            async with lock:
                await raw.qmp.execute("query-status")
        return time.perf_counter() - t0


async def _interleaved(forge_socket: str, raw_socket: str, n: int) -> tuple[float, float]:
    """µs per round trip of forgeqmp and of bare qemu.qmp, one command of each in turn (the
    first one alternating), each on its own QMP socket of one QEMU: both see the same moment
    of the machine, so its noise cancels out of their ratio."""
    forge_s = raw_s = 0.0
    async with QMPConnection(forge_socket) as conn, rawqmp.Raw(raw_socket) as raw:
        for _ in range(50):  # warm up both
            await conn.execute("query-status")
            await raw.qmp.execute("query-status")
        for i in range(n):
            for which in (0, 1) if i % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                if which == 0:
                    await conn.execute("query-status")
                    forge_s += time.perf_counter() - t0
                else:
                    await raw.qmp.execute("query-status")
                    raw_s += time.perf_counter() - t0
    return forge_s / n * 1e6, raw_s / n * 1e6


def _bare_qemu(lab: Lab, build: QemuBuild) -> tuple[str, str]:
    """A QEMU with no guest (``-machine none``) and two QMP sockets, stopped at the run's end."""
    forge_socket, raw_socket = str(lab.path("forge.qmp")), str(lab.path("raw.qmp"))
    process = subprocess.Popen(
        [
            str(build.system),
            "-machine",
            "none",
            "-display",
            "none",
            "-nodefaults",
            "-qmp",
            f"unix:{forge_socket},server=on,wait=off",
            "-qmp",
            f"unix:{raw_socket},server=on,wait=off",
        ],
        env={**os.environ, **build.env},
        stdin=subprocess.DEVNULL,
    )
    lab.adopt(process)
    deadline = time.monotonic() + 30
    while not (os.path.exists(forge_socket) and os.path.exists(raw_socket)):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the bare QEMU did not start (exit status {process.poll()})")
        time.sleep(0.02)
    return forge_socket, raw_socket


async def _layers(n: int) -> dict[str, float]:
    """µs per use of each layer forgeqmp wraps a command in (and of cheaper alternatives), around
    nothing: the per-command CPU cost that no QMP latency hides."""

    async def per_use(make: Callable[[], Any], *, is_async: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            if is_async:
                async with make():
                    pass
            else:
                with make():
                    pass
        return (time.perf_counter() - t0) / n * 1e6

    lock, fast = anyio.Lock(), anyio.Lock(fast_acquire=True)
    deadlines = _Deadlines()
    return {
        "layer_lock_us": await per_use(lambda: lock, is_async=True),
        "layer_fast_lock_us": await per_use(lambda: fast, is_async=True),
        "layer_fail_after_us": await per_use(lambda: anyio.fail_after(30), is_async=False),
        "layer_asyncio_timeout_us": await per_use(lambda: asyncio.timeout(30), is_async=True),
        "layer_shared_deadline_us": await per_use(
            lambda: _shared_deadline(deadlines), is_async=False
        ),
    }


@contextlib.contextmanager
def _shared_deadline(deadlines: _Deadlines) -> Iterator[None]:
    """What QMPConnection wraps each command in: a deadline on the connection's one timer."""
    deadline = deadlines.start(30)
    try:
        yield
    finally:
        deadline.finish()


#: Round-trip variants: forgeqmp, bare qemu.qmp, and bare plus each layer forgeqmp adds.
ROUND_TRIPS = {
    "forgeqmp": _forge_round_trips,
    "raw": _raw_round_trips,
    "raw_deadline": _raw_with_deadline,
    "raw_lock": _raw_with_lock,
}


async def _probe(socket: str) -> float:
    async with QMPConnection(socket) as conn:
        t0 = time.perf_counter()
        await probe(conn)
        return time.perf_counter() - t0


def controller(
    vm: QemuInstance | None, lab: Lab, impl: str, *sockets: str, cycle: str = "commit"
) -> dict[str, Any]:
    """Run :mod:`benchmarks.controller` in its own process; its JSON result."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.controller",
        "--impl",
        impl,
        "--cycle",
        cycle,
        "--state-root",
        str(lab.path(f"controller-{impl}")),
    ]
    if vm is not None:
        argv += ["--qemu-img", str(vm.build.img)]
    done = subprocess.run(
        [*argv, *sockets], cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the controller failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(lab: Lab, settings: Settings, rows: Rows) -> None:
    build = settings.newest
    vm = lab.guest(build, 512)
    try:
        touched = fill(vm, settings.touched)
        n = settings.round_trips
        say(f"  overhead: QEMU {build.name}, {n} round trips per run")
        for fn in ROUND_TRIPS.values():  # warm up every path
            run_async(fn, vm.qmp_socket, n // 10)
        rt = rows.get(build=build.name, what="QMP round trip (query-status)")
        # Short blocks, every variant in each (a different one first each time): the machine's
        # noise hits all of them alike.
        # The ratio is taken within each round (forgeqmp's block over raw's, measured back to
        # back) and its median reported: the machine's noise moves both blocks of a round alike,
        # and swings between rounds of ±15 % here, far more than the overhead looked for.
        block = max(50, n // 4)
        for run in range(settings.runs * 8):
            took_us: dict[str, float] = {}
            for impl in rotated(list(ROUND_TRIPS), run):
                took_us[impl] = run_async(ROUND_TRIPS[impl], vm.qmp_socket, block) / block * 1e6
                rt.add(f"{impl}_us", took_us[impl])
            rt.add("paired_ratio", took_us["forgeqmp"] / took_us["raw"])
        for _run in range(settings.runs):
            for name, value in run_async(_layers, n * 10).items():
                rt.add(name, value)
        rt.extra["forge_vs_raw"] = round(rt.median("paired_ratio"), 3)
        say(
            f"    round trip (forgeqmp/raw in a round, median: {rt.extra['forge_vs_raw']:.3f}): "
            f"forgeqmp {rt.median('forgeqmp_us'):.0f} us, raw "
            f"{rt.median('raw_us'):.0f} us, raw + deadline {rt.median('raw_deadline_us'):.0f} "
            f"us, raw + lock {rt.median('raw_lock_us'):.0f} us"
        )

        # The same, one command of each in turn on a QEMU without a guest: the library's own
        # cost per round trip, without the guest's vCPU (under TCG it holds QEMU's big lock at
        # moments no block-level interleaving can share out evenly). The target's row.
        forge_socket, raw_socket = _bare_qemu(lab, build)
        it = rows.get(build=build.name, what="QMP round trip, interleaved, QEMU without a guest")
        for _run in range(settings.runs):
            forge_us, raw_us = run_async(_interleaved, forge_socket, raw_socket, n)
            it.add("forgeqmp_us", forge_us)
            it.add("raw_us", raw_us)
            it.add("paired_ratio", forge_us / raw_us)
        it.extra["forge_vs_raw"] = round(it.median("paired_ratio"), 3)
        say(
            f"    interleaved round trip, no guest: forgeqmp {it.median('forgeqmp_us'):.0f} us, "
            f"raw {it.median('raw_us'):.0f} us ({it.extra['forge_vs_raw']:.3f})"
        )

        pr = rows.get(build=build.name, what="feature probe (once per QEMU process)")
        for _run in range(settings.runs):
            pr.add("forgeqmp_ms", run_async(_probe, vm.qmp_socket) * 1000)

        rss = rows.get(
            build=build.name,
            what=f"controller peak RSS, enable + commit of a "
            f"{vm.memory_mib} MiB guest ({touched} MiB touched)",
        )
        for run in range(settings.runs):
            order = ("forgeqmp", "raw") if run % 2 == 0 else ("raw", "forgeqmp")
            for impl in order:
                got = controller(vm, lab, impl, vm.qmp_socket)
                rss.add(f"{impl}_mib", got["peak_rss_mib"])
                rss.add(f"{impl}_import_mib", got["import_rss_mib"])
                rss.add(f"{impl}_total_s", got["instances"][0]["total_s"])
            rss.add("floor_mib", controller(None, lab, "none")["peak_rss_mib"])
        r = ratio(rss.median("forgeqmp_mib"), rss.median("raw_mib"))
        rss.extra["forge_vs_raw"] = round(r, 3) if r else None
        say(
            f"    peak RSS: forgeqmp {rss.median('forgeqmp_mib'):.1f} MiB, raw "
            f"{rss.median('raw_mib'):.1f} MiB, interpreter + qemu.qmp "
            f"{rss.median('floor_mib'):.1f} MiB"
        )
    finally:
        lab.drop(vm)
