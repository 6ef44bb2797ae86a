"""The main job: a real VM forged, changed, discarded, forged again, changed and committed.

Run it with ``./scripts/demo`` (or ``nox -s demo``), which installs QEMU and the test guest first::

    python examples/demo.py                 # QEMU 10.x, 512 MiB guest, TCG
    python examples/demo.py --qemu 7.2      # the QEMU 7.2 build installed side by side
    python examples/demo.py --memory 2048 --accel kvm

It boots the test guest of :mod:`forgeqmp.testing` with two disks (a qcow2 and a raw image), whose
serial console prints a counter several times a second, and drives it through :mod:`forgeqmp.sync`
(the blocking facade over the async API). Every step prints its timing; the guest pause is QEMU's
own STOP→RESUME interval. Everything it starts and creates is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import forgeqmp
import forgeqmp.sync
from forgeqmp.testing import DiskSpec, QemuInstance, installed_builds, pattern_md5

T = TypeVar("T")
DATA_MIB = 16  # what the demo writes per disk and per step


def say(text: str = "") -> None:
    print(text, flush=True)


@contextmanager
def step(title: str) -> Iterator[None]:
    say(f"\n== {title}")
    started = time.monotonic()
    yield
    say(f"   ({time.monotonic() - started:.2f} s)")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def largest_counter_gap(vm: QemuInstance, since: float, until: float) -> float:
    """The longest time (s) between two counter lines around [since, until] (host clock), from
    the last line before ``since`` to the first after ``until``."""
    times = [t for t, _boot, _n in vm.counter_history()]
    first = max((i for i, t in enumerate(times) if t <= since), default=0)
    last = min((i for i, t in enumerate(times) if t >= until), default=len(times) - 1)
    return max((b - a for a, b in itertools.pairwise(times[first : last + 1])), default=0.0)


def read_both(vm: QemuInstance) -> dict[str, str]:
    return {disk.name: vm.disk_md5(disk.name, DATA_MIB) for disk in vm.disks}


def write_both(vm: QemuInstance, seed: str) -> dict[str, str]:
    return {disk.name: vm.write_disk(disk.name, DATA_MIB, seed=seed) for disk in vm.disks}


def show_disks(label: str, md5s: dict[str, str], known: dict[str, dict[str, str]]) -> None:
    for name, md5 in md5s.items():
        which = next((seed for seed, sums in known.items() if sums.get(name) == md5), "?")
        say(f"   {label} {name}: {DATA_MIB} MiB md5 {md5[:12]}… = the {which!r} data")


def progress(event: forgeqmp.ProgressEvent) -> None:
    detail = dict(event.detail)
    if "done" in detail and "total" in detail and detail["total"]:
        pct = 100 * detail["done"] / detail["total"]
        say(f"   {event.operation} {detail.get('disk', '')}: {event.step} {pct:5.1f} %")
    elif event.step != "progress":
        disk = f" {detail['disk']}" if "disk" in detail else ""
        say(f"   {event.operation}{disk}: {event.step}")


def demo(qemu: str, memory_mib: int, accel: str, workdir: str) -> None:
    builds = {b.name: b for b in installed_builds()}
    if not builds:
        sys.exit("no QEMU found: run ./scripts/setup-system (./scripts/demo does it for you)")
    name = qemu or next(iter(builds))
    if name not in builds:
        sys.exit(f"QEMU {name} is not installed; installed: {', '.join(builds)}")
    build = builds[name]
    state_dir = os.path.join(workdir, "state")
    disks = (DiskSpec("disk0", "qcow2", 128), DiskSpec("disk1", "raw", 64))
    expected = {
        seed: {d.name: pattern_md5(seed, 0, DATA_MIB) for d in disks}
        for seed in ("before", "trial", "keep")
    }

    with QemuInstance(
        build, os.path.join(workdir, "vm"), disks, memory_mib=memory_mib, accel=accel
    ) as vm:
        say(f"QEMU {build.version} ({accel}), {memory_mib} MiB guest, disks: "
            + ", ".join(f"{d.name} ({d.format}, {d.size_mib} MiB)" for d in disks))  # fmt: skip

        with step("1. the guest is up"):
            boot, n = vm.wait_counter()
            say(f"   boot id {boot}, counter {n}")
            write_both(vm, "before")
            show_disks("wrote", read_both(vm), expected)

        with forgeqmp.sync.connect(vm.qmp_socket, state_dir=state_dir) as forge:
            forge.follow(lambda record: say(f"   state → {record.state.value}"))

            with step("2. enable: snapshot both disks and the memory, while the guest runs"):
                at_enable = vm.counter()[1]
                session, took = timed(lambda: forge.enable(all_disks=True))
                sessions = [session]
                say(f"   guest pause {session.pause_ms:.1f} ms, enable {took:.2f} s, "
                    f"memory file {(session.memory.size or 0) / 2**20:.0f} MiB "
                    f"({session.strategy}); counter was {at_enable}")  # fmt: skip

            with step("3. try things: new data on both disks"):
                write_both(vm, "trial")
                show_disks("wrote", read_both(vm), expected)
                _, n = vm.wait_counter(min_value=vm.counter()[1] + 5)
                say(f"   counter moved on to {n}")

            with step("4. discard: disks back, memory back, same processes"):
                before_discard = time.monotonic()
                done, took = timed(forge.discard)
                boot2, resumed = vm.wait_counter(since=before_discard)
                say(f"   running again {done.resume_seconds or took:.2f} s after the call; "
                    f"memory restored: {done.memory_restored}")  # fmt: skip
                say(f"   counter resumed at {resumed} (was {at_enable} at enable, {n} before "
                    f"discard), same boot: {boot2 == boot}")  # fmt: skip
                if not done.memory_restored:  # a cold boot: wait for the new guest's shell
                    vm.wait_ready(new_boot=True)
                show_disks("read", read_both(vm), expected)

        # discard restarted QEMU: a new connection for the new process.
        with forgeqmp.sync.connect(vm.qmp_socket, state_dir=state_dir) as forge:
            forge.follow(lambda record: say(f"   state → {record.state.value}"))

            with step("5. enable again"):
                session, took = timed(lambda: forge.enable(all_disks=True))
                sessions.append(session)
                say(f"   guest pause {session.pause_ms:.1f} ms, enable {took:.2f} s")

            with step("6. keep this time: new data on both disks"):
                write_both(vm, "keep")
                show_disks("wrote", read_both(vm), expected)

            with step("7. commit: merge the overlays into the originals, live"):
                started = time.monotonic()
                done, took = timed(lambda: forge.commit(on_progress=progress))
                ended = time.monotonic()
                vm.wait_counter(since=ended)  # the first line after the commit closes the window
                gap = largest_counter_gap(vm, started, ended)
                say(f"   committed in {took:.2f} s; the guest's counter never stopped for more "
                    f"than {gap * 1000:.0f} ms")  # fmt: skip
                show_disks("read", read_both(vm), expected)

        with step("8. the original images hold the kept data (checked on the host)"):
            vm.stop()
            raw = next(d for d in vm.disks if d.format == "raw")
            with open(raw.path, "rb") as f:
                host_md5 = hashlib.md5(f.read(DATA_MIB << 20), usedforsecurity=False).hexdigest()
            ok = host_md5 == expected["keep"][raw.name]
            say(f"   {raw.path}: {'the kept data' if ok else 'UNEXPECTED CONTENT'}")
            created = [d.overlay_file for s in sessions for d in s.disks]
            created += [s.memory.path for s in sessions if s.memory]
            leftovers = [path for path in created if path and os.path.exists(path)]
            say(f"   overlay or memory files left: {leftovers or 'none'}")
            if not ok or leftovers:
                sys.exit("the demo found a problem (see above)")
    say("\ndone: everything the demo started was stopped and its files removed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu", default="", help="QEMU build: 10.0 (default: newest) or 7.2")
    parser.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (default 512)")
    parser.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="forgeqmp-demo-") as workdir:
        demo(args.qemu, args.memory, args.accel, workdir)


if __name__ == "__main__":
    main()
