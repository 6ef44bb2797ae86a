"""The crash points (:mod:`forgeqmp.adapters.crashpoints`), each case in a child process: a crash point that
fires when it should not kills that child, never the test runner.

That every crash point is really reached by the drivers, in the order of ``STEPS``, is checked on
real QEMU (tests/integration/test_crashpoint_trace.py), not by reading the source."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping

import pytest

from forgeqmp.adapters import crashpoints

#: A child process: crash point (operation, step) reached with QEMU pid argv[3] ("" for none).
CHILD = textwrap.dedent(
    """
    import sys
    from forgeqmp.adapters import crashpoints
    pid = int(sys.argv[3]) if sys.argv[3] else None
    crashpoints.reached(sys.argv[1], sys.argv[2], pid)
    print("alive", flush=True)
    if len(sys.argv) > 4:  # the same crash point again, with another QEMU pid
        crashpoints.reached(sys.argv[1], sys.argv[2], int(sys.argv[4]))
        print("alive again", flush=True)
    """
)


def child(
    env: Mapping[str, str], operation: str, step: str, *pids: int | None
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if k not in (crashpoints.ENV, crashpoints.ENABLE_ENV)
    }
    args = [str(p) if p is not None else "" for p in pids] or [""]
    return subprocess.run(
        [sys.executable, "-c", CHILD, operation, step, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def victims() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Stand-ins for QEMU processes (killed at teardown if still alive)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def sleeper(victims: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sleep", "600"])
    victims.append(proc)
    return proc


BOTH = {crashpoints.ENABLE_ENV: "1", crashpoints.ENV: "enable:planned"}


@pytest.mark.parametrize(
    "env",
    [
        {},
        {crashpoints.ENV: "enable:planned"},  # the crash point alone: not enough
        {crashpoints.ENV: "enable:planned", crashpoints.ENABLE_ENV: "0"},
        {crashpoints.ENV: "enable:planned", crashpoints.ENABLE_ENV: "yes"},
        {crashpoints.ENABLE_ENV: "1"},  # the opt-in alone names no crash point
        {crashpoints.ENABLE_ENV: "1", crashpoints.ENV: "enable:overlays-created"},  # another step
        {crashpoints.ENABLE_ENV: "1", crashpoints.ENV: "commit:planned"},  # another operation
    ],
    ids=["none", "at-only", "enable-0", "enable-yes", "enable-only", "other-step", "other-op"],
)
def test_a_crash_point_does_nothing_unless_both_variables_ask_for_it(
    env: dict[str, str], victims: list[subprocess.Popen[bytes]]
) -> None:
    qemu = sleeper(victims)
    env = {k: (v + ":qemu" if k == crashpoints.ENV else v) for k, v in env.items()}
    for victim_env in ({k: v.removesuffix(":qemu") for k, v in env.items()}, env):
        done = child(victim_env, "enable", "planned", qemu.pid)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "alive\n"
        assert "crash point" not in done.stderr
    assert qemu.poll() is None  # never killed


def test_a_crash_point_kills_the_controller_and_says_so() -> None:
    done = child(BOTH, "enable", "planned", None)
    assert done.returncode == -9
    assert "alive" not in done.stdout
    assert "crash point enable:planned:self: SIGKILL of the controller" in done.stderr


def test_a_crash_point_kills_qemu_once_and_the_controller_carries_on(
    victims: list[subprocess.Popen[bytes]],
) -> None:
    first, second = sleeper(victims), sleeper(victims)
    env = {**BOTH, crashpoints.ENV: "discard:qemu-launched:qemu"}
    done = child(env, "discard", "qemu-launched", first.pid, second.pid)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "alive\nalive again\n"
    assert first.wait(10) == -9
    assert f"crash point discard:qemu-launched:qemu: killed QEMU pid {first.pid}" in done.stderr
    assert second.poll() is None  # fires once only: the second QEMU lives
    assert str(second.pid) not in done.stderr


def test_a_qemu_crash_point_without_a_pid_fails_loudly() -> None:
    env = {**BOTH, crashpoints.ENV: "commit:job-ready:qemu"}
    done = child(env, "commit", "job-ready", None)
    assert done.returncode == crashpoints.NOT_DONE_EXIT
    assert "alive" not in done.stdout
    assert "crash point commit:job-ready:qemu: NOT DONE: no QEMU pid" in done.stderr


def test_a_qemu_crash_point_whose_qemu_is_gone_fails_loudly() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    env = {**BOTH, crashpoints.ENV: "commit:job-ready:qemu"}
    done = child(env, "commit", "job-ready", gone.pid)
    assert done.returncode == crashpoints.NOT_DONE_EXIT
    assert "alive" not in done.stdout
    assert f"NOT DONE: QEMU pid {gone.pid} was already gone" in done.stderr


def test_every_operation_has_distinct_crash_points() -> None:
    assert set(crashpoints.STEPS) == {"enable", "commit", "discard"}
    for steps in crashpoints.STEPS.values():
        assert len(set(steps)) == len(steps)
