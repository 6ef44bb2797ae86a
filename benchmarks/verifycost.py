"""``python -m benchmarks.verifycost [--build 10.0] [--guest-mib 2048] [--rounds 8] [--workdir DIR]``:
what verifying the memory file costs discard, measured beside the same discard without it.

Discard hashes the memory file (:mod:`forgeqmp.adapters.memhash`) while QEMU restarts and loads
it, and resumes the guest only when both are done. On a machine whose cores the load already
fills, the digest slows the load even though it ends first. This runs, interleaved on one guest
(filled like the discard section's), forgeqmp's discard with its verification as shipped
(*verified*), with the digest on one thread instead of ``os.cpu_count()`` (*one thread*), with
the digest threads at nice 19 (*niced*), and with the verification skipped (*unverified*: the
digest recorded at enable is returned without reading the file; a measurement arm only, never a
product path). Per arm it reports the load phase (``migrate-incoming`` answered to ``cont``
sent: QEMU's load and whatever of the digest is still running) and discard-to-running (the
``running`` event's ``resume_seconds``), median (min–max). Markdown table on stdout.

It reaches into forgeqmp's internals (the digest function the discard calls, the context's
``send``) to time and to switch the arms: a measurement tool, not an example.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import forgeqmp
from forgeqmp.adapters import memhash, memwindows
from forgeqmp.core.record import MemoryRecord
from forgeqmp.ops import context as context_module
from forgeqmp.ops import discard as discard_module
from forgeqmp.testing.builds import QemuBuild, installed_builds

from .common import Lab, Settings, fill, run_async

#: The arms, in the order of the table.
ARMS = ("verified", "one thread", "niced", "unverified")


class _Arms:
    """Switches discard's verification between the arms and times its load phase."""

    def __init__(self) -> None:
        self.arm = ARMS[0]
        self.stamps: dict[str, float] = {}
        self._niced = threading.local()

    @contextmanager
    def installed(self) -> Iterator[None]:
        problem = discard_module._memory_problem
        window_digest = memwindows.window_digest
        send = context_module.Context.send
        arms = self

        def memory_problem(memory: MemoryRecord | None, memory_fd: int | None) -> str | None:
            if arms.arm == "unverified":
                return None
            if arms.arm == "one thread":
                return _one_thread(problem, memory, memory_fd)
            try:
                return problem(memory, memory_fd)
            finally:
                arms._renice(0)

        def niced_window_digest(*args: Any, **kwargs: Any) -> Any:
            if arms.arm == "niced":
                arms._renice(19)
            return window_digest(*args, **kwargs)

        async def timed_send(
            self: context_module.Context, command: Any, *, timeout: float | None = None
        ) -> Any:
            result = await send(self, command, timeout=timeout)
            if command.name in ("migrate-incoming", "cont"):
                arms.stamps[command.name] = time.monotonic()
            return result

        discard_module._memory_problem = memory_problem  # type: ignore[assignment]
        memwindows.window_digest = niced_window_digest
        context_module.Context.send = timed_send  # type: ignore[method-assign]
        try:
            yield
        finally:
            discard_module._memory_problem = problem
            memwindows.window_digest = window_digest
            context_module.Context.send = send  # type: ignore[method-assign]

    def _renice(self, nice: int) -> None:
        if getattr(self._niced, "value", 0) != nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            self._niced.value = nice


def _one_thread(
    problem: Callable[[MemoryRecord | None, int | None], str | None],
    memory: MemoryRecord | None,
    memory_fd: int | None,
) -> str | None:
    hash_fd = memhash.hash_fd

    def single(fd: int, **kwargs: Any) -> tuple[str, int]:
        kwargs["threads"] = 1
        return hash_fd(fd, **kwargs)

    memhash.hash_fd = single  # type: ignore[assignment]
    try:
        return problem(memory, memory_fd)
    finally:
        memhash.hash_fd = hash_fd


async def _enable(qmp_socket: str, state: Path) -> None:
    async with forgeqmp.connect(qmp_socket, state_dir=state) as instance:
        await instance.enable()


async def _discard(qmp_socket: str, state: Path) -> tuple[forgeqmp.SessionRecord, float]:
    """Discard; the record and its ``running`` event's ``resume_seconds``."""
    running: list[float] = []

    def on_progress(event: forgeqmp.ProgressEvent) -> None:
        if event.step == "running":
            running.append(float(event.detail["resume_seconds"]))

    async with forgeqmp.connect(qmp_socket, state_dir=state) as instance:
        record = await instance.discard(on_progress=on_progress)
    return record, running[0]


def measure(build: QemuBuild, guest_mib: int, rounds: int, workdir: Path) -> dict[str, Any]:
    settings = Settings(
        quick=False,
        runs=rounds,
        builds=[build],
        sections=["discard"],
        guest_mib=[guest_mib],
        commit_mib=[],
        commit_disks=[],
        scale_counts=[],
        scale_guest_mib=128,
        round_trips=0,
        workroot=workdir,
    )
    arms = _Arms()
    loads: dict[str, list[float]] = {arm: [] for arm in ARMS}
    resumes: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with Lab(settings) as lab, arms.installed():
        vm = lab.guest(build, guest_mib)
        touched = fill(vm, settings.touched)
        state = lab.path("state")
        for index in range(rounds):
            for arm in ARMS if index % 2 == 0 else ARMS[::-1]:
                arms.arm = ARMS[0]
                run_async(_enable, vm.qmp_socket, state)
                time.sleep(1)  # as the discard section: the save's writeback settles
                arms.arm = arm
                arms.stamps.clear()
                record, resume_seconds = run_async(_discard, vm.qmp_socket, state)
                if not record.memory_restored:
                    raise SystemExit(f"{arm}: the memory state was not restored: {record.error}")
                loads[arm].append(arms.stamps["cont"] - arms.stamps["migrate-incoming"])
                resumes[arm].append(resume_seconds)
                print(f"  round {index + 1} {arm}: {resume_seconds:.3f} s", file=sys.stderr)
                time.sleep(1)
    return {"touched": touched, "loads": loads, "resumes": resumes}


def _figure(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verifycost")
    parser.add_argument("--build", default=None, help="QEMU build (default: the newest)")
    parser.add_argument("--guest-mib", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    builds = installed_builds()
    chosen = [b for b in builds if args.build in (None, b.name)]
    if not chosen:
        parser.error(f"no installed QEMU build {args.build!r}")
    build = chosen[0]
    result = measure(build, args.guest_mib, args.rounds, args.workdir)
    print(
        f"QEMU {build.name}, {args.guest_mib} MiB guest ({result['touched']} MiB touched), "
        f"the build's default strategy, {args.rounds} rounds, {os.cpu_count()} cores\n"
    )
    print("| arm | load phase s (migrate-incoming → cont) | discard to running s |")
    print("|---|---|---|")
    for arm in ARMS:
        print(f"| {arm} | {_figure(result['loads'][arm])} | {_figure(result['resumes'][arm])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
