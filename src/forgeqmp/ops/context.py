"""What every operation of an :class:`~forgeqmp.forge.Instance` shares: the connection and
state directory, the session record's writes (each one before an irreversible step), the crash
points, the prerequisite checks, and the QMP steps more than one operation takes (waiting for a
migration, pausing and resuming the guest, switching a disk from its overlay back to its
original). The operations themselves are in :mod:`forgeqmp.ops.enable`,
:mod:`forgeqmp.ops.commit` and :mod:`forgeqmp.ops.discard`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread

from forgeqmp.adapters import crashpoints
from forgeqmp.adapters.featureprobe import probe
from forgeqmp.adapters.hostflush import flush_host_images, image_files
from forgeqmp.adapters.launcher import Launcher, LaunchSpec
from forgeqmp.adapters.process import is_alive
from forgeqmp.adapters.qmp import QMPConnection
from forgeqmp.adapters.recordstore import RecordStore, graph_sessions
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.core.argv import cold_argv, incoming_argv
from forgeqmp.core.disks import Disk, disks_from_query, qom_path_of
from forgeqmp.core.features import Features
from forgeqmp.core.graphsession import GraphSession
from forgeqmp.core.lifecycle import advance, status_of
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.common import (
    CONT,
    MIGRATE_CANCEL,
    QUERY_BLOCK,
    QUERY_JOBS,
    QUERY_MIGRATE,
    QUERY_NAMED_BLOCK_NODES,
    QUERY_STATUS,
    continue_from_pre_switchover,
    qom_get,
)
from forgeqmp.core.progress import StateListener
from forgeqmp.core.reconcile import MIGRATION_RUNNING
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import Event, SessionStatus, next_state
from forgeqmp.errors import (
    ForgeError,
    ForgeFailed,
    InvalidArgument,
    NoSession,
    QMPCommandError,
    SessionActive,
    TaskRunning,
    VMNotRunning,
    describe_cause,
)

# The logger names are part of the documented interface (docs/embedding.md, "Logs"): they
# stay what they were before the modules moved.
log = logging.getLogger("forgeqmp.driver_base")

__all__ = [
    "DEFAULT_COMMIT_TIMEOUT",
    "DEFAULT_DISCARD_TIMEOUT",
    "DEFAULT_ENABLE_TIMEOUT",
    "Context",
    "send",
]

#: Seconds enable may take in all (the memory save dominates: ~3 GB/s here, far less under load).
DEFAULT_ENABLE_TIMEOUT = 600.0
#: Seconds a commit may take in all (the product's 1 hour default).
DEFAULT_COMMIT_TIMEOUT = 3600.0
#: Seconds a discard may take from the call to the VM running again.
DEFAULT_DISCARD_TIMEOUT = 300.0
#: Seconds between two progress polls of a block job.
PROGRESS_INTERVAL = 0.2
#: Seconds any undo step may take after a failure.
_UNDO_TIMEOUT = 60.0
#: Migration statuses that end a migration.
_MIGRATION_ENDED = frozenset({"completed", "failed", "cancelled"})


async def send(conn: QMPConnection, command: Command, *, timeout: float | None = None) -> Any:
    """Send one planned command (a :class:`~forgeqmp.core.plans.command.Command`) and return
    QEMU's answer: the one way the operations talk QMP (see :mod:`forgeqmp.core.plans`).
    ``timeout``: seconds to wait for the answer (default: the connection's)."""
    arguments = command.arguments or None
    if timeout is None:
        return await conn.execute(command.name, arguments)
    return await conn.execute(command.name, arguments, timeout=timeout)


def _now() -> datetime:
    return datetime.now(UTC)


def _event_time(event: Mapping[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


def _check_timeout(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)


def _overlay_gone(record: SessionRecord, disk: str) -> SessionRecord:
    """The record with ``disk`` merged and its overlay removed (nothing left to commit)."""
    return record.evolve_disk(
        disk, merged=True, overlay_node=None, overlay_file_node=None, commit_job=None
    )


def _log_tail(path: str, since: float, size: int = 1500) -> str | None:
    """The last lines of QEMU's log at ``path`` if QEMU wrote to it after ``since`` (a time.time()
    value), else None: an older message is not about what just happened."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_mtime < since:
                return None
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return None
    return " / ".join(line.strip() for line in text.splitlines() if line.strip()) or None


class Context:
    """The state and plumbing shared by the operations (see the module's docstring)."""

    #: The platform's launcher, set by :func:`forgeqmp.connect` (``launcher=``): used by discard
    #: and recover when no launcher is passed per call, and it lets enable accept a command line
    #: that a plain re-exec cannot reproduce (see :mod:`forgeqmp.core.relaunch`).
    launcher: Launcher | None = None

    def __init__(self, conn: QMPConnection, state_dir: StateDir) -> None:
        self.conn = conn
        self.state_dir = state_dir
        self.store = RecordStore(state_dir)
        #: The features of the QEMU process they were probed on (discard restarts QEMU, and a
        #: platform's launcher may start another binary).
        self._features: tuple[int, Features] | None = None
        self._state_listeners: list[StateListener] = []

    def follow(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener(record)`` each time a session of this instance changes state (after the
        new state is on disk). Returns a function that stops following.

        Listeners run in the event loop's thread and must not block; an exception in one is
        propagated (it is the caller's bug, not a QEMU failure). Other processes follow a session
        by reading its record (:meth:`session`, ``forgeqmp status``).
        """
        self._state_listeners.append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._state_listeners.remove(listener)

        return stop

    async def send(self, command: Command, *, timeout: float | None = None) -> Any:
        """Send one planned command (see :mod:`forgeqmp.core.plans`); returns QEMU's answer."""
        return await send(self.conn, command, timeout=timeout)

    # --- queries ---------------------------------------------------------------------------------

    async def features(self) -> Features:
        """What this QEMU supports (probed once per QEMU process: again after a relaunch)."""
        pid = self.conn.peer.pid
        if self._features is None or self._features[0] != pid:
            self._features = (pid, await probe(self.conn))
        return self._features[1]

    def session(self) -> SessionRecord | None:
        """The current session record (None if this instance never had one or it was archived)."""
        return self.store.load()

    async def disks(self) -> tuple[Disk, ...]:
        """The VM's disk devices, with their attached nodes and boot order."""
        blocks = await self.send(QUERY_BLOCK)
        bootindexes: dict[str, int] = {}
        for entry in blocks:
            qdev = entry.get("qdev")
            if not qdev or entry.get("removable"):
                continue
            try:
                value = await self.send(qom_get(qom_path_of(qdev), "bootindex"))
            except QMPCommandError:
                continue  # a device without a bootindex property
            if isinstance(value, int):
                bootindexes[qdev] = value
        return disks_from_query(blocks, bootindexes)

    async def runstate(self) -> str:
        """QEMU's runstate (``running``, ``paused``, ``suspended``...)."""
        reply = await self.send(QUERY_STATUS)
        return str(reply["status"])

    # --- prerequisites (each a typed error, nothing changed) -------------------------------------

    async def check_no_task(self, ours: frozenset[str] = frozenset()) -> None:
        """Refuse while QEMU runs a block job or a migration; ``ours``: ids of jobs this
        session left running (a commit stopped by its deadline), which are not in the way."""
        jobs = [j for j in await self.send(QUERY_JOBS) if j["id"] not in ours]
        if jobs:
            names = ", ".join(f"{j['id']} ({j['type']}, {j['status']})" for j in jobs)
            raise TaskRunning(
                f"a block job is running on this VM: {names}; wait for it to finish or cancel it"
            )
        migration = await self.send(QUERY_MIGRATE)
        status = migration.get("status")
        if status in MIGRATION_RUNNING:
            raise TaskRunning(
                f"a migration is in progress (status {status!r}); wait for it to finish or "
                "cancel it (QMP migrate_cancel)"
            )

    async def check_running(self) -> None:
        status = await self.runstate()
        if status != "running":
            raise VMNotRunning(status)

    async def sessions_in_graph(self) -> tuple[GraphSession, ...]:
        """Forge sessions QEMU's block graph shows (whatever state dir enabled them), with the
        records of them found on this host (see :mod:`forgeqmp.core.graphsession`)."""
        nodes = await self.send(QUERY_NAMED_BLOCK_NODES)
        return graph_sessions(nodes, self.state_dir.path, self.conn.socket_path)

    async def check_no_session_in_graph(self) -> None:
        """Refuse when QEMU shows a forge session this state dir's record does not account for
        (enabled through another state dir, or its record deleted): stacking a second session on
        it would make a later discard restore memory onto disks from another moment."""
        found = await self.sessions_in_graph()
        if found:
            raise SessionActive(
                "; ".join(s.describe() for s in found)
                + ". Finish that session first: a second one on top of it would make a discard "
                "restore memory onto disks from another moment"
            )

    def check_no_unfinished_session(self) -> SessionRecord | None:
        record = self.store.load()
        if record is None:
            return None
        if not status_of(record).finished:
            raise SessionActive(
                f"session {record.session_id} is {record.state.value} (step {record.step.value}); "
                + (record.next_step or "commit or discard it first")
            )
        return record

    # --- the session record (written before every irreversible step) -----------------------------

    def reload(self, record: SessionRecord) -> SessionRecord:
        """The latest saved version of ``record`` (steps save as they go)."""
        try:
            saved = self.store.load()
        except ForgeError:
            return record
        return saved if saved is not None and saved.session_id == record.session_id else record

    def save(
        self, record: SessionRecord, event: Event | None = None, **changes: Any
    ) -> SessionRecord:
        """Save ``record`` with ``changes``, and moved by ``event`` if given: the one way an
        operation changes a session's state (:func:`forgeqmp.core.lifecycle.advance`; a
        ``state=`` change is refused). A change of state drops the ``next_step`` of the state
        left (it told what to do *there*: "the session is Active..." on a discarded session
        would mislead) unless ``changes`` gives the new state's own."""
        previous, previous_step = record.state, record.step
        if event is not None:
            if next_state(previous, event) is not previous:
                changes.setdefault("next_step", None)
            record = advance(record, event, updated_at=_now(), **changes)
        else:
            record = record.evolve(updated_at=_now(), **changes)
        self.store.save(record)
        if record.state is not previous or record.step != previous_step:
            # Every step of every operation is saved here first: one INFO line each.
            log.info(
                "session %s: %s, step %s%s",
                record.session_id,
                record.state.value,
                record.step.value,
                f" (error: {record.error})" if "error" in changes and record.error else "",
            )
        if record.state is not previous:
            self.state_changed(record)
        return record

    def state_changed(self, record: SessionRecord) -> None:
        for listener in list(self._state_listeners):
            listener(record)

    def failure_reason(self, cause: BaseException, *, pid: int | None, since: float) -> str:
        """Why an operation stopped, for its record: the inner error(s) of ``cause`` (never a task
        group's "unhandled errors"), and, when the QEMU it talked to (``pid``) is gone, that it
        exited, with QEMU's own last words from the state dir's ``qemu.log`` if it wrote any since
        ``since`` (the QEMU forgeqmp relaunched logs there; one the platform started logs where
        the platform says)."""
        reason = describe_cause(cause)
        if pid is not None and not is_alive(pid):
            reason += f"; QEMU (pid {pid}) exited"
            tail = _log_tail(str(self.state_dir.path_of("qemu.log")), since)
            if tail:
                reason += f"; QEMU's log says: {tail}"
        return reason

    @staticmethod
    def started() -> float:
        """The wall-clock time an operation starts at (to tell QEMU's log lines about it)."""
        return time.time()

    def crash_point(self, operation: str, step: str) -> None:
        """A step boundary: the fault-matrix tests crash here (see :mod:`forgeqmp.adapters.crashpoints`)."""
        peer = self.conn._peer  # the QEMU talked to now, if any
        crashpoints.reached(operation, step, peer.pid if peer is not None else None)

    def current(self) -> SessionRecord:
        """The session record as saved now (there must be one: callers hold the lock)."""
        record = self.store.load()
        if record is None:
            raise ForgeFailed(
                f"the session record {self.store.path} disappeared while forgeqmp worked on it; "
                "run 'forgeqmp recover'"
            )
        return record

    def require_session(
        self, operation: str, allowed: Callable[[SessionStatus], bool]
    ) -> SessionRecord:
        record = self.store.load()
        if record is None:
            raise NoSession(
                f"there is no forge session to {operation} on this instance (state dir "
                f"{self.state_dir.path}); start one with 'forgeqmp enable', or pass the "
                "--state-dir the session was enabled with"
            )
        status = status_of(record)
        if not allowed(status):
            detail = f"; {record.next_step}" if record.next_step else ""
            raise NoSession(
                f"cannot {operation}: session {record.session_id} is {record.state.value}{detail}"
            )
        return record

    # --- QMP steps more than one operation takes -------------------------------------------------

    @staticmethod
    def pause_ms(events: Sequence[Mapping[str, Any]]) -> float | None:
        """Guest pause from QEMU's own STOP→RESUME event timestamps (first STOP, last RESUME)."""
        stops = [_event_time(e) for e in events if e["event"] == "STOP"]
        resumes = [_event_time(e) for e in events if e["event"] == "RESUME"]
        if not stops or not resumes:
            return None
        return round(max(0.0, resumes[-1] - stops[0]) * 1000, 3)

    async def wait_migration(self, migration: Any, wanted: str, what: str) -> None:
        """Wait until the MIGRATION status is ``wanted``; a failed or cancelled migration raises."""
        ev = await migration.wait(
            lambda e: e["data"]["status"] in ({wanted} | _MIGRATION_ENDED),
            DEFAULT_ENABLE_TIMEOUT * 10,  # bounded by the caller's overall deadline
            what,
        )
        status = ev["data"]["status"]
        if status != wanted:
            info = await self.send(QUERY_MIGRATE)
            desc = info.get("error-desc", "no detail from QEMU")
            raise ForgeFailed(f"saving the memory state {status}: {desc}")

    async def flush_before_pause(self) -> None:
        """Write the host's cached data of every image to storage while the guest still runs, so
        that the flush QEMU does when it pauses the guest is short (see hostflush)."""
        await flush_host_images(image_files(await self.send(QUERY_BLOCK)))

    async def resume(self) -> None:
        """``cont`` once the runstate left ``finish-migrate`` (before, cont is refused)."""
        while True:
            status = await self.runstate()
            if status == "running":
                return
            if status != "finish-migrate":
                await self.send(CONT)
                return
            await anyio.sleep(0.001)

    async def cancel_migration(self) -> None:
        conn = self.conn
        with conn.subscribe("MIGRATION") as migration:
            info = await self.send(QUERY_MIGRATE)
            if info.get("status") in _MIGRATION_ENDED or info.get("status") in (None, "none"):
                return
            await self.send(MIGRATE_CANCEL)
            if info.get("status") == "pre-switchover":
                # Cancelling at the pause needs the migration to be let go on.
                with contextlib.suppress(QMPCommandError):
                    await self.send(continue_from_pre_switchover())
            await migration.wait(
                lambda e: e["data"]["status"] in _MIGRATION_ENDED, _UNDO_TIMEOUT, "cancelled"
            )

    async def resume_if_stopped(self) -> None:
        status = await self.runstate()
        if status in ("paused", "postmigrate", "finish-migrate"):
            await self.resume()

    async def resume_left_paused(self, record: SessionRecord) -> SessionRecord:
        """Resume a guest that an interrupted step of this library left paused (the record's
        ``paused_by_forgeqmp``, written before each pause), and clear the mark. Any other pause
        is the owner's, and stays."""
        if not record.paused_by_forgeqmp:
            return record
        if await self.runstate() in ("paused", "postmigrate", "finish-migrate"):
            log.warning(
                "session %s: resuming the guest a stopped step left paused", record.session_id
            )
            await self.resume()
        return self.save(record, paused_by_forgeqmp=False)

    def remove_memory_file(self, record: SessionRecord) -> None:
        if record.memory is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record.memory.path)
            self.state_dir.fsync_dir()

    def spec(self, record: SessionRecord, *, incoming: bool) -> LaunchSpec:
        argv = record.qemu.argv
        return LaunchSpec(
            argv=incoming_argv(argv) if incoming else cold_argv(argv),
            cwd=record.qemu.cwd,
            env=record.qemu.env,
            qmp_socket=record.qemu.qmp_socket,
            incoming=incoming,
            log_file=str(self.state_dir.path_of("qemu.log")),
        )
