"""Sessions: :func:`connect` opens an :class:`Instance`, one QEMU (one QMP socket) with its
private state directory and its lock.

Its operations (:mod:`~forgeqmp.ops.enable`, :mod:`~forgeqmp.ops.commit`,
:mod:`~forgeqmp.ops.discard`, recover in :mod:`~forgeqmp.ops.recover`) execute the plans of
:mod:`forgeqmp.core.plans` over QMP: they check prerequisites (typed errors, nothing changed), write the
session record before every irreversible step, run the plan with a deadline on every wait, and on
any failure or cancellation undo what they did, shielded from the cancellation, so the VM keeps
running as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import attrs

from forgeqmp.adapters.launcher import Launcher, LaunchSpec
from forgeqmp.adapters.qemuproc import qemu_down
from forgeqmp.adapters.qmp import DEFAULT_CONNECT_TIMEOUT, QMPConnection
from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import InstanceLock, StateDir, default_state_dir
from forgeqmp.core import guard
from forgeqmp.core.argv import start_argv
from forgeqmp.core.disks import Disk
from forgeqmp.core.features import Features
from forgeqmp.core.graphsession import GraphSession
from forgeqmp.core.lifecycle import status_of
from forgeqmp.core.plans.enable import Strategy
from forgeqmp.core.progress import ProgressCallback, ProgressEvent, StateListener
from forgeqmp.core.record import SessionRecord
from forgeqmp.errors import (
    InstanceLocked,
    NoSession,
    NotQMP,
    OperationBlocked,
    QEMUUnreachable,
    RecordError,
)
from forgeqmp.ops.commit import Commit
from forgeqmp.ops.context import (
    DEFAULT_COMMIT_TIMEOUT,
    DEFAULT_DISCARD_TIMEOUT,
    DEFAULT_ENABLE_TIMEOUT,
    Context,
    _check_timeout,
)
from forgeqmp.ops.discard import Discard
from forgeqmp.ops.enable import Enable
from forgeqmp.ops.recover import DEFAULT_RECOVER_TIMEOUT, run_recover, stale

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_COMMIT_TIMEOUT",
    "DEFAULT_DISCARD_TIMEOUT",
    "DEFAULT_ENABLE_TIMEOUT",
    "Instance",
    "ProgressCallback",
    "ProgressEvent",
    "StateListener",
    "connect",
    "status_of",
]


class Instance:
    """One QEMU instance: its QMP connection, its state directory and its session.

    Create it with :func:`connect`. All methods are coroutines to run under anyio's asyncio backend.
    The instance holds one :class:`~forgeqmp.ops.context.Context` (connection, state directory,
    record store, launcher) and runs each operation over it: :class:`~forgeqmp.ops.enable.Enable`,
    :class:`~forgeqmp.ops.commit.Commit`, :class:`~forgeqmp.ops.discard.Discard` and
    :mod:`forgeqmp.ops.recover`, peers of one shape that share nothing but the context; this class
    adds the guard and how to start the VM during a session.
    """

    def __init__(self, conn: QMPConnection, state_dir: StateDir) -> None:
        self._ctx = Context(conn, state_dir)

    # --- what the operations share: the context's --------------------------------------------

    @property
    def conn(self) -> QMPConnection:
        """The QMP connection to this QEMU (reconnected by discard and recover to the QEMU they
        start)."""
        return self._ctx.conn

    @property
    def state_dir(self) -> StateDir:
        """The instance's private state directory."""
        return self._ctx.state_dir

    @property
    def store(self) -> RecordStore:
        """The session record in the state directory."""
        return self._ctx.store

    @property
    def launcher(self) -> Launcher | None:
        """The platform's launcher (``connect(..., launcher=)``), used by discard and recover when
        none is passed per call; None: the recorded command line is run again."""
        return self._ctx.launcher

    @launcher.setter
    def launcher(self, launcher: Launcher | None) -> None:
        self._ctx.launcher = launcher

    def follow(self, listener: StateListener) -> Callable[[], None]:
        return self._ctx.follow(listener)

    follow.__doc__ = Context.follow.__doc__

    async def features(self) -> Features:
        return await self._ctx.features()

    features.__doc__ = Context.features.__doc__

    def session(self) -> SessionRecord | None:
        return self._ctx.session()

    session.__doc__ = Context.session.__doc__

    async def disks(self) -> tuple[Disk, ...]:
        return await self._ctx.disks()

    disks.__doc__ = Context.disks.__doc__

    async def runstate(self) -> str:
        return await self._ctx.runstate()

    runstate.__doc__ = Context.runstate.__doc__

    async def sessions_in_graph(self) -> tuple[GraphSession, ...]:
        return await self._ctx.sessions_in_graph()

    sessions_in_graph.__doc__ = Context.sessions_in_graph.__doc__

    # --- the operations ----------------------------------------------------------------------

    async def enable(
        self,
        disks: Sequence[str] | None = None,
        *,
        all_disks: bool = False,
        strategy: Strategy | str | None = None,
        overlay_dir: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_ENABLE_TIMEOUT,
        on_progress: ProgressCallback | None = None,
    ) -> SessionRecord:
        return await Enable(self._ctx).run(
            disks,
            all_disks=all_disks,
            strategy=strategy,
            overlay_dir=overlay_dir,
            timeout=timeout,
            on_progress=on_progress,
        )

    enable.__doc__ = Enable.run.__doc__

    async def commit(
        self,
        *,
        timeout: float = DEFAULT_COMMIT_TIMEOUT,
        on_progress: ProgressCallback | None = None,
    ) -> SessionRecord:
        return await Commit(self._ctx).run(timeout=timeout, on_progress=on_progress)

    commit.__doc__ = Commit.run.__doc__

    async def discard(
        self,
        *,
        launcher: Launcher | None = None,
        timeout: float = DEFAULT_DISCARD_TIMEOUT,
        on_progress: ProgressCallback | None = None,
        cold: bool = False,
    ) -> SessionRecord:
        return await Discard(self._ctx).run(
            launcher=launcher, timeout=timeout, on_progress=on_progress, cold=cold
        )

    discard.__doc__ = Discard.run.__doc__

    def stale(self) -> str | None:
        """Why the session record cannot be trusted as it reads, or None: it shows an operation
        (creating, committing, discarding) that no process is running any more (nobody holds the
        instance's lock), so it was interrupted. Run :meth:`recover` then."""
        record = self.store.load()
        return None if record is None else stale(self.state_dir, record)

    @property
    def online(self) -> bool:
        """Whether QEMU is connected; False for an instance opened while QEMU is not running
        (``connect(..., allow_offline=True)``)."""
        return self.conn.connected

    def start_spec(self) -> LaunchSpec:
        """How a platform must start this VM now, so that a (re)start never bypasses the forge.

        While a session is Active (or a commit is unfinished) the argv puts each forged disk on
        its overlay, backed by its original, under the recorded node names
        (:func:`forgeqmp.core.argv.active_argv`); otherwise it is the recorded command line. Pass it
        to your launcher (or :func:`forgeqmp.adapters.launcher.detached_launcher`), then run ``status``.

        :raises NoSession: there is no session record (start the VM as you always do).
        :raises SessionActive: an operation is under way or was interrupted: recover first.
        :raises PrerequisiteError: the command line cannot be retargeted (``-drive`` disks).
        """
        record = self.store.load()
        if record is None:
            raise NoSession("there is no forge session: start the VM with its own command line")
        return attrs.evolve(self._ctx.spec(record, incoming=False), argv=start_argv(record))

    async def recover(
        self,
        *,
        launcher: Launcher | None = None,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> SessionRecord | None:
        """Reconcile the session record with what is really there after a crash of this process
        or of QEMU, at any step, and return the record of the true state reached: Active (the
        forge intact), Committed, Discarded, or Failed with the exact reason and safe next step.

        It looks at QEMU (if one runs: block graph, jobs, migration) and at the session's files,
        then finishes what was past its point of no return (a commit job, a discard whose QEMU
        is gone, starting QEMU with ``launcher``) and undoes what was not (an interrupted
        enable). It is idempotent, works while QEMU is not running (open the instance with
        ``allow_offline=True``), and never deletes a file the session did not create.
        Returns None when there is no session. See :mod:`forgeqmp.core.reconcile` for the rules.

        :raises QEMUUnreachable: QEMU runs but does not answer: nothing was changed.
        :raises ForgeFailed: recover could not finish; the record says why and what to do.
        """
        return await run_recover(
            self._ctx,
            launcher=launcher,
            timeout=DEFAULT_RECOVER_TIMEOUT if timeout is None else timeout,
            report=on_progress,
        )

    def check(self, operation: guard.Operation | str) -> SessionRecord | None:
        """Refuse a platform ``operation`` (``"reinstall"``, ``Operation.BACKUP``...) while this
        instance's forge session is unfinished; returns the session record (None if none).

        Only the session record is read, so it works whether QEMU runs or not. An unreadable
        record blocks every operation a session could block.

        :raises InvalidArgument: no such operation.
        :raises OperationBlocked: the operation must wait; the error names the session, its
            state and how to finish it.
        """
        return guard.check_recorded(self.store.load, operation, exists=os.path.exists)

    async def check_with_qemu(self, operation: guard.Operation | str) -> SessionRecord | None:
        """:meth:`check`, and when the record shows no unfinished session, QEMU's block graph
        too (connected instances only): a session enabled through another state dir, or whose
        record was deleted, blocks the operation as well (see :mod:`forgeqmp.core.graphsession`).

        :raises InvalidArgument: no such operation.
        :raises OperationBlocked: the operation must wait; the error says on which session and
            where its record is, if it was found.
        """
        record = self.check(operation)
        own_session = record is not None and not status_of(record).finished
        blockable = guard.parse_operation(operation).blocked_during_session
        if self.conn.connected and blockable and not own_session:
            guard.check_graph_sessions(record, operation, await self.sessions_in_graph())
        return record

    async def execute_guarded(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send a QMP command, unless it would break this instance's unfinished forge session
        (resizing or removing a forged disk, a backup of it, a medium change, a migration, a
        link toggle, quit while forgeqmp works...: :data:`forgeqmp.core.guard.QMP_RULES`), and return
        QEMU's reply.

        A command the guard lists is checked and sent while this instance's lock is held, so no
        forge operation starts in between; any other command goes straight to QEMU.

        :raises OperationBlocked: the guard refuses the command; nothing was sent.
        :raises InstanceLocked: a forge operation holds the instance and the guard would allow
            the command after it: wait for it to finish. Nothing was sent.
        :raises QMPError: QEMU refused the command, or did not answer.
        """
        if not guard.may_refuse(command, arguments):
            return await self.conn.execute(command, arguments, timeout=timeout)
        lock = InstanceLock(self.state_dir, f"forgeqmp guarded {command}")
        try:
            lock.acquire()
        except InstanceLocked:
            # A forge operation is under way: refuse by its record if that says so.
            await self._guard_command(command, arguments)
            raise
        try:
            await self._guard_command(command, arguments)
            return await self.conn.execute(command, arguments, timeout=timeout)
        finally:
            lock.release()

    async def _guard_command(self, command: str, arguments: Mapping[str, Any] | None) -> None:
        try:
            record = self.store.load()
        except RecordError as exc:
            raise guard.record_unreadable(f"QMP command {command}", exc) from exc
        if record is None or status_of(record).finished:
            if self.conn.connected and (found := await self.sessions_in_graph()):
                # A session of another state dir (or whose record was deleted): the guard cannot
                # tell which disks it forged, so it refuses every command it could refuse.
                raise OperationBlocked(
                    f"QMP command {command} is blocked: " + "; ".join(s.describe() for s in found),
                    operation=f"QMP command {command}",
                    next_step="finish that session through the state dir that enabled it",
                )
            return
        nodes = None
        if self.conn.connected:  # the graph names nodes the record does not (the originals')
            nodes = await self.conn.execute("query-named-block-nodes", {"flat": True})
        guard.check_qmp_command(record, command, arguments, block_nodes=nodes)


@contextlib.asynccontextmanager
async def connect(
    qmp_socket: str | os.PathLike[str],
    *,
    state_dir: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    allow_offline: bool = False,
    launcher: Launcher | None = None,
) -> AsyncIterator[Instance]:
    """Connect to a QEMU's QMP socket and open its Forge instance.

    ``state_dir`` holds the session record, the memory file and the lock; by default it is derived
    from the socket path (:func:`forgeqmp.adapters.statedir.default_state_dir`), so two instances never share
    one.

    ``allow_offline``: when QEMU is provably not running (nobody listens on the socket and the
    recorded QEMU process is gone, see :func:`forgeqmp.adapters.qemuproc.qemu_down`), open the instance
    anyway, without a connection (``instance.online`` is False): ``status``, ``recover``,
    ``commit`` (merges with qemu-img) and ``discard`` (starts the VM) work on a stopped VM.

    ``launcher``: how the platform starts this QEMU (:data:`forgeqmp.adapters.launcher.Launcher`, e.g.
    :func:`forgeqmp.adapters.launcher.executable_launcher`), used by ``discard`` and ``recover`` when they
    are not given one. Without it, ``enable`` refuses a VM whose command line a plain re-exec
    cannot reproduce (inherited fds, fd sets: :mod:`forgeqmp.core.relaunch`), and discard re-runs the
    recorded argv (:func:`forgeqmp.adapters.launcher.detached_launcher`).

    :raises QEMUUnreachable: nothing answers QMP on the socket (and, with ``allow_offline``,
        QEMU may still be running: it is never treated as stopped then).
    """
    directory = StateDir(state_dir if state_dir is not None else default_state_dir(qmp_socket))
    conn = QMPConnection(qmp_socket)
    try:
        await conn.connect(_check_timeout("timeout", timeout))
    except QEMUUnreachable as exc:
        if not allow_offline or isinstance(exc, NotQMP):
            raise
        if not qemu_down(os.fspath(qmp_socket), RecordStore(directory).load()):
            raise
        log.info("QEMU is not running on %s: the instance is opened offline", qmp_socket)
    instance = Instance(conn, directory)
    instance.launcher = launcher
    try:
        yield instance
    finally:
        await conn.close()
