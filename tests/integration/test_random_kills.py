"""Random-time kills (issue 12 item 9), on real QEMU 10.0 and 7.2.

The fault matrix (test_recover.py) kills at the named crash points; a real crash has no such
courtesy. Here the controller is the CLI in a subprocess (``forgeqmp --json enable|commit|discard``)
and, at a moment drawn from a seeded ``random.Random`` over the operation's measured duration,
either the controller or, separately, QEMU is SIGKILLed. Then ``forgeqmp recover`` runs and the
operator's intent is finished through the CLI; every iteration asserts:

- no session is stuck: nothing ``creating``/``committing``/``discarding`` after recover, and the
  session ends committed, discarded or rolled back;
- nothing is lost: after a discard the original images are byte-identical to their state at
  enable and the guest reads its data of then; every acknowledged write (written in the guest,
  flushed, then the commit started) is in the disks after the commit; an enable (undone or
  finished and committed) keeps every write;
- the guest runs: a live QEMU is ``running`` after recover (never left paused by forgeqmp) and its
  shell answers; a QEMU that died leaves a record saying how to start it;
- nothing forgeqmp created is left: overlays, memory files, the record's temporary files, ``fq…``
  block nodes.

CI runs one iteration per operation, victim and build (12 in all); ``-m slow`` (``nox -s faults``)
runs ``SLOW_ITERATIONS`` more of each. The seed is ``FORGEQMP_RANDOM_KILL_SEED`` (a fixed default),
and every failure names the seed, the iteration and the delay, so it can be replayed.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import forgeqmp
from forgeqmp.core.states import State
from forgeqmp.testing import QemuBuild, QemuInstance, installed_builds

from .helpers import block_graph, run, sha256_of
from .test_recover import (
    Cell,
    Pool,
    _qemu_pid,
    _qmp,
    _recover,
    cli,
    finish,
    qemu_running,
    region_md5,
    write,
)

pytestmark = pytest.mark.qemu

SEED = os.environ.get("FORGEQMP_RANDOM_KILL_SEED", "forgeqmp-item-9")
OPERATIONS = ("enable", "commit", "discard")
VICTIMS = ("controller", "qemu")
#: Iterations per operation, victim and build in the default suite, and more under ``-m slow``.
CI_ITERATIONS = 1
SLOW_ITERATIONS = 6
_WORKING = (State.CREATING, State.COMMITTING, State.DISCARDING)


def _params() -> list[Any]:
    params = []
    for build in installed_builds() or [None]:
        name = build.name if build else "none"
        for operation in OPERATIONS:
            for victim in VICTIMS:
                for i in range(CI_ITERATIONS + SLOW_ITERATIONS):
                    marks = [pytest.mark.slow] if i >= CI_ITERATIONS else []
                    params.append(
                        pytest.param(
                            build,
                            operation,
                            victim,
                            i,
                            id=f"qemu-{name}-{operation}-{victim}-{i}",
                            marks=marks,
                        )
                    )
    return params


class Calibrated(Pool):
    """The fault matrix's VM pool, plus each operation's duration through the CLI, measured
    once per build on uninterrupted cycles (enable, commit, enable, discard, twice: the first
    save of a QEMU is a slow warm-up; the shortest run counts)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__(factory)
        self.durations: dict[tuple[str, str], float] = {}

    def duration(self, build: QemuBuild, operation: str) -> float:
        if (build.name, operation) not in self.durations:
            vm = self.get(build)
            state = Path(self.factory.mktemp(f"calibrate-{build.name}")) / "state"
            for op in ("enable", "commit", "enable", "discard") * 2:
                started = time.monotonic()
                code, status = cli(build, vm, state, op, *_op_args(op))
                took = time.monotonic() - started
                assert code == 0, (op, status)
                key = (build.name, op)
                self.durations[key] = min(self.durations.get(key, took), took)
            assert status.get("memory_restored") is True, status
            for _ in range(2):  # the CLI's start-up alone (Python, imports, the record read)
                started = time.monotonic()
                code, status = cli(build, vm, state, "status")
                took = time.monotonic() - started
                key = (build.name, "startup")
                self.durations[key] = min(self.durations.get(key, took), took)
        return self.durations[(build.name, operation)]

    def startup(self, build: QemuBuild) -> float:
        return self.durations[(build.name, "startup")]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Calibrated]:
    pool = Calibrated(tmp_path_factory)
    yield pool
    pool.close()


def _op_args(operation: str) -> tuple[str, ...]:
    return ("--all-disks",) if operation == "enable" else ()


@attrs.define
class Kill:
    """What one iteration did, for its failure message."""

    label: str
    delay: float = 0.0
    duration: float = 0.0
    landed: bool | None = None
    killed_pid: int | None = None
    #: The session's state and step as the kill left them (before recover).
    at: str = "no session"

    def note(self) -> str:
        landed = {None: "not yet", True: "during the operation", False: "after it ended"}
        return (
            f"random kill {self.label}: seed {SEED!r}, SIGKILL after {self.delay:.3f} s of a "
            f"measured {self.duration:.3f} s ({landed[self.landed]}, pid {self.killed_pid}, "
            f"left at {self.at}); "
            f"replay with FORGEQMP_RANDOM_KILL_SEED={SEED!r}"
        )


def controller_cli(
    build: QemuBuild, vm: QemuInstance, state: Path, op: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forgeqmp",
            "--qmp",
            vm.qmp_socket,
            "--state-dir",
            str(state),
            "--json",
            op,
            *_op_args(op),
        ],
        env={**build.environ()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_at_random(
    build: QemuBuild, vm: QemuInstance, state: Path, op: str, victim: str, kill: Kill
) -> None:
    """Run ``op`` through the CLI and SIGKILL ``victim`` after ``kill.delay`` seconds."""
    proc = controller_cli(build, vm, state, op)
    try:
        proc.wait(timeout=kill.delay)  # the random moment (or earlier, if the operation ended)
        kill.landed = False
    except subprocess.TimeoutExpired:
        kill.landed = True
        if victim == "controller":
            kill.killed_pid = proc.pid
            proc.kill()
        else:
            pid = _qemu_pid(vm)  # discard relaunches QEMU: whichever runs now
            if pid is not None:
                kill.killed_pid = pid
                os.kill(pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=600)  # a controller whose QEMU died carries on to its end


@pytest.mark.parametrize(("build", "operation", "victim", "iteration"), _params())
def test_random_kill(
    pool: Calibrated,
    build: QemuBuild | None,
    operation: str,
    victim: str,
    iteration: int,
    tmp_path: Path,
) -> None:
    if build is None:
        pytest.skip("no QEMU build found: run scripts/setup-system")
    label = f"{build.name}:{operation}:{victim}:{iteration}"
    kill = Kill(label)
    try:
        _iteration(pool, build, operation, victim, kill, tmp_path)
    except BaseException as exc:
        exc.add_note(kill.note())
        raise
    print(kill.note())  # which moment this iteration hit (pytest -rP shows it)


def _iteration(
    pool: Calibrated, build: QemuBuild, operation: str, victim: str, kill: Kill, tmp_path: Path
) -> None:
    kill.duration = pool.duration(build, operation)
    rng = random.Random(f"{SEED}:{kill.label}")
    # Over the operation's duration; most of the CLI's start-up (where nothing happens yet) is
    # left out, so that more kills land while forgeqmp works on QEMU.
    kill.delay = rng.uniform(min(pool.startup(build) / 2, kill.duration), kill.duration)
    vm = pool.get(build)
    state = tmp_path / "state"
    tag = f"rk{OPERATIONS.index(operation)}{victim[0]}{rng.randrange(1 << 16):04x}"
    # A at 0 before any session; for commit and discard B over it after enable, and for commit C
    # at 16 MiB where the originals hold nothing yet. Each write is flushed by the guest first.
    expected = {(d, 0): write(vm, d, f"{tag}A", 0) for d in ("d0", "d1")}
    bases = {d.name: d.path for d in vm.disks}
    originals = {name: sha256_of(path) for name, path in bases.items()}
    if operation in ("commit", "discard"):
        code, status = cli(build, vm, state, "enable", "--all-disks")
        assert code == 0, status
        originals = {name: sha256_of(path) for name, path in bases.items()}
        written = {(d, 0): write(vm, d, f"{tag}B", 0) for d in ("d0", "d1")}
        if operation == "commit":
            written |= {(d, 16): write(vm, d, f"{tag}C", 16) for d in ("d0", "d1")}
            expected = written

    started = time.monotonic()
    kill_at_random(build, vm, state, operation, victim, kill)
    left = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    if left is not None:
        kill.at = f"{left.state.value}/{left.step}" + (" paused-by-us" * left.paused_by_forgeqmp)

    code, status = cli(build, vm, state, "recover")
    record = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    # Exit 0 when recover reached a state that needs nothing more, 4 when it left a failed
    # session for the next command (the finishing step below runs it).
    unfinished = record is not None and record.state is State.FAILED and not record.rolled_back
    assert code == (4 if unfinished else 0), status
    if record is None:  # killed before enable recorded anything: nothing may have changed
        assert operation == "enable"
        assert victim == "qemu" or qemu_running(vm)
    else:
        assert record.state not in _WORKING, status
        again = run(_recover, vm.qmp_socket, state)  # idempotent
        assert again is not None
        assert attrs.evolve(again, updated_at=record.updated_at) == record
        if _qemu_pid(vm) is not None:
            runstate = run(_qmp, vm.qmp_socket, "query-status")["status"]
            assert runstate == "running", f"recover left a live guest {runstate}: {status}"
        else:
            assert record.next_step or record.state in (State.COMMITTED, State.DISCARDED)
        record = finish(build, vm, state, Cell(operation, "random", victim), record)
        if record.memory_restored is False:  # cold-started: wait for the guest
            vm.wait_ready(since=started, timeout=180)
        if operation == "discard":
            assert record.state is State.DISCARDED, record
        elif operation == "commit":
            assert record.state is State.COMMITTED, record
        else:
            assert record.state is State.COMMITTED or (
                record.state is State.FAILED and record.rolled_back
            ), record
        if record.state is State.DISCARDED or record.rolled_back:
            for name, digest in originals.items():
                assert sha256_of(bases[name]) == digest, f"{name}'s original changed"

    for (name, offset), digest in expected.items():
        assert region_md5(vm, name, offset, tmp_path) == digest, (name, offset)
    if _qemu_pid(vm) is not None:
        assert run(_qmp, vm.qmp_socket, "query-status")["status"] == "running"
        vm.check("true")  # the guest's shell answers
        assert not [n for n in block_graph(vm.qmp_socket)[1] if n.startswith("fq")]
    left = glob.glob(str(vm.workdir / "*.forge-*")) + glob.glob(str(state / "memory-*"))
    left += glob.glob(str(state / ".session.json.*.tmp"))
    assert not left, f"left behind: {left}"
