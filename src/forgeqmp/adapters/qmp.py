"""Talking to QEMU: one QMP connection, over qemu.qmp, with deadlines and typed errors.

qemu.qmp is asyncio-based and has no per-command timeout; this module adds what forgeqmp needs
on top of it and nothing more:

- ``connect`` with a deadline, mapping every way of not reaching QEMU to :class:`QEMUUnreachable`
  (missing path, not a socket, refused, silent peer) or :class:`NotQMP` (it answers, not in QMP);
- ``execute`` with a per-command deadline, mapping QEMU's error reply to :class:`QMPCommandError`
  (the error class and description are kept), a dropped connection to :class:`QMPDisconnected`
  and a deadline to :class:`QMPTimeout`;
- event subscriptions that are registered *before* the command that triggers the event is sent, so
  no event can slip between the command and the wait, and waits that end with
  :class:`QMPDisconnected` when the connection drops instead of hanging;
- file-descriptor passing (SCM_RIGHTS + ``getfd``/``add-fd``) run alone, with no other command on
  the wire, because qemu.qmp's ``send_fd_scm`` bypasses its own send queue (plain commands from
  concurrent tasks are pipelined);
- the credentials of the process behind the socket (SO_PEERCRED), so forgeqmp knows which QEMU it
  talks to (its argv and cwd are needed later to relaunch it).

Events are lost across a disconnect: after :meth:`QMPConnection.reconnect`, callers re-query state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import attrs

# qemu.qmp's public API only (its package exports); its submodules are internals that change.
from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
    StateError,
)
from qemu.qmp import QMPError as _LibraryQMPError

from forgeqmp.errors import (
    InvalidArgument,
    NotQMP,
    QEMUUnreachable,
    QMPCommandError,
    QMPDisconnected,
    QMPError,
    QMPTimeout,
)

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "EventSubscription",
    "PeerCredentials",
    "QMPConnection",
    "connect",
]

# The logger names are part of the documented interface (docs/embedding.md, "Logs"): they
# stay what they were before the modules moved.
log = logging.getLogger("forgeqmp.qmp")

#: Seconds to wait for the socket to accept and QEMU to greet and negotiate.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds any single QMP command may take before :class:`QMPTimeout`.
DEFAULT_COMMAND_TIMEOUT = 30.0

#: Seconds early the event loop may run a timer (its clock resolution, generously).
_CLOCK_SLACK = 0.001

Event = dict[str, Any]
EventPredicate = Callable[[Event], bool]


@attrs.frozen
class PeerCredentials:
    """Who is behind the QMP socket, as the kernel reports it (SO_PEERCRED) at connect time."""

    pid: int
    uid: int
    gid: int


def _check_socket_path(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QEMUUnreachable(path, "no such file") from None
    except OSError as exc:
        raise QEMUUnreachable(path, exc.strerror or str(exc)) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise QEMUUnreachable(path, "not a unix socket")


def _peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


class _Deadline:
    """The deadline of one command in flight (see :class:`_Deadlines`)."""

    __slots__ = ("_owner", "_task", "cancelling", "expired", "when")

    def __init__(self, owner: _Deadlines, task: asyncio.Task[Any], when: float) -> None:
        self._owner = owner
        self._task = task
        self.when = when
        self.cancelling = task.cancelling()  # cancellations already asked of the task
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def passed(self) -> bool:
        """Whether the cancellation being raised is this deadline's own (then it is taken
        back, as ``asyncio.timeout`` does), not one asked from outside."""
        if not self.expired:
            return False
        self.expired = False
        return self._task.uncancel() <= self.cancelling

    def finish(self) -> None:
        """The command is over: forget the deadline (and take back its cancellation if it
        passed just as the command ended some other way)."""
        self._owner.forget(self)
        if self.expired:
            self.expired = False
            self._task.uncancel()


class _Deadlines:
    """The per-command deadlines of one connection, kept by one event-loop timer armed for the
    earliest of them.

    A command nearly always has its answer long before its deadline, so the timer is not
    cancelled when a command ends, and a new command re-arms it only if its deadline comes
    before the armed one (never, while every command has the same timeout): a command costs a
    set insertion and removal, where ``asyncio.timeout`` schedules and cancels a timer handle
    each time (benchmarks/overhead.py). When the timer fires it cancels the tasks whose
    deadline passed, with the semantics of ``asyncio.timeout`` (an outside cancellation stays
    one), and arms itself for the next deadline."""

    def __init__(self) -> None:
        self._waiting: set[_Deadline] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, seconds: float) -> _Deadline:
        """The deadline, ``seconds`` from now, of the command the current task sends."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # a coroutine of a running loop runs in a task
        if loop is not self._loop:  # a new event loop: the old one's timer never fires
            self._loop, self._timer, self._timer_at = loop, None, math.inf
            self._waiting = set()
        deadline = _Deadline(self, task, loop.time() + seconds)
        self._waiting.add(deadline)
        if deadline.when < self._timer_at:
            self._arm(loop, deadline.when)
        return deadline

    def forget(self, deadline: _Deadline) -> None:
        self._waiting.discard(deadline)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        loop = self._loop
        assert loop is not None
        self._timer, self._timer_at = None, math.inf
        # The loop runs a timer up to its clock resolution early: count that as passed.
        now = loop.time() + _CLOCK_SLACK
        for deadline in [d for d in self._waiting if d.when <= now]:
            self._waiting.discard(deadline)
            deadline.expire()
        if self._waiting:
            self._arm(loop, min(d.when for d in self._waiting))


class EventSubscription:
    """Events of some names (and an optional predicate) received since the subscription started.

    Create it with :meth:`QMPConnection.subscribe` *before* sending the command whose event you
    want, then :meth:`wait` for it. Use it as a context manager so the listener is always removed.
    """

    def __init__(
        self,
        connection: QMPConnection,
        names: Iterable[str],
        predicate: EventPredicate | None = None,
    ) -> None:
        self._connection = connection
        self._listener = EventListener(
            names=list(names), event_filter=(lambda ev: predicate(dict(ev))) if predicate else None
        )
        self._active = False

    def __enter__(self) -> EventSubscription:
        self._connection._client.register_listener(self._listener)
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening (idempotent)."""
        if self._active:
            self._active = False
            with contextlib.suppress(Exception):
                self._connection._client.remove_listener(self._listener)

    @property
    def history(self) -> list[Event]:
        """Every accepted event so far, including ones already returned by :meth:`wait`."""
        return [dict(ev) for ev in self._listener.history]

    def pending(self) -> list[Event]:
        """Take the events received and not yet returned, without waiting."""
        return [dict(ev) for ev in self._listener.clear()]

    async def next(self, timeout: float, what: str = "a QMP event") -> Event:
        """The next accepted event; :class:`QMPTimeout` after ``timeout`` seconds,
        :class:`QMPDisconnected` if the connection drops first."""
        return await self.wait(lambda _ev: True, timeout, what)

    async def wait(self, predicate: EventPredicate, timeout: float, what: str) -> Event:
        """Wait for the first (pending or future) event matching ``predicate``; earlier ones are
        dropped. ``what`` names the awaited event in the timeout error."""
        try:
            with anyio.fail_after(timeout):
                while True:
                    event = await self._next_or_disconnect(what)
                    log.debug("QMP event %s: %s", event.get("event"), event.get("data", {}))
                    if predicate(event):
                        return event
        except TimeoutError:
            raise QMPTimeout(f"no {what} within {timeout:g} s") from None

    async def _next_or_disconnect(self, what: str) -> Event:
        if not self._listener.empty():
            return dict(await self._listener.get())
        client = self._connection._client
        received: Event | None = None
        async with anyio.create_task_group() as tg:

            async def get() -> None:
                nonlocal received
                received = dict(await self._listener.get())
                tg.cancel_scope.cancel()

            async def watch() -> None:
                while client.runstate == Runstate.RUNNING:
                    await client.runstate_changed()
                tg.cancel_scope.cancel()

            tg.start_soon(get)
            tg.start_soon(watch)
        if received is None:
            raise QMPDisconnected(f"the QMP connection dropped while waiting for {what}")
        return received


class QMPConnection:
    """One QMP session to one QEMU process.

    Prefer :func:`connect`, which closes the connection on exit. Commands from concurrent tasks
    are pipelined (QEMU answers them in order). Passing a file descriptor runs alone: the fd
    travels outside qemu.qmp's message queue, so no other command may be on the wire between it
    and the ``getfd``/``add-fd`` that claims it; plain commands wait only while one is passed.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        name: str | None = None,
    ) -> None:
        if not (command_timeout > 0 and math.isfinite(command_timeout)):
            raise ValueError(f"command_timeout must be a positive number, not {command_timeout!r}")
        self.socket_path = os.fspath(socket_path)
        if not self.socket_path or "\0" in self.socket_path:
            raise InvalidArgument(
                f"invalid QMP socket path {self.socket_path!r}: give the path of QEMU's QMP socket"
            )
        self.command_timeout = command_timeout
        self._name = name or f"forgeqmp:{os.path.basename(self.socket_path)}"
        self._client = QMPClient(self._name)
        #: One fd pass at a time; while one waits or runs, ``_fd_pass`` is set and new commands
        #: queue behind it. ``_in_flight`` counts plain commands on the wire, ``_drained`` wakes
        #: the fd pass when the last of them has its reply.
        self._fd_lock = anyio.Lock()
        self._fd_pass: anyio.Event | None = None
        self._in_flight = 0
        self._drained: anyio.Event | None = None
        self._peer: PeerCredentials | None = None
        self._deadlines = _Deadlines()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def peer(self) -> PeerCredentials:
        """The credentials of the QEMU process behind the socket, read at connect time."""
        if self._peer is None:
            raise QMPDisconnected("not connected")
        return self._peer

    @property
    def connected(self) -> bool:
        """True while the QMP session is up."""
        return self._client.runstate == Runstate.RUNNING

    @property
    def greeting(self) -> dict[str, Any]:
        """QEMU's QMP greeting (version and capabilities), as received at connect."""
        greeting = self._client.greeting
        if greeting is None:
            raise QMPDisconnected("not connected")
        qmp = greeting.QMP
        return {"QMP": {"version": dict(qmp.version), "capabilities": list(qmp.capabilities)}}

    async def connect(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Open the socket, read the greeting and negotiate capabilities, within ``timeout``."""
        path = self.socket_path
        _check_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            with anyio.fail_after(timeout):
                try:
                    await asyncio.get_running_loop().sock_connect(sock, path)
                except OSError as exc:
                    raise QEMUUnreachable(path, exc.strerror or str(exc)) from None
                peer = _peer_credentials(sock)
                try:
                    await self._client.connect(sock)
                except ConnectError as exc:
                    raise self._map_connect_error(exc) from None
        except TimeoutError:
            sock.close()
            await self._reset_client()
            raise QEMUUnreachable(
                path,
                f"no QMP greeting within {timeout:g} s (is another client connected to this "
                "monitor? QEMU serves one client per QMP socket)",
            ) from None
        except BaseException:
            sock.close()
            await self._reset_client()
            raise
        self._peer = peer

    def _map_connect_error(self, exc: ConnectError) -> QMPError:
        cause = exc.exc
        # A protocol-level failure of the greeting or the capabilities negotiation.
        if isinstance(cause, _LibraryQMPError):
            return NotQMP(self.socket_path, f"the peer does not speak QMP ({cause})")
        if isinstance(cause, EOFError | ConnectionResetError):
            return NotQMP(self.socket_path, "the peer closed the connection without a QMP greeting")
        if isinstance(cause, OSError):
            return QEMUUnreachable(self.socket_path, cause.strerror or str(cause))
        return NotQMP(self.socket_path, f"{type(cause).__name__}: {cause}")

    async def _reset_client(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        self._client = QMPClient(self._name)

    async def close(self) -> None:
        """Close the connection (idempotent); never raises for a connection QEMU already dropped."""
        self._peer = None
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self._client.disconnect()

    async def reconnect(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Close and open again (same socket path, possibly a new QEMU behind it).

        Events emitted while disconnected are lost: re-query whatever state you were following.
        """
        await self.close()
        self._client = QMPClient(self._name)
        await self.connect(timeout)

    async def __aenter__(self) -> QMPConnection:
        if not self.connected:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- commands ----------------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        :raises QMPCommandError: QEMU answered with an error (``error_class``, ``desc`` kept).
        :raises QMPDisconnected: the connection is down or dropped before the reply.
        :raises QMPTimeout: no reply within ``timeout`` (default: ``command_timeout``).
        """
        # A cancelled caller must not send: a command queued now would still reach QEMU (a
        # cancelled enable would send migrate-continue and let the save finish under its undo).
        # Free when not cancelled, unlike a full checkpoint.
        await anyio.lowlevel.checkpoint_if_cancelled()
        while self._fd_pass is not None:  # bounded by the fd pass's own deadline
            await self._fd_pass.wait()
        self._in_flight += 1
        try:
            return await self._send(command, arguments, timeout)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._drained is not None:
                self._drained.set()

    @contextlib.asynccontextmanager
    async def _alone(self) -> AsyncIterator[None]:
        """Hold the connection for an fd pass: no other command on the wire meanwhile."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        async with self._fd_lock:
            self._fd_pass = gate = anyio.Event()
            try:
                while self._in_flight:  # each has its own deadline
                    self._drained = anyio.Event()
                    await self._drained.wait()
                yield
            finally:
                self._fd_pass = self._drained = None
                gate.set()

    async def _send(
        self, command: str, arguments: Mapping[str, Any] | None, timeout: float | None
    ) -> Any:
        limit = self.command_timeout if timeout is None else timeout
        args = dict(arguments) if arguments is not None else None
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            log.debug("QMP %s -> %s %s", self.socket_path, command, args or "")
        deadline = self._deadlines.start(limit)
        try:
            reply = await self._client.execute(command, args)
        except asyncio.CancelledError:
            if deadline.passed():
                raise QMPTimeout(f"QEMU did not answer {command!r} within {limit:g} s") from None
            raise
        except ExecuteError as exc:
            info = exc.error.error
            log.debug(
                "QMP %s <- %s: error %s: %s", self.socket_path, command, info.class_, info.desc
            )
            raise QMPCommandError(command, info.class_, info.desc, args) from None
        except (ExecInterruptedError, StateError) as exc:
            raise QMPDisconnected(
                f"the QMP connection to {self.socket_path} dropped during {command!r} ({exc})"
            ) from None
        finally:
            deadline.finish()
        if debug:
            log.debug("QMP %s <- %s: %s", self.socket_path, command, reply)
        return reply

    def subscribe(self, *names: str, predicate: EventPredicate | None = None) -> EventSubscription:
        """Listen for events ``names`` (all events if none), optionally filtered by ``predicate``.

        Enter the returned context manager before sending the command that triggers the event.
        """
        return EventSubscription(self, names, predicate)

    async def pass_fd(self, fd: int, fdname: str, *, timeout: float | None = None) -> None:
        """Give QEMU a copy of ``fd`` under ``fdname`` (SCM_RIGHTS + ``getfd``), for ``fd:`` URIs.

        Our copy stays open: close it when QEMU has taken over.
        """
        async with self._alone():
            self._send_fd(fd)
            await self._send("getfd", {"fdname": fdname}, timeout)

    async def add_fd(
        self, fd: int, *, opaque: str | None = None, timeout: float | None = None
    ) -> tuple[int, int]:
        """Put a copy of ``fd`` into a new fdset (SCM_RIGHTS + ``add-fd``), for ``/dev/fdset/N``.

        Returns ``(fdset_id, fd_in_qemu)``. Remove the fdset with ``remove-fd`` when done.
        """
        args: dict[str, Any] = {}
        if opaque is not None:
            args["opaque"] = opaque
        async with self._alone():
            self._send_fd(fd)
            reply = await self._send("add-fd", args, timeout)
        return int(reply["fdset-id"]), int(reply["fd"])

    def _send_fd(self, fd: int) -> None:
        try:
            self._client.send_fd_scm(fd)
        except StateError:
            raise QMPDisconnected(f"not connected to {self.socket_path}") from None
        except OSError as exc:
            raise QMPDisconnected(f"passing a file descriptor to QEMU failed: {exc}") from None


@contextlib.asynccontextmanager
async def connect(
    socket_path: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
) -> AsyncIterator[QMPConnection]:
    """Connect to QEMU's QMP socket for the duration of the ``async with`` block."""
    conn = QMPConnection(socket_path, command_timeout=command_timeout)
    await conn.connect(timeout)
    try:
        yield conn
    finally:
        await conn.close()
