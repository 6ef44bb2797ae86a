"""The QEMU process behind a QMP socket: who it is, how it was started, whether it is gone.

Discard restarts QEMU with the configuration it runs now, so forgeqmp records the process's argv,
working directory and environment (from ``/proc``) at enable. The pid comes from the socket itself
(SO_PEERCRED, see :mod:`forgeqmp.adapters.qmp`), not from a pidfile that may be stale.

Waiting for a process to be gone uses a pidfd: it works for processes that are not our children and
does not depend on how fast PID 1 reaps zombies (slow on these machines, see the QEMU recipe).
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Mapping

import attrs

__all__ = ["QemuProcess", "describe_process", "is_alive", "wait_gone"]


@attrs.frozen
class QemuProcess:
    """A snapshot of a process's identity and launch configuration."""

    pid: int
    argv: tuple[str, ...]
    cwd: str
    exe: str
    env: Mapping[str, str] = attrs.field(factory=dict, repr=False)


def _read_nul_list(path: str) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    return [part.decode("utf-8", "surrogateescape") for part in data.split(b"\0") if part]


def describe_process(pid: int) -> QemuProcess:
    """Read a live process's argv, cwd, executable and environment from ``/proc``.

    :raises ProcessLookupError: the process does not exist (any more).
    :raises PermissionError: the process belongs to another user and we may not read it.
    """
    base = f"/proc/{pid}"
    try:
        argv = _read_nul_list(f"{base}/cmdline")
        cwd = os.readlink(f"{base}/cwd")
        exe = os.readlink(f"{base}/exe")
        env_items = _read_nul_list(f"{base}/environ")
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    if not argv:  # a zombie has an empty cmdline
        raise ProcessLookupError(errno.ESRCH, f"process {pid} has exited")
    env = dict(item.split("=", 1) for item in env_items if "=" in item)
    return QemuProcess(pid=pid, argv=tuple(argv), cwd=cwd, exe=exe, env=env)


def is_alive(pid: int) -> bool:
    """True if ``pid`` is a running (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state field follows the parenthesized command name, which may itself contain ')'.
    state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
    return state not in (b"Z", b"X")


def wait_gone(pid: int, timeout: float) -> bool:
    """Block until ``pid`` has exited (zombie or reaped) or ``timeout`` seconds pass.

    Returns True when it is gone. Blocking: call it from a worker thread in async code.
    """
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return not is_alive(pid)
            if poller.poll(min(remaining, 1.0) * 1000):
                return True
    finally:
        os.close(pidfd)
