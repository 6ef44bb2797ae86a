"""The Forge session driver: executes the plans of :mod:`forgeqmp.plans` over QMP.

An :class:`Instance` is one QEMU (one QMP socket), its private state directory and its lock. Its
methods check prerequisites (typed errors, nothing changed), write the session record before every
irreversible step, run the plan with a deadline on every wait, and on any failure or cancellation
undo what they did, shielded from the cancellation, so the VM keeps running as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
import attrs

from forgeqmp import crashpoints, guard, memhash
from forgeqmp.disks import Disk, disks_from_query, qom_path_of, select_disks
from forgeqmp.errors import (
    ForgeError,
    ForgeFailed,
    InstanceLocked,
    InvalidArgument,
    NoSession,
    NotQMP,
    PrerequisiteError,
    QEMUUnreachable,
    QMPCommandError,
    QMPError,
    RecordError,
    SessionActive,
    TaskRunning,
    VMNotRunning,
)
from forgeqmp.features import Features, probe
from forgeqmp.hostflush import flush_host_images, image_files
from forgeqmp.launcher import Launcher, LaunchSpec, cold_argv, detached_launcher, incoming_argv
from forgeqmp.plans.command import Command
from forgeqmp.plans.enable import EnablePlan, OverlayPlan, Strategy, Transport, plan_enable
from forgeqmp.power import (
    active_argv,
    commit_overlay,
    find_qemu_img,
    qemu_down,
    recorded_qemu_alive,
    start_argv,
)
from forgeqmp.process import describe_process, wait_gone
from forgeqmp.qmp import DEFAULT_CONNECT_TIMEOUT, QMPConnection
from forgeqmp.record import (
    DiskRecord,
    MemoryRecord,
    QemuRecord,
    RecordStore,
    SessionRecord,
    new_session_id,
)
from forgeqmp.recover import MIGRATION_RUNNING
from forgeqmp.statedir import InstanceLock, StateDir, default_state_dir
from forgeqmp.states import Event, Failure, SessionStatus, State

__all__ = [
    "DEFAULT_COMMIT_TIMEOUT",
    "DEFAULT_DISCARD_TIMEOUT",
    "DEFAULT_ENABLE_TIMEOUT",
    "Instance",
    "ProgressEvent",
    "connect",
    "status_of",
]

log = logging.getLogger(__name__)

#: Seconds enable may take in all (the memory save dominates: ~3 GB/s here, far less under load).
DEFAULT_ENABLE_TIMEOUT = 600.0
#: Seconds a commit may take in all (the product's 1 hour default).
DEFAULT_COMMIT_TIMEOUT = 3600.0
#: Seconds a discard may take from the call to the VM running again.
DEFAULT_DISCARD_TIMEOUT = 300.0
#: Capabilities of the save that the restoring QEMU must also have.
_RESTORE_CAPABILITIES = frozenset({"mapped-ram", "multifd"})
#: Seconds between two progress polls of a block job.
PROGRESS_INTERVAL = 0.2
#: Seconds any undo step may take after a failure.
_UNDO_TIMEOUT = 60.0
#: Migration statuses that end a migration.
_MIGRATION_ENDED = frozenset({"completed", "failed", "cancelled"})


@attrs.frozen
class ProgressEvent:
    """A step or progress report, for callbacks and the CLI's JSON lines."""

    operation: str
    step: str
    detail: Mapping[str, Any] = attrs.field(factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"event": "progress", "operation": self.operation, "step": self.step, **self.detail}


ProgressCallback = Callable[[ProgressEvent], None]

#: Called with the session record each time its state changes (see :meth:`Instance.follow`).
StateListener = Callable[[SessionRecord], None]


def _now() -> datetime:
    return datetime.now(UTC)


def status_of(record: SessionRecord) -> SessionStatus:
    """The sans-IO status (state + failure) a record describes."""
    if record.state is not State.FAILED:
        return SessionStatus(record.state, None)
    # Fully merged: the overlay is gone. A disk whose commit started but did not finish is
    # pending (a later commit finishes it) and also bars discard (see Instance.discard).
    merged = tuple(d.name for d in record.disks if d.merged and d.overlay_node is None)
    pending = tuple(d.name for d in record.disks if d.overlay_node is not None)
    if record.rolled_back:  # everything was undone: the planned overlays never stayed
        merged = pending = ()
    failure = Failure(
        phase=record.failure_phase or State.ACTIVE,
        reason=record.error or "unknown failure",
        next_step=record.next_step or "run 'forgeqmp recover'",
        rolled_back=record.rolled_back,
        merged_disks=merged,
        pending_disks=pending,
    )
    return SessionStatus(State.FAILED, failure)


def _event_time(event: Mapping[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


def _check_timeout(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)


@attrs.define
class _EnableUndo:
    """What an enable has done so far, so a failure undoes exactly that and nothing else."""

    files: list[str] = attrs.Factory(list)
    nodes: list[str] = attrs.Factory(list)
    jobs: list[str] = attrs.Factory(list)
    fdset_id: int | None = None
    fd_name: str | None = None
    previous_capabilities: dict[str, bool] | None = None
    previous_parameters: dict[str, Any] | None = None
    migration_started: bool = False
    migration_completed: bool = False
    snapshotted: bool = False
    stopped_by_us: bool = False


class Instance:
    """One QEMU instance: its QMP connection, its state directory and its session.

    Create it with :func:`connect`. All methods are coroutines to run under anyio's asyncio backend.
    """

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

    # --- queries -----------------------------------------------------------------------------

    async def features(self) -> Features:
        """What this QEMU supports (probed once per QEMU process: again after a relaunch)."""
        pid = self.conn.peer.pid
        if self._features is None or self._features[0] != pid:
            self._features = (pid, await probe(self.conn))
        return self._features[1]

    def session(self) -> SessionRecord | None:
        """The current session record (None if this instance never had one or it was archived)."""
        return self.store.load()

    def stale(self) -> str | None:
        """Why the session record cannot be trusted as it reads, or None: it shows an operation
        (creating, committing, discarding) that no process is running any more (nobody holds the
        instance's lock), so it was interrupted. Run :meth:`recover` then."""
        from forgeqmp.recover_driver import stale

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
        (:func:`forgeqmp.power.active_argv`); otherwise it is the recorded command line. Pass it
        to your launcher (or :func:`forgeqmp.launcher.detached_launcher`), then run ``status``.

        :raises NoSession: there is no session record (start the VM as you always do).
        :raises SessionActive: an operation is under way or was interrupted: recover first.
        :raises PrerequisiteError: the command line cannot be retargeted (``-drive`` disks).
        """
        record = self.store.load()
        if record is None:
            raise NoSession("there is no forge session: start the VM with its own command line")
        return attrs.evolve(self._spec(record, incoming=False), argv=start_argv(record))

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
        Returns None when there is no session. See :mod:`forgeqmp.recover` for the rules.

        :raises QEMUUnreachable: QEMU runs but does not answer: nothing was changed.
        :raises ForgeFailed: recover could not finish; the record says why and what to do.
        """
        from forgeqmp.recover_driver import DEFAULT_RECOVER_TIMEOUT, run_recover

        return await run_recover(
            self,
            launcher=launcher,
            timeout=DEFAULT_RECOVER_TIMEOUT if timeout is None else timeout,
            report=on_progress,
        )

    async def disks(self) -> tuple[Disk, ...]:
        """The VM's disk devices, with their attached nodes and boot order."""
        blocks = await self.conn.execute("query-block")
        bootindexes: dict[str, int] = {}
        for entry in blocks:
            qdev = entry.get("qdev")
            if not qdev or entry.get("removable"):
                continue
            try:
                value = await self.conn.execute(
                    "qom-get", {"path": qom_path_of(qdev), "property": "bootindex"}
                )
            except QMPCommandError:
                continue  # a device without a bootindex property
            if isinstance(value, int):
                bootindexes[qdev] = value
        return disks_from_query(blocks, bootindexes)

    async def runstate(self) -> str:
        """QEMU's runstate (``running``, ``paused``, ``suspended``...)."""
        reply = await self.conn.execute("query-status")
        return str(reply["status"])

    # --- the guard (see forgeqmp.guard) ------------------------------------------------------

    def check(self, operation: guard.Operation | str) -> SessionRecord | None:
        """Refuse a platform ``operation`` (``"reinstall"``, ``Operation.BACKUP``...) while this
        instance's forge session is unfinished; returns the session record (None if none).

        Only the session record is read, so it works whether QEMU runs or not. An unreadable
        record blocks every operation a session could block.

        :raises InvalidArgument: no such operation.
        :raises OperationBlocked: the operation must wait; the error names the session, its
            state and how to finish it.
        """
        return guard.check_recorded(self.store.load, operation)

    async def execute_guarded(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send a QMP command, unless it would break this instance's unfinished forge session
        (resizing or removing a forged disk, a backup of it, a medium change, a migration, a
        link toggle, quit while forgeqmp works...: :data:`forgeqmp.guard.QMP_RULES`), and return
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
            return
        nodes = None
        if self.conn.connected:  # the graph names nodes the record does not (the originals')
            nodes = await self.conn.execute("query-named-block-nodes", {"flat": True})
        guard.check_qmp_command(record, command, arguments, block_nodes=nodes)

    async def _check_no_task(self) -> None:
        jobs = await self.conn.execute("query-jobs")
        if jobs:
            names = ", ".join(f"{j['id']} ({j['type']}, {j['status']})" for j in jobs)
            raise TaskRunning(
                f"a block job is running on this VM: {names}; wait for it to finish or cancel it"
            )
        migration = await self.conn.execute("query-migrate")
        status = migration.get("status")
        if status in MIGRATION_RUNNING:
            raise TaskRunning(
                f"a migration is in progress (status {status!r}); wait for it to finish or "
                "cancel it (QMP migrate_cancel)"
            )

    async def _check_running(self) -> None:
        status = await self.runstate()
        if status != "running":
            raise VMNotRunning(status)

    def _check_no_unfinished_session(self) -> SessionRecord | None:
        record = self.store.load()
        if record is None:
            return None
        if not status_of(record).finished:
            raise SessionActive(
                f"session {record.session_id} is {record.state.value} (step {record.step}); "
                + (record.next_step or "commit or discard it first")
            )
        return record

    # --- enable ------------------------------------------------------------------------------

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
        """Snapshot the selected disks and save the memory state, from the same instant, while the
        guest runs (paused for tens of milliseconds). Returns the Active session's record.

        ``disks``: qdev ids, qdev paths or node-names; default the primary disk; ``all_disks``
        for every writable disk. ``strategy``: see :class:`Strategy` (default: the one that pauses
        least). ``overlay_dir``: where overlays go (default: next to each disk's image).

        :raises InvalidArgument: an unknown disk or strategy, a bad timeout. Nothing changed.
        :raises PrerequisiteError: VM not running, another task or session, no forgeable disk,
            QEMU lacking a feature. Nothing changed.
        :raises ForgeFailed: a step failed; everything was undone (the record says so) unless
            the record's ``next_step`` says otherwise.
        """
        timeout = _check_timeout("timeout", timeout)
        if isinstance(strategy, str):
            try:
                strategy = Strategy(strategy)
            except ValueError:
                known = ", ".join(s.value for s in Strategy)
                raise InvalidArgument(
                    f"unknown strategy {strategy!r}; use one of {known}"
                ) from None
        elif strategy is not None and not isinstance(strategy, Strategy):
            raise InvalidArgument(f"strategy must be a Strategy or its name, not {strategy!r}")
        if disks is not None and isinstance(disks, str):
            disks = [disks]
        if disks is not None:
            if isinstance(disks, bytes | bytearray) or not isinstance(disks, Iterable):
                raise InvalidArgument(f"disks must be a list of disk names, not {disks!r}")
            disks = list(disks)
            if not all(isinstance(name, str) for name in disks):
                raise InvalidArgument(f"disk names must be strings, not {disks!r}")
        if disks is not None and all_disks:
            raise InvalidArgument("name disks or choose all disks, not both")
        if overlay_dir is not None:
            if not isinstance(overlay_dir, str | os.PathLike) or not os.fspath(overlay_dir):
                raise InvalidArgument(f"overlay_dir must be a directory path, not {overlay_dir!r}")
            overlay_dir = os.path.abspath(overlay_dir)
            if not isinstance(overlay_dir, str) or not os.path.isdir(overlay_dir):
                raise InvalidArgument(
                    f"overlay directory {overlay_dir} does not exist; create it, or pass an "
                    "existing directory"
                )
        report = on_progress or (lambda _event: None)

        with InstanceLock(self.state_dir, "forgeqmp enable"):
            previous = self._check_no_unfinished_session()
            features = await self.features()
            await self._check_running()
            await self._check_no_task()
            selection = select_disks(
                await self.disks(), list(disks) if disks is not None else None, all_disks=all_disks
            )
            session_id = new_session_id()
            memory_name = f"memory-{session_id}.bin"
            plan = plan_enable(
                session_id=session_id,
                selection=selection,
                features=features,
                memory_file=str(self.state_dir.path_of(memory_name)),
                strategy=strategy,
                overlay_dir=os.fspath(overlay_dir) if overlay_dir is not None else None,
            )
            for overlay in plan.overlays:
                if os.path.lexists(overlay.overlay_file):
                    raise ForgeFailed(
                        f"{overlay.overlay_file} already exists; forgeqmp never reuses a file it "
                        "did not create: remove it if it is stale, or choose another overlay_dir"
                    )
            record = await self._new_record(plan, selection.unforged, features)
            report(
                ProgressEvent("enable", "planned", {"disks": [o.disk.name for o in plan.overlays]})
            )
            if previous is not None:
                self.store.archive(force=True)
            self.store.save(record)
            self._state_changed(record)
            self._crash_point("enable", "planned")
            undo = _EnableUndo()
            try:
                with anyio.fail_after(timeout):
                    record = await self._run_enable(plan, record, undo, report)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    record = self._reload(record)
                    record = await self._undo_enable(plan, record, undo, exc)
                if isinstance(exc, TimeoutError):
                    raise ForgeFailed(
                        f"enable did not finish within {timeout:g} s and was undone"
                    ) from None
                if isinstance(exc, ForgeError | OSError):
                    raise ForgeFailed(f"enable failed and was undone: {exc}") from exc
                raise
            return record

    async def _new_record(
        self, plan: EnablePlan, unforged: Sequence[Disk], features: Features
    ) -> SessionRecord:
        peer = self.conn.peer
        process = describe_process(peer.pid)
        machine = await self.conn.execute("qom-get", {"path": "/machine", "property": "type"})
        now = _now()
        disks = []
        for o in plan.overlays:
            assert o.disk.node
            assert o.disk.file
            assert o.disk.format
            assert o.disk.virtual_size is not None
            disks.append(
                DiskRecord(
                    name=o.disk.name,
                    qdev=o.disk.qdev,
                    device_node=o.disk.node,
                    base_file=os.path.abspath(o.disk.file),
                    base_format=o.disk.format,
                    virtual_size=o.disk.virtual_size,
                    overlay_file=o.overlay_file,
                    overlay_node=o.format_node,
                    overlay_file_node=o.file_node,
                )
            )
        warnings: tuple[str, ...] = ()
        if unforged:
            names = ", ".join(d.name for d in unforged)
            warnings = (
                f"disks not in the forge keep their writes on discard while memory goes back to "
                f"the moment of enable, so the guest may see them inconsistent: {names}",
            )
        return SessionRecord(
            session_id=plan.session_id,
            state=State.CREATING,
            step="planned",
            strategy=plan.strategy.value,
            created_at=now,
            updated_at=now,
            disks=tuple(disks),
            unforged_disks=tuple(d.name for d in unforged),
            memory=MemoryRecord(
                path=plan.memory_file,
                transport=plan.transport.value,
                capabilities=tuple(k for k, v in plan.capabilities.items() if v),
            ),
            qemu=QemuRecord(
                pid=peer.pid,
                argv=process.argv,
                cwd=process.cwd,
                env=dict(process.env),
                version=str(features.version),
                machine=str(machine).removesuffix("-machine"),
                qmp_socket=os.path.abspath(self.conn.socket_path),
            ),
            warnings=warnings,
        )

    def _reload(self, record: SessionRecord) -> SessionRecord:
        """The latest saved version of ``record`` (steps save as they go)."""
        try:
            saved = self.store.load()
        except ForgeError:
            return record
        return saved if saved is not None and saved.session_id == record.session_id else record

    def _save(self, record: SessionRecord, **changes: Any) -> SessionRecord:
        previous = record.state
        record = record.evolve(updated_at=_now(), **changes)
        self.store.save(record)
        if record.state is not previous:
            self._state_changed(record)
        return record

    def _state_changed(self, record: SessionRecord) -> None:
        for listener in list(self._state_listeners):
            listener(record)

    def _crash_point(self, operation: str, step: str) -> None:
        """A step boundary: the fault-matrix tests crash here (see :mod:`forgeqmp.crashpoints`)."""
        peer = self.conn._peer  # the QEMU talked to now, if any
        crashpoints.reached(operation, step, peer.pid if peer is not None else None)

    async def _run_job(self, command: Command, job_id: str, what: str, timeout: float) -> None:
        """Run a job-creating command to its conclusion, check its error, dismiss it."""
        with self.conn.subscribe(
            "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
        ) as sub:
            await self.conn.execute(command.name, command.arguments)
            await sub.wait(lambda ev: ev["data"]["status"] == "concluded", timeout, what)
        jobs = await self.conn.execute("query-jobs")
        error = next((j.get("error") for j in jobs if j["id"] == job_id), None)
        await self.conn.execute("job-dismiss", {"id": job_id})
        if error:
            raise ForgeFailed(f"{what} failed: {error}")

    async def _create_overlay(self, overlay: OverlayPlan, undo: _EnableUndo) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(overlay.overlay_file, flags, 0o600))
        undo.files.append(overlay.overlay_file)
        add_file = overlay.add_file_node()
        await self.conn.execute(add_file.name, add_file.arguments)
        undo.nodes.append(overlay.file_node)
        undo.jobs.append(overlay.create_job)
        await self._run_job(
            overlay.create_image(),
            overlay.create_job,
            f"creating the overlay {overlay.overlay_file}",
            _UNDO_TIMEOUT,
        )
        undo.jobs.remove(overlay.create_job)
        add_format = overlay.add_format_node()
        await self.conn.execute(add_format.name, add_format.arguments)
        undo.nodes.append(overlay.format_node)

    async def _run_enable(
        self,
        plan: EnablePlan,
        record: SessionRecord,
        undo: _EnableUndo,
        report: ProgressCallback,
    ) -> SessionRecord:
        conn = self.conn
        for overlay in plan.overlays:
            await self._create_overlay(overlay, undo)
        record = self._save(record, step="overlays-created")
        self._crash_point("enable", "overlays-created")
        report(ProgressEvent("enable", "overlays-created"))

        memory_name = os.path.basename(plan.memory_file)
        mem_fd = self.state_dir.create_private_file(memory_name)
        undo.files.append(plan.memory_file)
        try:
            if plan.transport is Transport.FDSET_FILE:
                # QEMU matches fdset members by access mode and opens the file write-only.
                write_fd = os.open(f"/proc/self/fd/{mem_fd}", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    undo.fdset_id, _ = await conn.add_fd(
                        write_fd, opaque=f"forgeqmp {plan.session_id}"
                    )
                finally:
                    os.close(write_fd)
            else:
                await conn.pass_fd(mem_fd, plan.fd_name)
                undo.fd_name = plan.fd_name
            caps = await conn.execute("query-migrate-capabilities")
            undo.previous_capabilities = {c["capability"]: bool(c["state"]) for c in caps}
            set_caps = plan.set_capabilities()
            await conn.execute(set_caps.name, set_caps.arguments)
            undo.previous_parameters = dict(await conn.execute("query-migrate-parameters"))
            set_params = plan.set_parameters()
            await conn.execute(set_params.name, set_params.arguments)
            record = self._save(record, step="migration-started")
            self._crash_point("enable", "migration-started")

            with (
                conn.subscribe("MIGRATION") as migration,
                conn.subscribe("STOP", "RESUME") as runstate_events,
            ):
                started = time.monotonic()
                if plan.pauses_before_switchover:
                    await self._save_with_pause(plan, undo, migration, report)
                else:
                    await self._save_in_background(plan, undo, migration, report)
                pause_ms = self._pause_ms(runstate_events.history)
                saved_s = time.monotonic() - started

            record = self._save(record, step="snapshot-done", pause_ms=pause_ms)
            self._crash_point("enable", "snapshot-done")
            report(ProgressEvent("enable", "snapshot-done", {"pause_ms": pause_ms}))

            # QEMU does not fsync the memory file: do it, then fingerprint it from the page cache.
            await anyio.to_thread.run_sync(os.fsync, mem_fd)
            self.state_dir.fsync_dir()
            digest, size = await anyio.to_thread.run_sync(memhash.hash_fd, mem_fd)
        finally:
            os.close(mem_fd)
        await self._release_migration_setup(plan, undo)
        assert record.memory is not None
        record = self._save(
            record,
            state=State.ACTIVE,
            step="active",
            activated_at=_now(),
            memory=attrs.evolve(record.memory, size=size, sha256=digest),
        )
        self._crash_point("enable", "active")
        report(
            ProgressEvent(
                "enable",
                "active",
                {"pause_ms": pause_ms, "memory_bytes": size, "save_seconds": round(saved_s, 3)},
            )
        )
        return record

    @staticmethod
    def _pause_ms(events: Sequence[Mapping[str, Any]]) -> float | None:
        """Guest pause from QEMU's own STOP→RESUME event timestamps (first STOP, last RESUME)."""
        stops = [_event_time(e) for e in events if e["event"] == "STOP"]
        resumes = [_event_time(e) for e in events if e["event"] == "RESUME"]
        if not stops or not resumes:
            return None
        return round(max(0.0, resumes[-1] - stops[0]) * 1000, 3)

    async def _wait_migration(self, migration: Any, wanted: str, what: str) -> None:
        """Wait until the MIGRATION status is ``wanted``; a failed or cancelled migration raises."""
        ev = await migration.wait(
            lambda e: e["data"]["status"] in ({wanted} | _MIGRATION_ENDED),
            DEFAULT_ENABLE_TIMEOUT * 10,  # bounded by the caller's overall deadline
            what,
        )
        status = ev["data"]["status"]
        if status != wanted:
            info = await self.conn.execute("query-migrate")
            desc = info.get("error-desc", "no detail from QEMU")
            raise ForgeFailed(f"saving the memory state {status}: {desc}")

    async def _with_memory_progress(
        self, report: ProgressCallback, wait: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``wait`` while reporting the memory save's progress (``progress`` events with
        ``done``/``total`` bytes and ``bytes_per_second``) every PROGRESS_INTERVAL.

        ``wait``'s exception is re-raised as is, not wrapped in an ExceptionGroup."""
        failed: list[Exception] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report_memory_progress, report)
            try:
                await wait()
            except Exception as exc:  # re-raised below, outside the task group
                failed.append(exc)
            finally:
                tg.cancel_scope.cancel()
        if failed:
            raise failed[0]

    async def _report_memory_progress(self, report: ProgressCallback) -> None:
        with contextlib.suppress(QMPError):  # progress is informative: never fail the save
            while True:
                info = await self.conn.execute("query-migrate")
                ram = info.get("ram")
                if info.get("status") == "active" and isinstance(ram, Mapping):
                    total = int(ram.get("total", 0))
                    done = max(0, total - int(ram.get("remaining", 0)))
                    rate = round(float(ram.get("mbps", 0.0)) * 125_000)  # Mbit/s → bytes/s
                    report(
                        ProgressEvent(
                            "enable",
                            "progress",
                            {"done": done, "total": total, "bytes_per_second": rate},
                        )
                    )
                await anyio.sleep(PROGRESS_INTERVAL)

    async def _save_with_pause(
        self, plan: EnablePlan, undo: _EnableUndo, migration: Any, report: ProgressCallback
    ) -> None:
        conn = self.conn
        migrate = plan.migrate(undo.fdset_id)
        await self._flush_before_pause()
        await conn.execute(migrate.name, migrate.arguments)
        undo.migration_started = True
        report(ProgressEvent("enable", "saving-memory"))
        await self._with_memory_progress(
            report,
            lambda: self._wait_migration(migration, "pre-switchover", "the pre-switchover pause"),
        )
        self._crash_point("enable", "pre-switchover")
        # The guest is paused: snapshot every disk or none.
        transaction = plan.transaction()
        await conn.execute(transaction.name, transaction.arguments)
        undo.snapshotted = True
        self._crash_point("enable", "snapshot-transaction-done")
        await conn.execute("migrate-continue", {"state": "pre-switchover"})
        await self._wait_migration(migration, "completed", "the end of the memory save")
        undo.migration_completed = True
        await self._resume()

    async def _save_in_background(
        self, plan: EnablePlan, undo: _EnableUndo, migration: Any, report: ProgressCallback
    ) -> None:
        conn = self.conn
        await self._flush_before_pause()
        await conn.execute("stop")
        undo.stopped_by_us = True
        transaction = plan.transaction()
        await conn.execute(transaction.name, transaction.arguments)
        undo.snapshotted = True
        migrate = plan.migrate(undo.fdset_id)
        await conn.execute(migrate.name, migrate.arguments)
        undo.migration_started = True
        await conn.execute("cont")
        undo.stopped_by_us = False
        report(ProgressEvent("enable", "saving-memory"))
        await self._with_memory_progress(
            report,
            lambda: self._wait_migration(migration, "completed", "the end of the background save"),
        )
        undo.migration_completed = True

    async def _flush_before_pause(self) -> None:
        """Write the host's cached data of every image to storage while the guest still runs, so
        that the flush QEMU does when it pauses the guest is short (see hostflush)."""
        await flush_host_images(image_files(await self.conn.execute("query-block")))

    async def _resume(self) -> None:
        """``cont`` once the runstate left ``finish-migrate`` (before, cont is refused)."""
        while True:
            status = await self.runstate()
            if status == "running":
                return
            if status != "finish-migrate":
                await self.conn.execute("cont")
                return
            await anyio.sleep(0.001)

    async def _release_migration_setup(self, plan: EnablePlan, undo: _EnableUndo) -> None:
        """Give back what the save borrowed: the fd/fdset and the migration settings."""
        conn = self.conn
        if undo.fdset_id is not None:
            with contextlib.suppress(QMPCommandError):  # QEMU may have freed it already
                await conn.execute("remove-fd", {"fdset-id": undo.fdset_id})
            undo.fdset_id = None
        if undo.fd_name is not None:
            with contextlib.suppress(QMPCommandError):  # migration closes it when done
                await conn.execute("closefd", {"fdname": undo.fd_name})
            undo.fd_name = None
        if undo.previous_parameters is not None:
            restore = plan.restore_parameters(undo.previous_parameters)
            await conn.execute(restore.name, restore.arguments)
            undo.previous_parameters = None
        if undo.previous_capabilities is not None:
            restore = plan.restore_capabilities(undo.previous_capabilities)
            await conn.execute(restore.name, restore.arguments)
            undo.previous_capabilities = None

    async def _undo_enable(
        self, plan: EnablePlan, record: SessionRecord, undo: _EnableUndo, cause: BaseException
    ) -> SessionRecord:
        """Undo a failed enable; returns the Failed record (rolled back, or what is left)."""
        problems: list[str] = []

        async def attempt(what: str, step: Callable[[], Any]) -> None:
            try:
                with anyio.fail_after(_UNDO_TIMEOUT):
                    await step()
            except Exception as exc:  # keep undoing the rest; report all that failed
                log.warning("undo step %s failed: %s", what, exc)
                problems.append(f"{what}: {exc}")

        conn = self.conn
        if undo.migration_started and not undo.migration_completed:
            await attempt("cancelling the memory save", self._cancel_migration)
        keep_overlays = False
        if undo.snapshotted:
            before = len(problems)
            await attempt(
                "moving the disks back off their overlays", lambda: self._unsnapshot(plan)
            )
            # An overlay a disk may still be on holds the guest's writes since the snapshot:
            # never delete it; recover merges it back (live, or offline once QEMU is gone).
            keep_overlays = len(problems) > before
        await attempt("resuming the guest", self._resume_if_stopped)
        for job in list(undo.jobs):
            await attempt(f"dismissing job {job}", functools.partial(self._drop_job, job))
        for node in reversed(undo.nodes):
            await attempt(
                f"removing node {node}",
                functools.partial(conn.execute, "blockdev-del", {"node-name": node}),
            )
        await attempt(
            "restoring the migration settings", lambda: self._release_migration_setup(plan, undo)
        )
        overlays = {o.overlay_file for o in plan.overlays}
        for path in reversed(undo.files):
            if keep_overlays and path in overlays:
                problems.append(f"kept {path}: it may hold writes of the guest")
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"removing {path}: {exc}")
        reason = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        if isinstance(cause, TimeoutError):
            reason = "the enable deadline passed"
        rolled_back = not problems
        record = self._reload(record)  # the undo records disks moved back off their overlays
        next_step = (
            "nothing to do: everything was undone and the VM runs as before; enable again when "
            "the cause is fixed"
            if rolled_back
            else "run 'forgeqmp recover'; undo left: " + "; ".join(problems)
        )
        try:
            return self._save(
                record,
                state=State.FAILED,
                failure_phase=State.CREATING,
                rolled_back=rolled_back,
                error=f"enable failed at step {record.step}: {reason}",
                next_step=next_step,
                finished_at=_now() if rolled_back else None,
            )
        except (ForgeError, OSError) as exc:
            log.error("could not record the failed enable: %s", exc)
            return record

    async def _cancel_migration(self) -> None:
        conn = self.conn
        with conn.subscribe("MIGRATION") as migration:
            info = await conn.execute("query-migrate")
            if info.get("status") in _MIGRATION_ENDED or info.get("status") in (None, "none"):
                return
            await conn.execute("migrate_cancel")
            if info.get("status") == "pre-switchover":
                # Cancelling at the pause needs the migration to be let go on.
                with contextlib.suppress(QMPCommandError):
                    await conn.execute("migrate-continue", {"state": "pre-switchover"})
            await migration.wait(
                lambda e: e["data"]["status"] in _MIGRATION_ENDED, _UNDO_TIMEOUT, "cancelled"
            )

    async def _resume_if_stopped(self) -> None:
        status = await self.runstate()
        if status in ("paused", "postmigrate", "finish-migrate"):
            await self._resume()

    async def _drop_job(self, job_id: str) -> None:
        jobs = await self.conn.execute("query-jobs")
        job = next((j for j in jobs if j["id"] == job_id), None)
        if job is None:
            return
        if job["status"] != "concluded":
            with self.conn.subscribe(
                "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
            ) as sub:
                with contextlib.suppress(QMPCommandError):
                    await self.conn.execute("job-cancel", {"id": job_id})
                await sub.wait(
                    lambda ev: ev["data"]["status"] == "concluded", _UNDO_TIMEOUT, "job end"
                )
        await self.conn.execute("job-dismiss", {"id": job_id})

    async def _unsnapshot(self, plan: EnablePlan) -> None:
        """Put each disk back on its original node by committing its (new, nearly empty) overlay."""
        blocks = await self.conn.execute("query-block")
        attached = {
            str(b.get("qdev")): b["inserted"]["node-name"] for b in blocks if b.get("inserted")
        }
        for overlay in plan.overlays:
            if attached.get(overlay.disk.qdev) != overlay.format_node:
                continue
            assert overlay.disk.node is not None
            await self._commit_back(
                overlay.disk.name,
                overlay.disk.qdev,
                overlay.format_node,
                overlay.disk.node,
                f"{overlay.create_job}-undo",
            )

    async def _commit_back(
        self,
        disk: str,
        qdev: str,
        top_node: str,
        base_node: str,
        job_id: str,
    ) -> None:
        """Undo a snapshot: commit the overlay into the original, then record (before the guest
        may write into the original) that the disk left its overlay, so that a crash can never
        make recover merge the then stale overlay over newer writes."""
        conn = self.conn
        with conn.subscribe(
            "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
        ) as sub:
            await conn.execute(
                "block-commit",
                {
                    "job-id": job_id,
                    "device": top_node,
                    "base-node": base_node,
                    "auto-dismiss": False,
                },
            )
            await sub.wait(
                lambda e: e["data"]["status"] in ("ready", "concluded"),
                _UNDO_TIMEOUT,
                "commit ready",
            )

        def left_overlay(record: SessionRecord) -> SessionRecord:
            return record.evolve_disk(disk, overlay_node=None, overlay_file_node=None)

        await self._pivot(disk, qdev, base_node, job_id, left_overlay, mark_step=False)

    # --- commit ------------------------------------------------------------------------------

    async def commit(
        self,
        *,
        timeout: float = DEFAULT_COMMIT_TIMEOUT,
        on_progress: ProgressCallback | None = None,
    ) -> SessionRecord:
        """Merge every forged disk's overlay into its original, live, disks in parallel.

        The guest runs throughout; its writes during the commit end up in the originals. Returns
        the Committed record.

        Point of no return: a disk's original starts receiving its overlay's data when its
        ``block-commit`` starts, so from then on the memory snapshot no longer matches it and
        discard is refused (the record marks the disk ``merged`` *before* the job starts). The
        overlay stays valid until the job completes, so a commit stopped by the ``timeout`` or a
        cancellation leaves each disk either fully merged or still on its overlay; the session
        is then Failed with that detail per disk, and a later commit finishes the rest.

        :raises InvalidArgument: a bad timeout. Nothing changed.
        :raises NoSession: no Active session (or no failed commit to finish). Nothing changed.
        :raises TaskRunning: another task runs on the instance. Nothing changed.
        :raises ForgeFailed: the commit stopped; the record says which disks are merged.
        """
        timeout = _check_timeout("timeout", timeout)
        report = on_progress or (lambda _event: None)
        # Refused without a session before taking the lock, which would create the state dir.
        self._require_session("commit", lambda st: st.can_commit)
        with InstanceLock(self.state_dir, "forgeqmp commit"):
            record = self._require_session("commit", lambda st: st.can_commit)
            status = status_of(record).apply(Event.COMMIT)
            if not self.conn.connected:
                return await self._commit_offline(record, timeout, report)
            await self._check_no_task()
            blocks = await self.conn.execute("query-block")
            attached = _attached_nodes(blocks)
            pending = [d for d in record.disks if attached.get(d.qdev) == d.overlay_node]
            record = self._begin_commit(record, status.state)
            saver = anyio.Lock()
            no_return = anyio.Event()
            try:
                with anyio.fail_after(timeout):
                    async with anyio.create_task_group() as tg:
                        for disk in pending:
                            tg.start_soon(self._commit_disk, disk, saver, report, no_return)
                        if pending:
                            tg.start_soon(self._remove_memory_file_after, no_return, record)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    record = await self._commit_failed(exc, timeout, pending)
                if isinstance(exc, TimeoutError | ForgeError | OSError):
                    raise ForgeFailed(
                        f"commit stopped: {record.error}; {record.next_step}"
                    ) from None
                raise
            record = self._reload(record)
            self._remove_memory_file(record)
            record = self._save(
                record,
                state=State.COMMITTED,
                step="committed",
                finished_at=_now(),
            )
            self._crash_point("commit", "committed")
            report(ProgressEvent("commit", "committed"))
            return record

    def _require_session(
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

    async def _commit_disk(
        self,
        disk: DiskRecord,
        saver: anyio.Lock,
        report: ProgressCallback,
        no_return: anyio.Event,
    ) -> None:
        assert disk.overlay_node is not None
        conn = self.conn
        job_id = f"{disk.overlay_node.removesuffix('-fmt')}-commit"
        await self._mark_merged(disk, saver)
        no_return.set()
        with conn.subscribe(
            "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
        ) as sub:
            await conn.execute(
                "block-commit",
                {
                    "job-id": job_id,
                    "device": disk.overlay_node,
                    "base-node": disk.device_node,
                    "auto-dismiss": False,
                },
            )
            self._crash_point("commit", "job-started")
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._report_job_progress, job_id, disk.name, report)
                await sub.wait(
                    lambda e: e["data"]["status"] in ("ready", "concluded"),
                    DEFAULT_COMMIT_TIMEOUT * 24,  # bounded by the caller's deadline
                    f"the commit of {disk.name} to be ready",
                )
                tg.cancel_scope.cancel()
        self._crash_point("commit", "job-ready")
        pause_ms = await self._pivot(
            disk.name,
            disk.qdev,
            disk.device_node,
            job_id,
            lambda record: _overlay_gone(record, disk.name),
            mark_step=True,
            lock=saver,
        )
        await self._drop_overlay(disk)
        self._crash_point("commit", "disk-merged")
        report(ProgressEvent("commit", "disk-merged", {"disk": disk.name, "pause_ms": pause_ms}))

    def _current(self) -> SessionRecord:
        """The session record as saved now (there must be one: callers hold the lock)."""
        record = self.store.load()
        if record is None:
            raise ForgeFailed(
                f"the session record {self.store.path} disappeared while forgeqmp worked on it; "
                "run 'forgeqmp recover'"
            )
        return record

    async def _pivot(
        self,
        disk: str,
        qdev: str,
        base_node: str,
        job_id: str,
        update: Callable[[SessionRecord], SessionRecord],
        *,
        mark_step: bool,
        lock: anyio.Lock | None = None,
        operation: str = "commit",
    ) -> float | None:
        """Complete the ready commit job ``job_id`` that moves ``disk`` onto its original node,
        with the guest paused from just before the switch until the record says so (``update``).

        While the guest is paused nothing writes into the original, so wherever QEMU or this
        process dies, either the overlay or the original holds every write and the record says
        which: recover never merges a stale overlay over newer data. The pause lasts the final
        sync of the job (it was in sync already) and one record write: milliseconds, once the
        host has written the images' cached data (done before the pause; see hostflush).
        ``mark_step`` records ``pivoting:<disk>`` while the guest is paused, so that recover
        knows to resume it. Returns the guest pause in ms (QEMU's STOP→RESUME), None if the
        guest was not running.
        """
        conn = self.conn
        async with lock if lock is not None else contextlib.nullcontext():
            with conn.subscribe("STOP", "RESUME") as runstate_events:
                paused = await self.runstate() == "running"
                if paused:
                    await self._flush_before_pause()
                    if mark_step:
                        self._save(self._current(), step=f"pivoting:{disk}")
                    await conn.execute("stop")
                    self._crash_point(operation, "pivoting")
                resumed = False
                try:
                    with conn.subscribe(
                        "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
                    ) as sub:
                        jobs = await conn.execute("query-jobs")
                        status = next((j["status"] for j in jobs if j["id"] == job_id), None)
                        if status is None:
                            raise ForgeFailed(f"the commit job {job_id} of disk {disk} disappeared")
                        if status == "ready":
                            await self._complete_job(job_id)
                        elif status not in ("pending", "waiting", "aborting", "concluded"):
                            raise ForgeFailed(f"the commit job {job_id} is {status}, not ready")
                        if status != "concluded":
                            await sub.wait(
                                lambda e: e["data"]["status"] == "concluded",
                                _UNDO_TIMEOUT,
                                f"the commit of {disk} to end",
                            )
                    jobs = await conn.execute("query-jobs")
                    error = next((j.get("error") for j in jobs if j["id"] == job_id), None)
                    await conn.execute("job-dismiss", {"id": job_id})
                    if error:
                        raise ForgeFailed(f"committing disk {disk} failed: {error}")
                    attached = _attached_nodes(await conn.execute("query-block"))
                    if attached.get(qdev) != base_node:
                        raise ForgeFailed(
                            f"after its commit, disk {disk} is on node {attached.get(qdev)!r}, "
                            f"not its original {base_node!r}"
                        )
                    self._crash_point(operation, "pivoted")
                    changes: dict[str, Any] = {"step": "committing"} if mark_step else {}
                    self._save(update(self._current()), **changes)
                finally:
                    if paused:
                        with anyio.CancelScope(shield=True), contextlib.suppress(QMPError):
                            await conn.execute("cont")
                            resumed = True
                    if mark_step and (resumed or not paused):
                        with contextlib.suppress(ForgeError, OSError):
                            record = self._current()
                            if record.step == f"pivoting:{disk}":
                                self._save(record, step="committing")
                return self._pause_ms(runstate_events.history) if paused else None

    async def _drop_overlay(self, disk: DiskRecord) -> None:
        """Remove a merged disk's overlay nodes from the graph and its file from the disk."""
        for node in (disk.overlay_node, disk.overlay_file_node):
            if node is None:
                continue
            try:
                await self.conn.execute("blockdev-del", {"node-name": node})
            except QMPCommandError as exc:
                if "not found" not in exc.desc.lower() and "cannot find" not in exc.desc.lower():
                    raise
        if disk.overlay_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(disk.overlay_file)

    async def _complete_job(self, job_id: str) -> None:
        """``job-complete``, retried while QEMU says the job is not ready yet (transient)."""
        while True:
            try:
                await self.conn.execute("job-complete", {"id": job_id})
                return
            except QMPCommandError as exc:
                if "cannot accept command verb" not in exc.desc and "not ready" not in exc.desc:
                    raise
            await anyio.sleep(0.05)

    async def _report_job_progress(self, job_id: str, disk: str, report: ProgressCallback) -> None:
        last: tuple[int, int] | None = None
        while True:
            jobs = await self.conn.execute("query-jobs")
            job = next((j for j in jobs if j["id"] == job_id), None)
            if job is not None:
                now = (int(job["current-progress"]), int(job["total-progress"]))
                if now != last:
                    last = now
                    report(
                        ProgressEvent(
                            "commit", "progress", {"disk": disk, "done": now[0], "total": now[1]}
                        )
                    )
            await anyio.sleep(PROGRESS_INTERVAL)

    async def _commit_failed(
        self, cause: BaseException, timeout: float, started: Sequence[DiskRecord] = ()
    ) -> SessionRecord:
        """Stop the jobs not past the point of no return; record per disk what is merged.

        ``started``: the disks as they were when the commit started (their overlay node names,
        which the record drops once a disk is back on its original)."""
        conn = self.conn
        with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
            for job in await conn.execute("query-jobs"):
                if job["type"] == "commit" and job["id"].endswith("-commit"):
                    await self._drop_job(job["id"])
        record = self.store.load()
        assert record is not None
        attached: dict[str, str] = {}
        with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
            attached = _attached_nodes(await conn.execute("query-block"))
        done = [d for d in record.disks if attached.get(d.qdev) == d.device_node]
        originals = {d.name: d for d in started}
        for disk in done:
            with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
                await self._drop_overlay(originals.get(disk.name, disk))
            record = _overlay_gone(record, disk.name)
        return self._save_commit_failure(record, cause, timeout)

    def _save_commit_failure(
        self, record: SessionRecord, cause: BaseException, timeout: float
    ) -> SessionRecord:
        """Record a stopped commit as Failed, saying which disks are merged and which are not."""
        done = [d.name for d in record.disks if d.overlay_node is None]
        pending = [d.name for d in record.disks if d.overlay_node is not None]
        if isinstance(cause, TimeoutError):
            reason = f"the commit deadline ({timeout:g} s) passed"
        else:
            reason = f"{type(cause).__name__}: {cause}"
        return self._save(
            record,
            state=State.FAILED,
            failure_phase=State.COMMITTING,
            rolled_back=False,
            error=f"{reason}; disks fully merged: {', '.join(done) or 'none'}; still on "
            f"overlays: {', '.join(pending) or 'none'}",
            next_step="run 'forgeqmp commit' again to finish the disks still on overlays"
            if pending
            else "run 'forgeqmp recover' to finish the session",
        )

    def _begin_commit(self, record: SessionRecord, state: State) -> SessionRecord:
        """Record that the commit runs (again: a failed one's error is cleared)."""
        record = self._save(
            record, state=state, step="committing", failure_phase=None, error=None, next_step=None
        )
        self._crash_point("commit", "committing")
        return record

    async def _mark_merged(self, disk: DiskRecord, saver: anyio.Lock) -> None:
        """The point of no return of ``disk``: recorded before its original receives any data
        (from then on discard is refused)."""
        async with saver:
            self._save(self._current().evolve_disk(disk.name, merged=True))
            self._crash_point("commit", "disk-marked")

    async def _commit_offline(
        self, record: SessionRecord, timeout: float, report: ProgressCallback
    ) -> SessionRecord:
        """Commit while QEMU is not running: ``qemu-img commit`` of each overlay into its
        original, disks in parallel, with the records and point of no return of the live
        commit (so an interrupted offline commit is finished by the next commit, live or not)."""
        qemu_img = find_qemu_img(record)
        pending = [d for d in record.disks if d.overlay_node is not None]
        for disk in pending:
            if disk.overlay_file is None or not os.path.exists(disk.overlay_file):
                raise PrerequisiteError(
                    f"the overlay {disk.overlay_file} of disk {disk.name} is missing, so its "
                    "writes cannot be merged; run 'forgeqmp recover' to see what is left"
                )
        record = self._begin_commit(record, State.COMMITTING)
        report(ProgressEvent("commit", "offline", {"disks": [d.name for d in pending]}))
        saver = anyio.Lock()

        async def merge(disk: DiskRecord) -> None:
            await self._mark_merged(disk, saver)
            await commit_overlay(qemu_img, disk, record.qemu.env)
            async with saver:
                self._save(_overlay_gone(self._current(), disk.name))
            if disk.overlay_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.overlay_file)
            self._crash_point("commit", "disk-merged")
            report(ProgressEvent("commit", "disk-merged", {"disk": disk.name, "pause_ms": None}))

        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    for disk in pending:
                        tg.start_soon(merge, disk)
        except BaseException as exc:
            record = self._save_commit_failure(self._current(), exc, timeout)
            if isinstance(exc, TimeoutError | ForgeError | OSError):
                raise ForgeFailed(f"commit stopped: {record.error}; {record.next_step}") from None
            raise
        record = self._current()
        self._remove_memory_file(record)
        record = self._save(
            record,
            state=State.COMMITTED,
            step="committed",
            finished_at=_now(),
            next_step="the VM is stopped: start it with its original command line",
        )
        self._crash_point("commit", "committed")
        report(ProgressEvent("commit", "committed"))
        return record

    async def _remove_memory_file_after(self, event: anyio.Event, record: SessionRecord) -> None:
        """Once ``event`` is set (a disk is recorded merged: discard can never use the memory
        file again), remove the file while the disks merge; removing gigabytes of page cache
        takes a while."""
        await event.wait()
        await anyio.to_thread.run_sync(self._remove_memory_file, record)

    def _remove_memory_file(self, record: SessionRecord) -> None:
        if record.memory is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record.memory.path)
            self.state_dir.fsync_dir()

    # --- discard -----------------------------------------------------------------------------

    async def discard(
        self,
        *,
        launcher: Launcher | None = None,
        timeout: float = DEFAULT_DISCARD_TIMEOUT,
        on_progress: ProgressCallback | None = None,
        cold: bool = False,
    ) -> SessionRecord:
        """Revert the forged disks to their contents at enable and resume the VM from the memory
        state saved then (same processes, same counters).

        QEMU is stopped and started again with the configuration recorded at enable, waiting for
        the memory state (``-incoming defer -S``); the original images were read-only under the
        overlays since enable, so starting on them *is* the disk revert. The memory file is
        verified against the digest recorded at enable while QEMU restarts, and the guest is only
        resumed when it matched. If the memory cannot be restored (file missing, digest mismatch,
        incoming migration failed), the VM is started cold on the reverted disks and the record
        says so (``memory_restored`` false, ``error`` the reason). ``launcher`` starts QEMU (see
        :mod:`forgeqmp.launcher`); the default re-runs the recorded argv detached. ``cold``
        starts the VM cold on the reverted disks without restoring the memory state.

        It also works while QEMU is not running (the instance was opened with
        ``connect(..., allow_offline=True)``): the disks are reverted and the VM is started.

        :raises NoSession: no Active session, or a disk already merged by a commit.
        :raises PrerequisiteError: QEMU no longer runs the recorded configuration. Nothing changed.
        :raises ForgeFailed: even the cold start failed; the record holds the argv and QEMU's error.
        """
        timeout = _check_timeout("timeout", timeout)
        report = on_progress or (lambda _event: None)
        launch = launcher or functools.partial(detached_launcher, timeout=timeout)
        started = time.monotonic()
        # Refused without a session before taking the lock, which would create the state dir.
        self._require_session("discard", lambda st: st.can_discard)
        with InstanceLock(self.state_dir, "forgeqmp discard"):
            record = self._require_session("discard", lambda st: st.can_discard)
            touched = [d.name for d in record.disks if d.merged]
            if touched:
                raise NoSession(
                    f"cannot discard: the commit of {', '.join(touched)} already wrote into the "
                    "original image(s), so the memory state no longer matches them; run "
                    "'forgeqmp commit' to finish the commit"
                )
            status_of(record).apply(Event.DISCARD)
            if self.conn.connected:
                await self._check_recorded_configuration(record)
            record = self._save(record, state=State.DISCARDING, step="stopping-qemu")
            self._crash_point("discard", "stopping-qemu")
            report(ProgressEvent("discard", "stopping-qemu"))
            with anyio.CancelScope(shield=True):
                record = await self._run_discard(
                    record, launch, timeout, report, started, cold=cold
                )
            return record

    async def _finish_discard(
        self, record: SessionRecord, launch: Launcher, timeout: float, report: ProgressCallback
    ) -> SessionRecord:
        """Finish an interrupted discard (for recover): stop whatever QEMU is connected, start
        QEMU on the originals and restore the memory state, or cold-start."""
        with anyio.CancelScope(shield=True):
            record = await self._run_discard(record, launch, timeout, report, time.monotonic())
        return record

    async def _check_recorded_configuration(self, record: SessionRecord) -> None:
        """Refuse to restore onto anything but the recorded configuration: swapped or resized
        disks would restore silently wrong."""
        pid = self.conn.peer.pid
        current = describe_process(pid)
        if current.argv != record.qemu.argv and not _is_active_argv(current.argv, record):
            raise PrerequisiteError(
                "QEMU now runs with another command line than at enable, so the memory state "
                "may not fit it; restart it with the recorded one (forgeqmp status shows it) "
                "or commit instead"
            )
        machine = await self.conn.execute("qom-get", {"path": "/machine", "property": "type"})
        if str(machine).removesuffix("-machine") != record.qemu.machine:
            raise PrerequisiteError(
                f"the machine type is {machine}, not {record.qemu.machine} as at enable; "
                "the memory state cannot be restored onto it; start QEMU with the recorded command "
                "line (forgeqmp status shows it), or commit instead"
            )
        disks = {d.qdev: d for d in await self.disks()}
        for disk in record.disks:
            now = disks.get(disk.qdev)
            if now is None or now.virtual_size != disk.virtual_size:
                raise PrerequisiteError(
                    f"disk {disk.name} is missing or has another size than at enable; the memory "
                    "state cannot be restored onto this configuration; put the disk back as it was "
                    "at enable, or commit instead"
                )

    async def _run_discard(
        self,
        record: SessionRecord,
        launch: Launcher,
        timeout: float,
        report: ProgressCallback,
        started: float,
        *,
        cold: bool = False,
    ) -> SessionRecord:
        memory = record.memory
        verdict: dict[str, str | None] = {}

        async def verify() -> None:
            verdict["problem"] = await anyio.to_thread.run_sync(_memory_problem, memory)

        problem: str | None = None
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(verify)
                    await self._stop_qemu(record)
                    record = self._save(record, step="qemu-stopped")
                    self._crash_point("discard", "qemu-stopped")
                    if cold:
                        problem = "a cold start was asked for"
                    elif memory is not None and os.path.exists(memory.path):
                        report(ProgressEvent("discard", "restoring-memory"))
                        problem = await self._restore(record, launch)
                    else:
                        problem = "the memory file is missing"
                # The digest check says exactly what is wrong with the file; prefer it to the
                # symptom the load showed (a truncated file fails the load too).
                if not cold:
                    problem = verdict.get("problem") or problem
                if problem is None:
                    await self.conn.execute("cont")
                    restored = True
                else:
                    restored = False
                    report(ProgressEvent("discard", "cold-start", {"reason": problem}))
                    await self._cold_start(record, launch)
        except Exception as exc:
            reason = "the discard deadline passed" if isinstance(exc, TimeoutError) else str(exc)
            spec = self._spec(record, incoming=False)
            return self._save(
                record,
                state=State.FAILED,
                failure_phase=State.DISCARDING,
                rolled_back=False,
                error=f"discard could not start the VM: {reason}",
                next_step="the disks are reverted but the VM is not running; start it with: "
                + " ".join(spec.argv)
                + f" (in {spec.cwd}), then run 'forgeqmp recover'",
            )
        seconds = round(time.monotonic() - started, 3)
        for disk in record.disks:
            if disk.overlay_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.overlay_file)
        self._remove_memory_file(record)
        record = self._save(
            record,
            state=State.DISCARDED,
            step="discarded",
            memory_restored=restored,
            resume_seconds=seconds,
            error=None if restored else f"memory not restored, VM cold-started: {problem}",
            finished_at=_now(),
        )
        self._crash_point("discard", "discarded")
        report(
            ProgressEvent(
                "discard", "running", {"memory_restored": restored, "resume_seconds": seconds}
            )
        )
        return record

    def _spec(self, record: SessionRecord, *, incoming: bool) -> LaunchSpec:
        argv = record.qemu.argv
        return LaunchSpec(
            argv=incoming_argv(argv) if incoming else cold_argv(argv),
            cwd=record.qemu.cwd,
            env=record.qemu.env,
            qmp_socket=record.qemu.qmp_socket,
            incoming=incoming,
            log_file=str(self.state_dir.path_of("qemu.log")),
        )

    async def _stop_qemu(self, record: SessionRecord) -> None:
        """Quit QEMU and wait until the process is really gone (by pidfd, not zombie reaping)."""
        pid = record.qemu.pid
        if self.conn.connected:
            pid = self.conn.peer.pid
            with contextlib.suppress(QMPError):
                await self.conn.execute("quit", timeout=10)
        elif not recorded_qemu_alive(record):
            return  # QEMU is not running (the recorded pid is gone or now another program's)
        await self.conn.close()
        gone = await anyio.to_thread.run_sync(wait_gone, pid, 30.0)
        if not gone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not await anyio.to_thread.run_sync(wait_gone, pid, 10.0):
                raise ForgeFailed(f"QEMU (pid {pid}) does not exit, even after SIGKILL")

    async def _restore(self, record: SessionRecord, launch: Launcher) -> str | None:
        """Start QEMU waiting for the memory state and load it; the guest stays paused.

        Returns None when loaded, else why not (then QEMU is stopped again)."""
        memory = record.memory
        assert memory is not None
        await launch(self._spec(record, incoming=True))
        await self.conn.reconnect()
        self._crash_point("discard", "qemu-launched")
        conn = self.conn
        try:
            caps = ("events", *(c for c in memory.capabilities if c in _RESTORE_CAPABILITIES))

            def set_caps(state: bool) -> dict[str, Any]:
                return {"capabilities": [{"capability": c, "state": state} for c in caps]}

            await conn.execute("migrate-set-capabilities", set_caps(True))
            fdset_id: int | None = None
            fd = os.open(memory.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if memory.transport == Transport.FDSET_FILE.value:
                    fdset_id, _ = await conn.add_fd(fd, opaque=f"forgeqmp {record.session_id}")
                    uri = f"file:/dev/fdset/{fdset_id}"
                else:
                    await conn.pass_fd(fd, "forgeqmp-restore")
                    uri = "fd:forgeqmp-restore"
            finally:
                os.close(fd)
            with conn.subscribe("MIGRATION") as migration:
                await conn.execute("migrate-incoming", {"uri": uri})
                ev = await migration.wait(
                    lambda e: e["data"]["status"] in _MIGRATION_ENDED,
                    DEFAULT_DISCARD_TIMEOUT * 10,  # bounded by the caller's deadline
                    "the memory state to load",
                )
            if fdset_id is not None:
                # QEMU keeps an fdset's descriptor open until it is removed: without this the
                # deleted memory file (guest RAM) stays allocated, and readable through
                # /proc/<pid>/fd, for as long as the VM runs.
                with contextlib.suppress(QMPCommandError):
                    await conn.execute("remove-fd", {"fdset-id": fdset_id})
            if ev["data"]["status"] == "completed":
                # The relaunched QEMU is the platform's VM again: leave its migration settings
                # at their defaults (multifd/mapped-ram would change its next migration).
                await conn.execute("migrate-set-capabilities", set_caps(False))
                self._crash_point("discard", "memory-loaded")
                return None
            info = await conn.execute("query-migrate")
            return f"loading the memory state failed: {info.get('error-desc', 'no detail')}"
        except (QMPError, ForgeFailed) as exc:
            return f"loading the memory state failed: {exc}"

    async def _cold_start(self, record: SessionRecord, launch: Launcher) -> None:
        """Stop whatever QEMU the restore left and boot cold on the (reverted) disks."""
        if self.conn.connected:
            pid = self.conn.peer.pid
            with contextlib.suppress(QMPError):
                await self.conn.execute("quit", timeout=10)
            await self.conn.close()
            await anyio.to_thread.run_sync(wait_gone, pid, 30.0)
        await launch(self._spec(record, incoming=False))
        await self.conn.reconnect()
        if await self.runstate() != "running":
            await self.conn.execute("cont")


def _memory_problem(memory: MemoryRecord | None) -> str | None:
    """Why the memory file cannot be trusted, or None when it matches the digest of enable."""
    if memory is None or memory.sha256 is None:
        return "no verified memory state was recorded at enable"
    try:
        digest, size = memhash.hash_file(memory.path)
    except FileNotFoundError:
        return "the memory file is missing"
    except OSError as exc:
        return f"the memory file cannot be read: {exc}"
    if memory.size is not None and size != memory.size:
        return f"the memory file has {size} bytes, not {memory.size} as saved: it was truncated"
    if digest != memory.sha256:
        return "the memory file does not match the digest recorded at enable: it was altered"
    return None


def _is_active_argv(argv: Sequence[str], record: SessionRecord) -> bool:
    """``argv`` is the command line that runs the session's disks on their overlays."""
    try:
        return tuple(argv) == active_argv(record)
    except PrerequisiteError:
        return False


def _overlay_gone(record: SessionRecord, disk: str) -> SessionRecord:
    """The record with ``disk`` merged and its overlay removed (nothing left to commit)."""
    return record.evolve_disk(disk, merged=True, overlay_node=None, overlay_file_node=None)


def _attached_nodes(query_block: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """qdev path → node-name attached to it now."""
    return {
        str(b.get("qdev")): str(b["inserted"]["node-name"])
        for b in query_block
        if b.get("qdev") and b.get("inserted")
    }


@contextlib.asynccontextmanager
async def connect(
    qmp_socket: str | os.PathLike[str],
    *,
    state_dir: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    allow_offline: bool = False,
) -> AsyncIterator[Instance]:
    """Connect to a QEMU's QMP socket and open its Forge instance.

    ``state_dir`` holds the session record, the memory file and the lock; by default it is derived
    from the socket path (:func:`forgeqmp.statedir.default_state_dir`), so two instances never share
    one.

    ``allow_offline``: when QEMU is provably not running (nobody listens on the socket and the
    recorded QEMU process is gone, see :func:`forgeqmp.power.qemu_down`), open the instance
    anyway, without a connection (``instance.online`` is False): ``status``, ``recover``,
    ``commit`` (merges with qemu-img) and ``discard`` (starts the VM) work on a stopped VM.

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
    try:
        yield Instance(conn, directory)
    finally:
        await conn.close()
