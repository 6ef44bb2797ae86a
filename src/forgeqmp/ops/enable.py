"""Enable: snapshot the selected disks (external qcow2 overlays, one ``transaction``) and save the
memory state from the same instant, while the guest runs; any failure undoes what was done.

The QMP sequence is planned by :mod:`forgeqmp.core.plans.enable` (sans-IO); this module executes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import attrs

from forgeqmp.adapters import hashahead, hostflush, memhash, preflight
from forgeqmp.adapters.process import describe_process
from forgeqmp.adapters.statedir import InstanceLock
from forgeqmp.core import names
from forgeqmp.core.blockopts import argv_block_options
from forgeqmp.core.disks import Selection, check_disk_choice, select_disks
from forgeqmp.core.features import Features
from forgeqmp.core.lifecycle import begin
from forgeqmp.core.plans.common import (
    CONT,
    QUERY_BLOCK,
    QUERY_MACHINE_TYPE,
    QUERY_MIGRATE,
    QUERY_MIGRATE_CAPABILITIES,
    QUERY_MIGRATE_PARAMETERS,
    STOP,
    close_fd,
    continue_from_pre_switchover,
    remove_fdset,
)
from forgeqmp.core.plans.enable import (
    ConvergenceStep,
    EnablePlan,
    OverlayPlan,
    Strategy,
    Transport,
    plan_enable,
)
from forgeqmp.core.progress import ProgressCallback, ProgressEvent
from forgeqmp.core.record import (
    MemoryRecord,
    QemuRecord,
    SessionRecord,
    new_session_id,
)
from forgeqmp.core.relaunch import describe_findings, relaunch_findings
from forgeqmp.core.states import Event, State
from forgeqmp.core.steps import EnableStep
from forgeqmp.errors import (
    ForgeError,
    ForgeFailed,
    InvalidArgument,
    NotRelaunchable,
    QMPCommandError,
    QMPError,
    describe_cause,
)
from forgeqmp.ops.blockjobs import BlockJobs
from forgeqmp.ops.context import (
    _UNDO_TIMEOUT,
    DEFAULT_ENABLE_TIMEOUT,
    PROGRESS_INTERVAL,
    Context,
    _check_timeout,
    _now,
)

_T = TypeVar("_T")

# The logger names are part of the documented interface (docs/embedding.md, "Logs"): they
# stay what they were before the modules moved.
log = logging.getLogger("forgeqmp.enable_driver")

__all__ = ["Enable"]


@attrs.define
class _EnableUndo:
    """What an enable has done so far, so a failure undoes exactly that and nothing else."""

    files: list[str] = attrs.Factory(list)
    nodes: list[str] = attrs.Factory(list)
    jobs: list[str] = attrs.Factory(list)
    fdset_id: int | None = None
    fd_name: str | None = None
    #: This process's descriptor of the memory file (closed by the enable itself, not the undo).
    memory_fd: int | None = None
    #: The worker hashing the memory file while QEMU writes it (stopped by the enable itself).
    hashing: hashahead.HashAhead | None = None
    previous_capabilities: dict[str, bool] | None = None
    previous_parameters: dict[str, Any] | None = None
    migration_started: bool = False
    migration_completed: bool = False
    snapshotted: bool = False
    stopped_by_us: bool = False


class Enable:
    """The enable operation, over the shared :class:`~forgeqmp.ops.context.Context` of an
    :class:`~forgeqmp.forge.Instance` (its entry point: :meth:`run`)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.jobs = BlockJobs(ctx)

    async def run(
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
        for every writable disk. ``strategy``: see :class:`Strategy` (default: ``mapped-ram`` where
        QEMU has it, else ``precopy``: :func:`~forgeqmp.core.plans.enable.default_strategy`).
        ``overlay_dir``: where overlays go (default: next to each disk's image).

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
        check_disk_choice(disks, all_disks=all_disks)
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
        # Before the lock, which would create the state dir: a refusal leaves nothing behind.
        self._check_relaunchable()

        with InstanceLock(self.ctx.state_dir, "forgeqmp enable"):
            previous = self.ctx.check_no_unfinished_session()
            await self.ctx.check_no_session_in_graph()
            features = await self.ctx.features()
            await self.ctx.check_running()
            await self.ctx.check_no_task()
            selection = select_disks(
                await self.ctx.disks(),
                list(disks) if disks is not None else None,
                all_disks=all_disks,
            )
            given = argv_block_options(describe_process(self.ctx.conn.peer.pid).argv)
            options = {
                d.qdev: d.options.with_given(given.get(d.backend or "") or given.get(d.node or ""))
                for d in selection.forged
                if d.options is not None
            }
            session_id = new_session_id()
            memory_name = names.memory_file_name(session_id)
            plan = plan_enable(
                session_id=session_id,
                selection=selection,
                features=features,
                memory_file=str(self.ctx.state_dir.path_of(memory_name)),
                strategy=strategy,
                overlay_dir=os.fspath(overlay_dir) if overlay_dir is not None else None,
                options=options,
            )
            for overlay in plan.overlays:
                if os.path.lexists(overlay.overlay_file):
                    raise ForgeFailed(
                        f"{overlay.overlay_file} already exists; forgeqmp never reuses a file it "
                        "did not create: remove it if it is stale, or choose another overlay_dir"
                    )
            await preflight.check_enable(self.ctx.conn, plan)
            record = await self._new_record(plan, selection, features, previous)
            report(
                ProgressEvent("enable", "planned", {"disks": [o.disk.name for o in plan.overlays]})
            )
            self.ctx.store.remove_temp_files()  # a killed operation's: never a file of another
            if previous is not None:
                self.ctx.store.archive(force=True)
            self.ctx.store.save(record)
            log.info(
                "session %s: %s, step %s (disks %s)",
                record.session_id,
                record.state.value,
                record.step.value,
                ", ".join(o.disk.name for o in plan.overlays),
            )
            self.ctx.state_changed(record)
            self.ctx.crash_point("enable", EnableStep.PLANNED)
            undo = _EnableUndo()
            try:
                with anyio.fail_after(timeout):
                    record, active = await self._run_enable(plan, record, undo, report)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    record = self.ctx.reload(record)
                    record = await self._undo_enable(plan, record, undo, exc)
                undone = (
                    "was undone"
                    if record.rolled_back
                    else f"was not fully undone: {record.next_step}"
                )
                if isinstance(exc, TimeoutError):
                    raise ForgeFailed(
                        f"enable did not finish within {timeout:g} s and {undone}"
                    ) from None
                if isinstance(exc, Exception):  # an interrupt (Ctrl-C) stays one
                    raise ForgeFailed(f"enable failed and {undone}: {describe_cause(exc)}") from exc
                raise
            # Reported once the session is Active on disk and nothing is left to undo: a
            # callback that raises here is the caller's error, and the session stays Active.
            report(ProgressEvent("enable", "active", active))
            return record

    def _check_relaunchable(self) -> None:
        """Refuse a session that discard could not finish: without a launcher, discard starts
        the recorded argv again, which must then describe the whole VM."""
        if self.ctx.launcher is not None or not self.ctx.conn.connected:
            return  # (not connected: the checks that follow refuse the enable)
        findings = relaunch_findings(describe_process(self.ctx.conn.peer.pid).argv)
        if findings:
            raise NotRelaunchable(
                "enable refused, nothing was changed: discard would have to start this QEMU again "
                "and its command line cannot be re-run as it is: " + describe_findings(findings),
                findings,
            )

    async def _new_record(
        self,
        plan: EnablePlan,
        selection: Selection,
        features: Features,
        previous: SessionRecord | None,
    ) -> SessionRecord:
        peer = self.ctx.conn.peer
        process = describe_process(peer.pid)
        machine = await self.ctx.send(QUERY_MACHINE_TYPE)
        now = _now()
        disks = [o.disk_record() for o in plan.overlays]
        return begin(
            previous,
            session_id=plan.session_id,
            step=EnableStep.PLANNED,
            strategy=plan.strategy.value,
            created_at=now,
            updated_at=now,
            disks=tuple(disks),
            unforged_disks=tuple(d.name for d in selection.unforged),
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
                qmp_socket=os.path.abspath(self.ctx.conn.socket_path),
            ),
            warnings=selection.warnings,
        )

    async def _create_overlay(self, overlay: OverlayPlan, undo: _EnableUndo) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(overlay.overlay_file, flags, 0o600))
        undo.files.append(overlay.overlay_file)
        add_file = overlay.add_file_node()
        await self.ctx.send(add_file)
        undo.nodes.append(overlay.file_node)
        undo.jobs.append(overlay.create_job)
        await self.jobs.run_job(
            overlay.create_image(),
            overlay.create_job,
            f"creating the overlay {overlay.overlay_file}",
            _UNDO_TIMEOUT,
        )
        undo.jobs.remove(overlay.create_job)
        add_format = overlay.add_format_node()
        await self.ctx.send(add_format)
        undo.nodes.append(overlay.format_node)

    async def _run_enable(
        self,
        plan: EnablePlan,
        record: SessionRecord,
        undo: _EnableUndo,
        report: ProgressCallback,
    ) -> tuple[SessionRecord, dict[str, Any]]:
        """Run the plan to an Active session; returns its record and what the final
        ``active`` progress event reports (sent by the caller once nothing is left to undo)."""
        conn = self.ctx.conn
        for overlay in plan.overlays:
            await self._create_overlay(overlay, undo)
        record = self.ctx.save(record, step=EnableStep.OVERLAYS_CREATED)
        self.ctx.crash_point("enable", EnableStep.OVERLAYS_CREATED)
        report(ProgressEvent("enable", "overlays-created"))

        memory_name = os.path.basename(plan.memory_file)
        mem_fd = self.ctx.state_dir.create_private_file(memory_name)
        undo.files.append(plan.memory_file)
        undo.memory_fd = mem_fd
        try:
            # A stream is hashed while QEMU writes it, by a worker at the idle priority that is
            # never waited for (forgeqmp.adapters.hashahead); started now, its interpreter starts
            # while the steps below talk to QEMU.
            if plan.writes_memory_in_order:
                undo.hashing = hashahead.HashAhead.start(mem_fd)
            if plan.transport is Transport.FDSET_FILE:
                # QEMU matches fdset members by access mode and opens the file write-only.
                write_fd = os.open(f"/proc/self/fd/{mem_fd}", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    undo.fdset_id, _ = await conn.add_fd(
                        write_fd, opaque=names.fdset_opaque(plan.session_id)
                    )
                finally:
                    os.close(write_fd)
            else:
                await conn.pass_fd(mem_fd, plan.fd_name)
                undo.fd_name = plan.fd_name
            caps = await self.ctx.send(QUERY_MIGRATE_CAPABILITIES)
            undo.previous_capabilities = {c["capability"]: bool(c["state"]) for c in caps}
            set_caps = plan.set_capabilities()
            await self.ctx.send(set_caps)
            undo.previous_parameters = dict(await self.ctx.send(QUERY_MIGRATE_PARAMETERS))
            set_params = plan.set_parameters()
            await self.ctx.send(set_params)
            # Before the save, which pauses the guest (at its switchover, or a stop first):
            # recover resumes a guest it finds paused while this is recorded.
            record = self.ctx.save(
                record, step=EnableStep.MIGRATION_STARTED, paused_by_forgeqmp=True
            )
            self.ctx.crash_point("enable", EnableStep.MIGRATION_STARTED)

            with (
                conn.subscribe("MIGRATION") as migration,
                conn.subscribe("STOP", "RESUME") as runstate_events,
            ):
                started = time.monotonic()
                if plan.pauses_before_switchover:
                    await self._save_with_pause(plan, undo, migration, report)
                else:
                    await self._save_in_background(plan, undo, migration, report)
                pause_ms = self.ctx.pause_ms(runstate_events.history)
                saved_s = time.monotonic() - started

            record = self.ctx.save(record, step=EnableStep.SNAPSHOT_DONE, pause_ms=pause_ms)
            self.ctx.crash_point("enable", EnableStep.SNAPSHOT_DONE)
            log.info(
                "enable %s: disks %s on their overlays, memory saved to %s; guest paused %s ms",
                record.session_id,
                ", ".join(f"{d.name} ({d.overlay_file})" for d in record.disks),
                record.memory.path if record.memory else "?",
                "?" if pause_ms is None else f"{pause_ms:.1f}",
            )
            report(ProgressEvent("enable", "snapshot-done", {"pause_ms": pause_ms}))

            # Fingerprint the file from the page cache: the windows the worker hashed while QEMU
            # wrote them, and the rest now. It is not fsynced: Active does not wait for the
            # storage to have the memory state (1.6 GB took 1.0-1.2 s of fsync here, more than
            # the save). The kernel writes it back on its own; until then only a crash of the
            # host can lose it, which the digest turns into a cold start of the reverted disks at
            # discard, never a wrong restore (docs/fault-matrix.md, "Durability"). Its name in
            # the directory is made durable, and the record is, as always.
            known = undo.hashing.stop() if undo.hashing is not None else {}
            took: dict[str, float] = {}
            digest, size, reused = await _timed(
                took, "digest_seconds", memhash.hash_reusing, mem_fd, known
            )
            self.ctx.state_dir.fsync_dir()
        finally:
            if undo.hashing is not None:
                undo.hashing.stop()
            undo.hashing = None
            undo.memory_fd = None
            os.close(mem_fd)
        await self._release_migration_setup(plan, undo)
        assert record.memory is not None
        record = self.ctx.save(
            record,
            Event.ENABLED,
            step=EnableStep.ACTIVE,
            paused_by_forgeqmp=False,
            activated_at=_now(),
            memory=attrs.evolve(
                record.memory, size=size, digest=digest, digest_algorithm=memhash.ALGORITHM
            ),
        )
        self.ctx.crash_point("enable", EnableStep.ACTIVE)
        active = {
            "pause_ms": pause_ms,
            "memory_bytes": size,
            "save_seconds": round(saved_s, 3),
            **{name: round(seconds, 3) for name, seconds in took.items()},
            "hashed_while_saving": reused,
        }
        return record, active

    async def _with_memory_progress(
        self,
        report: ProgressCallback,
        wait: Callable[[], Awaitable[None]],
        converge: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        """Run ``wait`` while reporting the memory save's progress (``progress`` events with
        ``done``/``total`` bytes and ``bytes_per_second``) every PROGRESS_INTERVAL, and while
        ``converge`` runs (if given); both stop when ``wait`` returns.

        ``wait``'s exception is re-raised as is, not wrapped in an ExceptionGroup."""
        failed: list[Exception] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report_memory_progress, report)
            if converge is not None:
                tg.start_soon(converge)
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
                info = await self.ctx.send(QUERY_MIGRATE)
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

    async def _converge(
        self, steps: Sequence[ConvergenceStep], undo: _EnableUndo, report: ProgressCallback
    ) -> None:
        """Walk the plan's convergence steps while precopy has not reached its pause, counting
        from the end of its first pass over RAM (QEMU's second dirty-bitmap sync)."""
        if not steps:
            return
        while True:
            info = await self.ctx.send(QUERY_MIGRATE)
            if info.get("status") not in ("setup", "active"):
                return  # at the pause already, or ended (the wait reports how)
            ram = info.get("ram")
            if isinstance(ram, Mapping) and int(ram.get("dirty-sync-count", 0)) >= 2:
                break
            await anyio.sleep(PROGRESS_INTERVAL)
        iterating = anyio.current_time()
        for step in steps:
            await anyio.sleep_until(iterating + step.after_s)
            info = await self.ctx.send(QUERY_MIGRATE)
            if info.get("status") != "active":
                return
            command = step.command()
            if step.pauses_guest:
                undo.stopped_by_us = True  # from now on a failure must resume the guest
            await self.ctx.send(command)
            report(ProgressEvent("enable", "converging", step.progress_detail()))

    async def _save_with_pause(
        self, plan: EnablePlan, undo: _EnableUndo, migration: Any, report: ProgressCallback
    ) -> None:
        migrate = plan.migrate(undo.fdset_id)
        await self.ctx.flush_before_pause()
        await self.ctx.send(migrate)
        undo.migration_started = True
        await self._after_qemu_opened(plan, undo)
        report(ProgressEvent("enable", "saving-memory"))
        await self._with_memory_progress(
            report,
            lambda: self.ctx.wait_migration(
                migration, "pre-switchover", "the pre-switchover pause"
            ),
            lambda: self._converge(plan.convergence, undo, report),
        )
        self.ctx.crash_point("enable", EnableStep.PRE_SWITCHOVER)
        if undo.hashing is not None:
            # Nothing of it runs beside the final pass (its results so far stay in the pipe).
            undo.hashing.halt()
        # The guest is paused: snapshot every disk or none.
        transaction = plan.transaction()
        await self.ctx.send(transaction)
        undo.snapshotted = True
        self.ctx.crash_point("enable", EnableStep.SNAPSHOT_TRANSACTION_DONE)
        await self.ctx.send(continue_from_pre_switchover())
        await self.ctx.wait_migration(migration, "completed", "the end of the memory save")
        undo.migration_completed = True
        await self.ctx.resume()
        undo.stopped_by_us = False

    async def _save_in_background(
        self, plan: EnablePlan, undo: _EnableUndo, migration: Any, report: ProgressCallback
    ) -> None:
        await self.ctx.flush_before_pause()
        await self.ctx.send(STOP)
        undo.stopped_by_us = True
        transaction = plan.transaction()
        await self.ctx.send(transaction)
        undo.snapshotted = True
        migrate = plan.migrate(undo.fdset_id)
        await self.ctx.send(migrate)
        undo.migration_started = True
        await self.ctx.send(CONT)
        undo.stopped_by_us = False
        await self._after_qemu_opened(plan, undo)
        report(ProgressEvent("enable", "saving-memory"))
        await self._with_memory_progress(
            report,
            lambda: self.ctx.wait_migration(
                migration, "completed", "the end of the background save"
            ),
        )
        undo.migration_completed = True

    @staticmethod
    async def _after_qemu_opened(plan: EnablePlan, undo: _EnableUndo) -> None:
        """QEMU opened the memory file (``migrate`` returned): with the ``file:`` transport it
        truncated it, which on ext4 would write the whole save out at the next close."""
        if plan.transport is Transport.FDSET_FILE and undo.memory_fd is not None:
            await anyio.to_thread.run_sync(hostflush.disarm_flush_on_close, undo.memory_fd)

    async def _release_migration_setup(self, plan: EnablePlan, undo: _EnableUndo) -> None:
        """Give back what the save borrowed: the fd/fdset and the migration settings."""
        if undo.fdset_id is not None:
            with contextlib.suppress(QMPCommandError):  # QEMU may have freed it already
                await self.ctx.send(remove_fdset(undo.fdset_id))
            undo.fdset_id = None
        if undo.fd_name is not None:
            with contextlib.suppress(QMPCommandError):  # migration closes it when done
                await self.ctx.send(close_fd(undo.fd_name))
            undo.fd_name = None
        if undo.previous_parameters is not None:
            restore = plan.restore_parameters(undo.previous_parameters)
            await self.ctx.send(restore)
            undo.previous_parameters = None
        if undo.previous_capabilities is not None:
            restore = plan.restore_capabilities(undo.previous_capabilities)
            await self.ctx.send(restore)
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

        conn = self.ctx.conn
        if undo.migration_started and not undo.migration_completed:
            await attempt("cancelling the memory save", self.ctx.cancel_migration)
        keep_overlays = False
        if undo.snapshotted:
            before = len(problems)
            await attempt(
                "moving the disks back off their overlays", lambda: self._unsnapshot(plan)
            )
            # An overlay a disk may still be on holds the guest's writes since the snapshot:
            # never delete it; recover merges it back (live, or offline once QEMU is gone).
            keep_overlays = len(problems) > before
        before = len(problems)
        await attempt("resuming the guest", self.ctx.resume_if_stopped)
        resumed = len(problems) == before
        for job in list(undo.jobs):
            await attempt(f"dismissing job {job}", functools.partial(self.jobs.drop_job, job))
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
                if path == plan.memory_file:
                    # Emptied first: its blocks are freed now, not when the last descriptor
                    # closes (QEMU closes its one after the failed save's cleanup, the hashing
                    # worker at its exit). On a file system the save filled, the Failed record
                    # below needs that room.
                    os.truncate(path, 0)
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"removing {path}: {exc}")
        reason = describe_cause(cause)
        if isinstance(cause, TimeoutError):
            reason = "the enable deadline passed"
        rolled_back = not problems
        record = self.ctx.reload(record)  # the undo records disks moved back off their overlays
        next_step = (
            "nothing to do: everything was undone and the VM runs as before; enable again when "
            "the cause is fixed"
            if rolled_back
            else "run 'forgeqmp recover'; undo left: " + "; ".join(problems)
        )
        try:
            return self.ctx.save(
                record,
                Event.ENABLE_FAILED,
                failure_phase=State.CREATING,
                rolled_back=rolled_back,
                paused_by_forgeqmp=record.paused_by_forgeqmp and not resumed,
                error=f"enable failed at step {record.step.value}: {reason}",
                next_step=next_step,
                finished_at=_now() if rolled_back else None,
            )
        except (ForgeError, OSError) as exc:
            log.error("could not record the failed enable: %s", exc)
            return record

    async def _unsnapshot(self, plan: EnablePlan) -> None:
        """Put each disk back on its original node by committing its (new, nearly empty) overlay."""
        blocks = await self.ctx.send(QUERY_BLOCK)
        attached = {
            str(b.get("qdev")): b["inserted"]["node-name"] for b in blocks if b.get("inserted")
        }
        for overlay in plan.overlays:
            if attached.get(overlay.disk.qdev) != overlay.format_node:
                continue
            assert overlay.disk.node is not None
            await self.jobs.commit_back(
                overlay.disk.name,
                overlay.disk.qdev,
                overlay.format_node,
                overlay.disk.node,
                f"{overlay.create_job}-undo",
            )


async def _timed(took: dict[str, float], name: str, work: Callable[..., _T], *args: Any) -> _T:
    """``work(*args)`` in a worker thread; its seconds into ``took[name]``."""
    started = time.monotonic()
    try:
        return await anyio.to_thread.run_sync(work, *args)
    finally:
        took[name] = time.monotonic() - started
