"""The one fake QMP peer of the unit tests: a stand-in for
:class:`forgeqmp.adapters.qmp.QMPConnection` with what the operations use of it (``execute``,
event subscriptions, file-descriptor passing, ``peer``, ``connected``, ``close``/``reconnect``).

What it answers is scripted per command (:meth:`FakeQMP.script`): a value, QEMU's error reply
(:class:`Fail`, raised as the :class:`~forgeqmp.errors.QMPCommandError` the real connection
raises), any exception (``QMPTimeout``, ``QMPDisconnected``...), or a :class:`Reply` that also
emits events or drops the connection after answering. Replies given in a row are used one per
call, the last one for every call after. Every command sent is logged (:attr:`FakeQMP.log`), with
its arguments, in order.

Strict (the default): a command without a script fails the test. The failure is an
:class:`UnexpectedCommand`, a ``BaseException`` so that no ``except Exception`` of the code under
test can swallow it, and it stays in :attr:`FakeQMP.unexpected` (:meth:`FakeQMP.check` asserts
there was none). Not strict: an unscripted command answers ``{}``.

Events are delivered the way QMPConnection delivers them: only to subscriptions entered before
the event, filtered by name and predicate; a wait ends with ``QMPTimeout`` after its deadline and
with ``QMPDisconnected`` when the connection drops.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import anyio
import anyio.lowlevel
import attrs

from forgeqmp.adapters.qmp import PeerCredentials, QMPConnection
from forgeqmp.errors import QMPCommandError, QMPDisconnected, QMPTimeout

__all__ = [
    "PID",
    "Fail",
    "FakeQMP",
    "FakeSubscription",
    "Reply",
    "Sent",
    "UnexpectedCommand",
    "event",
    "job_event",
    "migration_event",
]

Event = dict[str, Any]
#: The pid of the fake QEMU, unless a test gives another one.
PID = 4242


class UnexpectedCommand(BaseException):
    """A strict fake received a command (or a connect) its test did not script."""


@attrs.frozen
class Fail:
    """QEMU's error reply to a command (``{"error": {"class": ..., "desc": ...}}``)."""

    error_class: str
    desc: str


def _events(events: Iterable[Event]) -> tuple[Event, ...]:
    return tuple(events)


@attrs.frozen
class Reply:
    """An answer with consequences: ``value`` (or ``error``, a :class:`Fail` or an exception),
    then ``events`` emitted, then, with ``disconnect``, the connection dropped (QEMU gone).
    ``late``: seconds the answer takes to reach the caller after QEMU acted on the command (a
    caller cancelled meanwhile never sees it, though the command took effect)."""

    value: Any = attrs.field(factory=dict)
    error: Fail | Exception | None = None
    events: tuple[Event, ...] = attrs.field(default=(), converter=_events)
    disconnect: bool = False
    late: float = 0.0


@attrs.frozen
class Sent:
    """One command as the peer received it."""

    command: str
    arguments: dict[str, Any] | None


def event(name: str, data: Mapping[str, Any] | None = None, *, seconds: float = 0.0) -> Event:
    """A QMP event as QEMU sends it (``seconds``: its timestamp)."""
    whole = int(seconds)
    return {
        "event": name,
        "data": dict(data or {}),
        "timestamp": {"seconds": whole, "microseconds": round((seconds - whole) * 1e6)},
    }


def job_event(job_id: str, status: str) -> Event:
    """``JOB_STATUS_CHANGE`` of ``job_id`` to ``status``."""
    return event("JOB_STATUS_CHANGE", {"id": job_id, "status": status})


def migration_event(status: str) -> Event:
    """``MIGRATION`` with ``status``."""
    return event("MIGRATION", {"status": status})


class FakeSubscription:
    """What :meth:`FakeQMP.subscribe` returns: the fake's EventSubscription."""

    def __init__(
        self,
        peer: FakeQMP,
        names: Iterable[str],
        predicate: Callable[[Event], bool] | None,
    ) -> None:
        self._peer = peer
        self._names = frozenset(names)
        self._predicate = predicate
        self._queue: list[Event] = []
        self._history: list[Event] = []
        self._wake = anyio.Event()

    def __enter__(self) -> FakeSubscription:
        self._peer._subscriptions.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self in self._peer._subscriptions:
            self._peer._subscriptions.remove(self)

    def _offer(self, ev: Event) -> None:
        if self._names and ev["event"] not in self._names:
            return
        if self._predicate is not None and not self._predicate(copy.deepcopy(ev)):
            return
        self._queue.append(copy.deepcopy(ev))
        self._history.append(copy.deepcopy(ev))
        self._wake.set()

    def _poke(self) -> None:
        self._wake.set()

    @property
    def history(self) -> list[Event]:
        return copy.deepcopy(self._history)

    def pending(self) -> list[Event]:
        taken, self._queue = self._queue, []
        return taken

    async def next(self, timeout: float, what: str = "a QMP event") -> Event:
        return await self.wait(lambda _ev: True, timeout, what)

    async def wait(self, predicate: Callable[[Event], bool], timeout: float, what: str) -> Event:
        try:
            with anyio.fail_after(timeout):
                while True:
                    while self._queue:
                        ev = self._queue.pop(0)
                        if predicate(ev):
                            return ev
                    if not self._peer.connected:
                        raise QMPDisconnected(
                            f"the QMP connection dropped while waiting for {what}"
                        )
                    self._wake = anyio.Event()
                    await self._wake.wait()
        except TimeoutError:
            raise QMPTimeout(f"no {what} within {timeout:g} s") from None


Answer = Any  # a value, a Fail, an exception, a Reply, or a callable of the arguments


class FakeQMP:
    """A scripted QMP peer (see the module's docstring). ``replies``: command → answer, the same
    as :meth:`script` with one answer each."""

    def __init__(
        self,
        replies: Mapping[str, Answer] | None = None,
        *,
        strict: bool = True,
        pid: int = PID,
        connected: bool = True,
        socket_path: str = "/vm/qmp.sock",
    ) -> None:
        self.strict = strict
        self.socket_path = socket_path
        self.command_timeout = 30.0
        self.pid = pid
        self._peer: PeerCredentials | None = self._credentials(pid) if connected else None
        self._connected = connected
        self._scripts: dict[str, list[Answer]] = {}
        self._connects: list[int | Exception] = []
        self._subscriptions: list[FakeSubscription] = []
        #: Every command received, in order (fd passes as ``getfd``/``add-fd``).
        self.log: list[Sent] = []
        #: The commands (and connects) a strict fake was not scripted for.
        self.unexpected: list[str] = []
        #: How many times the peer was connected to again.
        self.connects = 0
        self._late = 0.0  # the last answer's delay (Reply.late)
        for command, answer in (replies or {}).items():
            self.script(command, answer)

    # --- scripting -------------------------------------------------------------------------------

    def script(self, command: str, *answers: Answer) -> FakeQMP:
        """Answer ``command`` with ``answers``, one per call, the last one from then on."""
        if not answers:
            raise ValueError("script() needs at least one answer")
        self._scripts[command] = list(answers)
        return self

    def script_connect(self, *outcomes: int | Exception) -> FakeQMP:
        """What each (re)connect finds: a QEMU of that pid, or the exception connect raises
        (e.g. ``QEMUUnreachable``); the last outcome repeats."""
        if not outcomes:
            raise ValueError("script_connect() needs at least one outcome")
        self._connects = list(outcomes)
        return self

    def emit(self, *events: Event) -> None:
        """Deliver events now to the subscriptions that want them."""
        for ev in events:
            for sub in list(self._subscriptions):
                sub._offer(ev)

    def drop(self) -> None:
        """The connection drops (QEMU died or closed it): waits end, commands fail."""
        self._connected = False
        for sub in list(self._subscriptions):
            sub._poke()

    # --- what the test reads ---------------------------------------------------------------------

    @property
    def commands(self) -> list[str]:
        """The names of the commands received, in order."""
        return [s.command for s in self.log]

    def sent(self, command: str) -> list[dict[str, Any] | None]:
        """The arguments of each ``command`` received, in order."""
        return [s.arguments for s in self.log if s.command == command]

    def actions(self) -> list[Sent]:
        """The commands received that are not queries (``query-*``, ``qom-get``): what the
        code under test asked QEMU to do, not what it looked at."""
        return [
            s for s in self.log if not s.command.startswith("query-") and s.command != "qom-get"
        ]

    def check(self) -> None:
        """Assert that no command (or connect) came that the test did not script."""
        assert not self.unexpected, f"unscripted QMP: {self.unexpected}"

    def as_connection(self) -> QMPConnection:
        """This fake, typed as what the code under test takes."""
        return cast(QMPConnection, self)

    # --- the QMPConnection interface -------------------------------------------------------------

    @property
    def peer(self) -> PeerCredentials:
        if self._peer is None:
            raise QMPDisconnected("not connected")
        return self._peer

    @property
    def connected(self) -> bool:
        return self._connected

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        await anyio.lowlevel.checkpoint()
        args = copy.deepcopy(dict(arguments)) if arguments is not None else None
        self._late = 0.0
        value = self._answer(command, args)
        if self._late:
            await anyio.sleep(self._late)
        return value

    def subscribe(
        self, *names: str, predicate: Callable[[Event], bool] | None = None
    ) -> FakeSubscription:
        return FakeSubscription(self, names, predicate)

    async def pass_fd(self, fd: int, fdname: str, *, timeout: float | None = None) -> None:
        os.fstat(fd)  # an open descriptor, as SCM_RIGHTS needs
        await anyio.lowlevel.checkpoint()
        self._answer("getfd", {"fdname": fdname})

    async def add_fd(
        self, fd: int, *, opaque: str | None = None, timeout: float | None = None
    ) -> tuple[int, int]:
        os.fstat(fd)
        await anyio.lowlevel.checkpoint()
        reply = self._answer("add-fd", {} if opaque is None else {"opaque": opaque})
        return int(reply["fdset-id"]), int(reply["fd"])

    async def connect(self, timeout: float = 5.0) -> None:
        await anyio.lowlevel.checkpoint()
        if not self._connects:
            if self.strict:
                self.unexpected.append("connect")
                raise UnexpectedCommand("connect (no script_connect)")
            outcome: int | Exception = self.pid
        else:
            outcome = self._connects[0] if len(self._connects) == 1 else self._connects.pop(0)
        self.connects += 1
        if isinstance(outcome, Exception):
            raise outcome
        self.pid = outcome
        self._peer = self._credentials(outcome)
        self._connected = True

    async def close(self) -> None:
        self._peer = None
        self.drop()

    async def reconnect(self, timeout: float = 5.0) -> None:
        await self.close()
        await self.connect(timeout)

    # --- inside ----------------------------------------------------------------------------------

    @staticmethod
    def _credentials(pid: int) -> PeerCredentials:
        return PeerCredentials(pid=pid, uid=os.getuid(), gid=os.getgid())

    def _answer(self, command: str, args: dict[str, Any] | None) -> Any:
        if not self._connected:
            raise QMPDisconnected(
                f"the QMP connection to {self.socket_path} dropped during {command!r} "
                "(not connected)"
            )
        self.log.append(Sent(command, args))
        answers = self._scripts.get(command)
        if answers is None:
            if self.strict:
                self.unexpected.append(command)
                raise UnexpectedCommand(f"{command} {args or ''}")
            return {}
        answer = answers[0] if len(answers) == 1 else answers.pop(0)
        if callable(answer) and not isinstance(answer, type):
            answer = answer(args)
        reply = answer if isinstance(answer, Reply) else None
        error = reply.error if reply is not None else answer
        try:
            if isinstance(error, Fail):
                raise QMPCommandError(command, error.error_class, error.desc, args)
            if isinstance(error, Exception):
                raise error
            return copy.deepcopy(reply.value if reply is not None else answer)
        finally:
            if reply is not None:
                self._late = reply.late
                self.emit(*reply.events)
                if reply.disconnect:
                    self.drop()
