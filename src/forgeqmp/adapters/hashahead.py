"""Hashing a precopy save while QEMU writes it, in a process of its own at the idle priority.

A precopy save is a stream written from its start to its end, so each window of the memory digest
(:mod:`forgeqmp.adapters.memhash`) is final once the file is past it. A worker process
(:func:`forgeqmp.adapters.memwindows.worker_main`, at the ``SCHED_IDLE`` priority: CPU time
nothing else wants) hashes those windows while the save runs and writes each result to a pipe. At
the guest's pause the enable kills it (:meth:`HashAhead.halt`); when the save is over,
:meth:`HashAhead.stop` takes the results already written, without waiting for more; the enable
hashes the windows left (:func:`forgeqmp.adapters.memhash.hash_reusing`).

What the idle priority buys: ``SCHED_IDLE`` ranks the worker below every other task of its
scheduling group. Where the kernel groups tasks by session for CPU time (``autogroup``, on by
default in Debian's kernels for tasks outside a CPU cgroup) or the platform puts QEMU in a CPU
cgroup of its own, the worker's group (the controller's) competes with QEMU's at its full
weight, so with a guest keeping both cores busy it takes CPU from QEMU's threads and the save
is slower. Measured (docs/performance.md): with a guest rewriting its memory, that still ends
the enable sooner than a worker in a group of the lowest weight, which hashes nothing while QEMU
wants the cores and leaves the whole digest for after the save (with an idle guest the two are
the same).

Why a process and not a thread: a thread at the idle priority in the controller is starved
whenever both cores are busy, and a starved thread holding Python's GIL would stall the event
loop, also inside the guest's pause (measured: docs/performance.md). A process shares no GIL and
is never waited for: with no core to spare it hashes nothing, and the enable does it all, as
without it. Starved, it must hold nothing QEMU waits for either: it reads the file through
mappings only and never asks for its extents (``SEEK_DATA`` takes the inode lock that QEMU's
writes take; see :class:`~forgeqmp.adapters.memwindows.GrowingFile`).

Everything here is best effort: where the worker cannot start (no ``posix_spawn`` or
``SCHED_IDLE``, no Python interpreter at ``sys.executable`` as in some embedded interpreters) or
says anything that is not a result, the enable hashes the whole file after the save.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping

from forgeqmp.adapters import memwindows
from forgeqmp.adapters.memwindows import Extents

__all__ = ["HashAhead"]

log = logging.getLogger(__name__)

#: How the worker is started: the interpreter isolated (``-I``: no current directory, no
#: ``PYTHON*`` variables, no user site on its path; the controller's absolute ``sys.path`` is
#: handed over instead, so it finds ``xxhash`` where the controller does), then the idle priority
#: (glibc's posix_spawn refuses SCHED_IDLE; a worker that cannot have it exits: at the normal
#: priority it would slow the save) unless told otherwise, then every descriptor above its own
#: closed (one an embedding left inheritable, a lock say, must not outlive the controller in
#: it), then memwindows loaded by its path (not forgeqmp's package, whose imports cost 0.3 s of
#: CPU), then its loop.
_BOOT = (
    "import os, sys\n"
    "sys.path[:] = [p for p in sys.argv[3].split(os.pathsep) if p]\n"
    "if sys.argv[4] == 'idle':\n"
    "    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    "for f in [int(f) for f in os.listdir('/proc/self/fd')]:\n"
    "    if f > 3:\n"
    "        try: os.close(f)\n"
    "        except OSError: pass\n"
    "import importlib.util as u\n"
    "spec = u.spec_from_file_location('forgeqmp_memwindows', sys.argv[1])\n"
    "module = u.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "sys.exit(module.worker_main(int(sys.argv[2])))\n"
)
#: Room in the results pipe: ~60 bytes a 64 MiB window, so 1 MiB holds a 1 TiB save's results
#: (a worker that fills it waits, and hashes no more ahead).
_PIPE_SIZE = 1024 * 1024
#: The lowest descriptor number the spawn's sources are moved to, above the worker's own.
_HIGH_FD = 10


def _interpreter() -> str | None:
    """The Python to run the worker with: ``sys.executable`` when it is one (not a frozen
    application or an embedding program, which would be handed arguments it does not expect)."""
    executable = sys.executable
    if not executable or getattr(sys, "frozen", False):
        return None
    if not os.path.basename(executable).startswith(("python", "pypy")):
        return None
    return executable


class HashAhead:
    """A running worker hashing the memory file open as ``fd`` (see the module); from
    :meth:`start`, ended by :meth:`stop` (always call it, it is cheap).

    The worker is signalled and reaped through a pidfd where the kernel has them (5.3+), so a
    worker that ended early and was reaped by someone else (an embedding's ``SIGCHLD`` handler)
    can never have its pid reused under a kill of ours."""

    def __init__(self, pid: int, results_fd: int, stop_fd: int, pidfd: int | None = None) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._results = results_fd
        self._stop = stop_fd
        self._buffer = b""
        self._known: dict[int, tuple[Extents, bytes]] = {}
        self._garbled = False
        self._stopped = False
        self._killed = False

    @classmethod
    def start(cls, fd: int, *, idle: bool = True) -> HashAhead | None:
        """Start the worker on the file open as ``fd``, or None (logged at DEBUG) where it cannot
        be started. Returns at once; the worker's interpreter starts (~10 ms of CPU, at the
        normal priority) and takes the idle priority before it reads anything (``idle=False``:
        it keeps the normal one; for tests on a busy machine)."""
        executable = _interpreter()
        if executable is None or not hasattr(os, "posix_spawn") or not hasattr(os, "SCHED_IDLE"):
            log.debug("not hashing the memory file while it is saved: no Python to start it with")
            return None
        opened: list[int] = []
        pid: int | None = None
        try:
            results_r, results_w = os.pipe2(os.O_CLOEXEC)
            opened += [results_r, results_w]
            stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
            opened += [stop_r, stop_w]
            with contextlib.suppress(OSError):
                fcntl.fcntl(results_w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            # The worker only reads: it gets a read-only open file description of its own.
            readonly = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            opened.append(readonly)
            # posix_spawn's dup2 of a descriptor onto its own number would keep its close-on-exec
            # flag: move every source above the worker's numbers first.
            sources: list[int] = []
            for source in (stop_r, results_w, readonly):
                sources.append(fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD))
                opened.append(sources[-1])
            path = os.pathsep.join(p for p in sys.path if p and os.path.isabs(p))
            pid = os.posix_spawn(
                executable,
                [
                    executable,
                    "-I",
                    "-c",
                    _BOOT,
                    memwindows.__file__,
                    str(memwindows.WINDOW),
                    path,
                    "idle" if idle else "normal",
                ],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, sources[0], memwindows.WORKER_STOP_FD),
                    (os.POSIX_SPAWN_DUP2, sources[1], memwindows.WORKER_RESULTS_FD),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, sources[2], memwindows.WORKER_FILE_FD),
                ],
            )
            os.set_blocking(results_r, False)
            pidfd: int | None = None
            with contextlib.suppress(AttributeError, OSError):  # a kernel before 5.3
                pidfd = os.pidfd_open(pid)
        except OSError as exc:
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)  # not reaped by anyone yet: still our child
                _reap(pid, None)
            for f in opened:
                os.close(f)
            log.debug("not hashing the memory file while it is saved: %s", exc)
            return None
        for f in [stop_r, results_w, readonly, *sources]:
            os.close(f)
        log.debug("hashing the memory file while it is saved: worker pid %d", pid)
        return cls(pid, results_r, stop_w, pidfd)

    @property
    def bytes_ahead(self) -> int:
        """Bytes of the file's data the worker hashed (of the results taken so far)."""
        return sum(length for extents, _ in self._known.values() for _, length in extents)

    def take(self) -> None:
        """Take the results the worker has written so far, without waiting for more."""
        while not self._garbled and not self._stopped:
            try:
                chunk = os.read(self._results, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("reading the hashing worker's results: %s", exc)
                return
            if not chunk:
                return
            *lines, self._buffer = (self._buffer + chunk).split(b"\n")
            for line in lines:
                try:
                    index, extents, digest = memwindows.parse_result(line)
                except ValueError:
                    log.debug("the hashing worker said %r: its results are not used", line[:80])
                    self._garbled = True
                    self._known.clear()
                    return
                self._known[index] = (extents, digest)

    def halt(self) -> None:
        """Kill the worker now, and nothing else (a few µs: the enable calls it in the guest's
        pause); the results it wrote stay in the pipe for :meth:`stop`, which must follow."""
        if self._killed:
            return
        self._killed = True
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:  # still a zombie at worst until stop() reaps it: the pid is not reused
                os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass  # gone already

    def stop(self) -> Mapping[int, tuple[Extents, bytes]]:
        """Take the results written so far, kill the worker (never waiting for it: it is reaped
        by a thread of its own) and return the windows it hashed. Once; later calls return the
        same."""
        if self._stopped:
            return dict(self._known)
        self.take()
        self._stopped = True
        self.halt()
        for f in (self._results, self._stop):
            with contextlib.suppress(OSError):
                os.close(f)
        threading.Thread(
            target=_reap, args=(self.pid, self._pidfd), name="forgeqmp-hash-reaper", daemon=True
        ).start()
        return dict(self._known)


def _reap(pid: int, pidfd: int | None) -> None:
    """Wait for the worker's end (through its pidfd where there is one: never another child)."""
    try:
        if pidfd is not None:
            result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            status = None if result is None else result.si_status
        else:
            status = os.waitpid(pid, 0)[1]
        log.debug("the hashing worker %d ended (status %s)", pid, status)
    except ChildProcessError:  # reaped by an embedding's SIGCHLD handler
        pass
    finally:
        if pidfd is not None:
            os.close(pidfd)
