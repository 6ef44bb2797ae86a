"""Starting QEMU: the command lines discard needs, and the default way to run them.

Discard stops the running QEMU and starts the same configuration again, either waiting for the
memory state (``-incoming defer -S``) or cold (the fallback). Hosting software that supervises its
own QEMU processes passes its own *launcher*: an async callable given a :class:`LaunchSpec` that
returns once QEMU runs and its QMP socket exists. The default, :func:`detached_launcher`, runs the
argv and cwd recorded at enable, detached from our process (its own session, stdio to a log), and
works whether or not the original QEMU used ``-daemonize``.

:func:`executable_launcher` makes a launcher of a program the platform provides, in any language
(the CLI's ``--launcher PATH``). forgeqmp runs it as ``PATH ARGV0 ARG1 ...`` (the argv to start,
``-incoming defer -S`` included for a memory restore), in the recorded working directory, with
the recorded QEMU environment plus:

- ``FORGEQMP_QMP_SOCKET``: the QMP unix socket path forgeqmp will connect to;
- ``FORGEQMP_INCOMING``: ``1`` when QEMU must wait for the memory state (``-incoming defer``),
  ``0`` for a cold start;
- ``FORGEQMP_CWD``: the working directory QEMU had (also the launcher's);
- ``FORGEQMP_LOG_FILE``: a log file the launcher may use for QEMU's output (its own output goes
  there too).

Its stdin is ``/dev/null``; its stdout and stderr are appended to that log. It starts QEMU its
own way (passing its own descriptors: a monitor socket, taps, fd sets) and exits 0 once the QMP
socket listens, leaving QEMU running. forgeqmp removes the stale socket of the previous QEMU
before calling it, then checks itself that QMP answers, with a deadline. A non-zero exit, or no
exit within the deadline, is a :class:`~forgeqmp.errors.ForgeFailed` quoting what the launcher
wrote.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
import anyio.to_thread
import attrs

from forgeqmp.adapters.qmp import QMPConnection
from forgeqmp.errors import ForgeFailed, InvalidArgument, QEMUUnreachable

__all__ = [
    "LaunchSpec",
    "Launcher",
    "detached_launcher",
    "executable_launcher",
    "wait_for_qmp",
]


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


#: How often :func:`wait_for_qmp` looks for the new QEMU's socket: a discard's VM is down
#: meanwhile, and a QEMU starts in ~40 ms here (a look is one stat of the path).
QMP_POLL_INTERVAL = 0.005


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
        await anyio.sleep(QMP_POLL_INTERVAL)
    raise ForgeFailed(
        f"QEMU's QMP socket {socket_path} did not answer within {timeout:g} s: {last}"
    )


def _spawn_logged(
    argv: Sequence[str], spec: LaunchSpec, env: Mapping[str, str], what: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv`` detached (its own session: what it starts outlives us, and a signal to our
    process group, ^C, does not reach the VM), stdio to the spec's log; returns the process and
    the log's size before it ran. The stale QMP socket of the previous QEMU is removed first, so
    only the new QEMU can answer."""
    if os.path.lexists(spec.qmp_socket):
        os.unlink(spec.qmp_socket)
    target = spec.log_file or os.devnull
    # Private (0600) whatever the umask, and never through a planted symlink: QEMU's messages
    # name the VM's files, and the log sits next to the memory file in the state dir.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        log_fd = os.open(target, flags, 0o600)
    except OSError as exc:
        raise ForgeFailed(f"cannot open {what}'s log {target}: {exc.strerror}") from exc
    start = os.fstat(log_fd).st_size
    with open(log_fd, "ab") as log:
        try:
            process = subprocess.Popen(
                list(argv),
                cwd=spec.cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ForgeFailed(f"cannot start {what} {argv[0]}: {exc}") from exc
    return process, start


def _spawn(spec: LaunchSpec) -> subprocess.Popen[bytes]:
    return _spawn_logged(spec.argv, spec, spec.env, "QEMU")[0]


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


#: The environment variables :func:`executable_launcher` gives the platform's program.
LAUNCHER_ENV = ("FORGEQMP_QMP_SOCKET", "FORGEQMP_INCOMING", "FORGEQMP_CWD", "FORGEQMP_LOG_FILE")


def executable_launcher(path: str | os.PathLike[str], *, timeout: float = 120.0) -> Launcher:
    """A :data:`Launcher` that runs the platform's program ``path`` (see the module's docstring
    for how it is called), then waits for QMP to answer; ``timeout`` bounds both.

    :raises InvalidArgument: ``path`` is not an executable file (checked now, before anything).
    """
    program = os.path.abspath(os.fspath(path))
    if not os.path.isfile(program) or not os.access(program, os.X_OK):
        raise InvalidArgument(
            f"launcher {program} is not an executable file; give the path of the program that "
            "starts this VM's QEMU (see docs/platforms.md)"
        )

    async def launch(spec: LaunchSpec) -> None:
        await _run_executable(program, spec, timeout)

    launch.__name__ = launch.__qualname__ = f"executable_launcher({program})"
    return launch


def _spawn_executable(program: str, spec: LaunchSpec) -> tuple[subprocess.Popen[bytes], int]:
    """Start the launcher program; returns it and the size of the log before it ran."""
    env = dict(spec.env)
    env.setdefault("PATH", os.defpath)
    env.update(
        FORGEQMP_QMP_SOCKET=spec.qmp_socket,
        FORGEQMP_INCOMING="1" if spec.incoming else "0",
        FORGEQMP_CWD=spec.cwd,
        FORGEQMP_LOG_FILE=spec.log_file or os.devnull,
    )
    return _spawn_logged([program, *spec.argv], spec, env, "the launcher")


async def _run_executable(program: str, spec: LaunchSpec, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    process, start = _spawn_executable(program, spec)

    def said() -> str:
        return _log_since(spec.log_file, start) or "(nothing)"

    while (code := process.poll()) is None:
        if time.monotonic() >= deadline:
            process.kill()
            await anyio.to_thread.run_sync(process.wait)
            raise ForgeFailed(
                f"the launcher {program} did not exit within {timeout:g} s (it must exit 0 once "
                f"QMP listens on {spec.qmp_socket}) and was killed; it said: {said()}"
            )
        await anyio.sleep(0.02)
    if code != 0:
        raise ForgeFailed(
            f"the launcher {program} exited with status {code} instead of starting QEMU; "
            f"it said: {said()}"
        )
    try:
        await wait_for_qmp(spec.qmp_socket, max(1.0, deadline - time.monotonic()))
    except ForgeFailed as exc:
        raise ForgeFailed(
            f"{exc} after the launcher {program} exited 0; it said: {said()}"
        ) from None


def _log_since(path: str | None, offset: int, size: int = 2000) -> str:
    """What was appended to the log at ``path`` since ``offset`` (its last ``size`` bytes)."""
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(offset, end - size))
        return f.read().decode(errors="replace").strip()
