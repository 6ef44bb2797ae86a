"""Deterministic crash points, for the fault-matrix tests.

The enable, commit and discard drivers call :func:`reached` at every step boundary (after the
record of the step is on disk). Normally it returns at once. Only with **both**
``FORGEQMP_TEST_CRASH_ENABLE=1`` and ``FORGEQMP_TEST_CRASH_AT=<operation>:<step>`` set does it kill
the controlling process right there with SIGKILL (no cleanup, no ``finally``: what a crash or an
OOM kill does); with ``<operation>:<step>:qemu`` it SIGKILLs the QEMU process instead (once) and
lets the controller carry on, as when QEMU crashes under it. The second, explicit opt-in means a
stray ``FORGEQMP_TEST_CRASH_AT`` in a production environment can never make forgeqmp kill itself
or a customer's QEMU.

When a crash point fires it says so on stderr first (``forgeqmp: crash point ...``), so a test can
tell the point was really reached and QEMU really killed. A QEMU crash point that cannot do its
job (no QEMU pid known, the process already gone, or still alive after the SIGKILL) does not
return silently: it reports that on stderr and ends the controller with exit status
:data:`NOT_DONE_EXIT`, so the cell fails instead of testing nothing.

A second test-only hook lives here for the same reason: with ``FORGEQMP_TEST_CRASH_ENABLE=1``
and ``FORGEQMP_TEST_COMMIT_SPEED=<bytes/s>``, :func:`commit_speed` makes the live commit start its
``block-commit`` jobs with that ``speed``, so a test can make the copy slower than a guest's
writes without needing a fast writer (test only: never set it in production).

Only these functions read the variables; nothing else in forgeqmp changes behaviour for tests.
:data:`STEPS` lists the crash points of each operation in the order they are reached (the step
enums of :mod:`forgeqmp.core.steps`; recover, which switches disks the way commit does, passes
commit's ``pivoting``, ``pivoted`` and ``disk-recorded`` under its own name).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NoReturn

from forgeqmp.adapters.process import wait_gone
from forgeqmp.core.steps import OPERATION_STEPS, ThrottleStep

__all__ = [
    "CONDITIONAL_STEPS",
    "ENABLE_ENV",
    "ENV",
    "NOT_DONE_EXIT",
    "SPEED_ENV",
    "STEPS",
    "commit_speed",
    "enabled",
    "reached",
]

#: The environment variable naming the crash point: ``operation:step`` or ``operation:step:qemu``.
ENV: Final = "FORGEQMP_TEST_CRASH_AT"
#: The second, explicit opt-in: crash points fire only while this is exactly ``"1"``.
ENABLE_ENV: Final = "FORGEQMP_TEST_CRASH_ENABLE"
#: Test only: the ``speed`` (bytes/s) of the live commit's jobs (see :func:`commit_speed`).
SPEED_ENV: Final = "FORGEQMP_TEST_COMMIT_SPEED"
#: The controller's exit status when a QEMU crash point was reached but could not kill QEMU.
NOT_DONE_EXIT: Final = 86

#: Every crash point, per operation, in the order the driver reaches them: the steps of each
#: operation's enum in :mod:`forgeqmp.core.steps` (what each step means is documented there).
STEPS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {operation: tuple(step.value for step in steps) for operation, steps in OPERATION_STEPS.items()}
)

#: The crash points an operation reaches only in some runs, in order: a commit's, when a disk's
#: merge does not converge and the guest's writes are bounded (:class:`ThrottleStep`).
CONDITIONAL_STEPS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"commit": tuple(step.value for step in ThrottleStep)}
)

_fired = False


def commit_speed() -> int | None:
    """Test only: the copy speed (bytes/s) the live commit's jobs get, None (unlimited) unless
    both ``FORGEQMP_TEST_CRASH_ENABLE=1`` and ``FORGEQMP_TEST_COMMIT_SPEED`` (a positive integer)
    are set."""
    text = os.environ.get(SPEED_ENV, "")
    if os.environ.get(ENABLE_ENV) != "1" or not text.isdigit() or int(text) <= 0:
        return None
    return int(text)


def enabled() -> bool:
    """Whether crash injection is switched on: both variables set (see the module docstring)."""
    return os.environ.get(ENABLE_ENV) == "1" and bool(os.environ.get(ENV))


def _say(text: str) -> None:
    print(f"forgeqmp: crash point {text}", file=sys.stderr, flush=True)


def _not_done(where: str, why: str) -> NoReturn:
    _say(f"{where}: NOT DONE: {why}")
    os._exit(NOT_DONE_EXIT)


def reached(operation: str, step: str, qemu_pid: int | None = None) -> None:
    """A driver reached ``step`` of ``operation``: crash here if the test asked for it."""
    global _fired
    if _fired or not enabled():
        return
    parts = os.environ[ENV].split(":")
    if parts[:2] != [operation, step]:
        return
    victim = parts[2] if len(parts) > 2 else "self"
    where = f"{operation}:{step}:{victim}"
    _fired = True
    if victim == "qemu":
        if qemu_pid is None:
            _not_done(where, "no QEMU pid is known here, nothing was killed")
        try:
            os.kill(qemu_pid, signal.SIGKILL)
        except ProcessLookupError:
            _not_done(where, f"QEMU pid {qemu_pid} was already gone, nothing was killed")
        if not wait_gone(qemu_pid, 10.0):
            _not_done(where, f"QEMU pid {qemu_pid} is still there 10 s after SIGKILL")
        _say(f"{where}: killed QEMU pid {qemu_pid}")
        return
    _say(f"{where}: SIGKILL of the controller, pid {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)
