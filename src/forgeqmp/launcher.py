"""Starting QEMU: the command lines discard needs, and the default way to run them.

Discard stops the running QEMU and starts the same configuration again, either waiting for the
memory state (``-incoming defer -S``) or cold (the fallback). Hosting software that supervises its
own QEMU processes passes its own *launcher*: an async callable given a :class:`LaunchSpec` that
returns once QEMU runs and its QMP socket exists. The default, :func:`detached_launcher`, runs the
argv and cwd recorded at enable, detached from our process (its own session, stdio to a log), and
works whether or not the original QEMU used ``-daemonize``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
import attrs

from forgeqmp.errors import ForgeFailed, QEMUUnreachable
from forgeqmp.qmp import QMPConnection

__all__ = [
    "LaunchSpec",
    "Launcher",
    "cold_argv",
    "detached_launcher",
    "incoming_argv",
    "wait_for_qmp",
]

#: Options that take a value and make QEMU wait for or load a state; removed before relaunching.
_STATE_OPTIONS = frozenset({"-incoming", "-loadvm"})
#: Options without a value that keep the guest from running; removed for a cold start.
_PAUSE_OPTIONS = frozenset({"-S"})


@attrs.frozen
class LaunchSpec:
    """What to start: the full argv, its working directory and environment, and where QMP listens."""

    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    qmp_socket: str
    #: True when QEMU waits for ``migrate-incoming`` (the memory restore), False for a cold start.
    incoming: bool
    #: Where the default launcher sends QEMU's stdout and stderr (appended; created with mode
    #: 0600; a symlink there is refused).
    log_file: str | None = None


#: A launcher starts QEMU as described and returns once its QMP socket exists.
Launcher = Callable[[LaunchSpec], Awaitable[None]]


def _strip(argv: Sequence[str], with_value: frozenset[str], flags: frozenset[str]) -> list[str]:
    result: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        dashed = "-" + name.lstrip("-") if name.startswith("-") else name
        if dashed in with_value:
            skip = "=" not in arg
            continue
        if dashed in flags:
            continue
        result.append(arg)
    return [argv[0], *result]


def incoming_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """The recorded argv, ready to receive the memory state: earlier ``-incoming``/``-loadvm``
    removed, ``-incoming defer -S`` added (the guest stays paused until forgeqmp's ``cont``)."""
    base = _strip(argv, _STATE_OPTIONS, _PAUSE_OPTIONS)
    return (*base, "-incoming", "defer", "-S")


def cold_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """The recorded argv for a cold boot: no state to load, no pause at start."""
    return tuple(_strip(argv, _STATE_OPTIONS, _PAUSE_OPTIONS))


async def wait_for_qmp(
    socket_path: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until QMP answers on ``socket_path`` (then disconnect); fail early if ``process``
    exits with an error first."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None:
            code = process.poll()
            if code not in (None, 0):  # 0: the parent of a -daemonize QEMU exited as it should
                raise ForgeFailed(f"QEMU exited with status {code} while starting")
        if os.path.exists(socket_path):
            probe = QMPConnection(socket_path)
            try:
                await probe.connect(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            except QEMUUnreachable as exc:
                last = exc
            else:
                await probe.close()
                return
        await anyio.sleep(0.02)
    raise ForgeFailed(
        f"QEMU's QMP socket {socket_path} did not answer within {timeout:g} s: {last}"
    )


def _spawn(spec: LaunchSpec) -> subprocess.Popen[bytes]:
    if os.path.exists(spec.qmp_socket):
        os.unlink(spec.qmp_socket)
    target = spec.log_file or os.devnull
    # Private (0600) whatever the umask, and never through a planted symlink: QEMU's messages
    # name the VM's files, and the log sits next to the memory file in the state dir.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        log_fd = os.open(target, flags, 0o600)
    except OSError as exc:
        raise ForgeFailed(f"cannot open QEMU's log {target}: {exc.strerror}") from exc
    with open(log_fd, "ab") as log:
        try:
            return subprocess.Popen(
                list(spec.argv),
                cwd=spec.cwd,
                env=dict(spec.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ForgeFailed(f"cannot start {spec.argv[0]}: {exc}") from exc


def _log_tail(path: str | None, size: int = 2000) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode(errors="replace").strip()


async def detached_launcher(spec: LaunchSpec, *, timeout: float = 60.0) -> None:
    """Start QEMU detached from this process and wait until its QMP socket answers.

    The stale socket of the previous QEMU is removed first so that only the new QEMU can answer.
    QEMU's output goes to ``spec.log_file`` (or nowhere); the error raised when QEMU exits
    early quotes its last lines.
    """
    process = _spawn(spec)
    try:
        await wait_for_qmp(spec.qmp_socket, timeout, process)
    except ForgeFailed as exc:
        if process.poll() is None:
            process.kill()
        tail = _log_tail(spec.log_file)
        raise ForgeFailed(f"{exc}; QEMU said: {tail or '(nothing)'}") from None
