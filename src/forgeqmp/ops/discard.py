"""Discard: revert the forged disks and resume the guest from the memory state saved at enable.

QEMU is stopped and started again on the original images (read-only since enable, so starting on
them is the revert) waiting for the memory state, which is verified against its digest while it
loads; if it cannot be trusted or loaded, the VM boots cold on the reverted disks and says why.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import signal
import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread
import attrs

from forgeqmp.adapters import memhash
from forgeqmp.adapters.launcher import Launcher, detached_launcher
from forgeqmp.adapters.process import describe_process, wait_gone
from forgeqmp.adapters.qemuproc import recorded_qemu_alive
from forgeqmp.adapters.statedir import InstanceLock
from forgeqmp.core.argv import active_argv
from forgeqmp.core.lifecycle import status_of
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.common import (
    CONT,
    QUERY_MACHINE_TYPE,
    QUERY_MIGRATE,
    QUERY_MIGRATE_PARAMETERS,
    QUIT,
)
from forgeqmp.core.plans.discard import RestorePlan, plan_restore
from forgeqmp.core.progress import ProgressCallback, ProgressEvent
from forgeqmp.core.record import (
    MemoryRecord,
    SessionRecord,
)
from forgeqmp.core.relaunch import describe_findings, relaunch_findings
from forgeqmp.core.states import Event, State
from forgeqmp.core.steps import DiscardStep
from forgeqmp.errors import (
    ForgeFailed,
    NoSession,
    NotRelaunchable,
    PrerequisiteError,
    QMPCommandError,
    QMPError,
)
from forgeqmp.ops.blockjobs import BlockJobs
from forgeqmp.ops.context import (
    _MIGRATION_ENDED,
    DEFAULT_DISCARD_TIMEOUT,
    Context,
    _check_timeout,
    _now,
)

# The logger names are part of the documented interface (docs/embedding.md, "Logs"): they
# stay what they were before the modules moved.
log = logging.getLogger("forgeqmp.discard_driver")

__all__ = ["Discard"]

#: How many times a memory restore is tried while the memory file verifies (a QEMU that died
#: while loading is started again) before the VM falls back to a cold start.
RESTORE_ATTEMPTS = 3


class Discard:
    """The discard operation, over the shared :class:`~forgeqmp.ops.context.Context` of an
    :class:`~forgeqmp.forge.Instance` (its entry point: :meth:`run`)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.jobs = BlockJobs(ctx)

    async def run(
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
        :mod:`forgeqmp.adapters.launcher`); the default re-runs the recorded argv detached. ``cold``
        starts the VM cold on the reverted disks without restoring the memory state.

        It also works while QEMU is not running (the instance was opened with
        ``connect(..., allow_offline=True)``): the disks are reverted and the VM is started.

        :raises NoSession: no Active session, or a disk already merged by a commit.
        :raises PrerequisiteError: QEMU no longer runs the recorded configuration, or recover
            found the forge bypassed (the originals were written since enable). Nothing changed.
        :raises ForgeFailed: even the cold start failed; the record holds the argv and QEMU's error.
        """
        timeout = _check_timeout("timeout", timeout)
        report = on_progress or (lambda _event: None)
        launch = (
            launcher or self.ctx.launcher or functools.partial(detached_launcher, timeout=timeout)
        )
        started = time.monotonic()
        # Refused without a session before taking the lock, which would create the state dir.
        self._require_discardable()
        with InstanceLock(self.ctx.state_dir, "forgeqmp discard"):
            record = self._require_discardable()
            touched = [d.name for d in record.disks if d.merged]
            if touched:
                raise NoSession(
                    f"cannot discard: the commit of {', '.join(touched)} already wrote into the "
                    "original image(s), so the memory state no longer matches them; run "
                    "'forgeqmp commit' to finish the commit"
                )
            if launcher is None and self.ctx.launcher is None:
                findings = relaunch_findings(record.qemu.argv)
                if findings:
                    raise NotRelaunchable(
                        "discard refused, nothing was changed: it would stop QEMU and could not "
                        "start it again from the recorded command line: "
                        + describe_findings(findings)
                        + "; or run 'forgeqmp commit' to keep the changes instead",
                        findings,
                    )
            if self.ctx.conn.connected:
                await self._check_recorded_configuration(record)
            self.ctx.store.remove_temp_files()  # a killed operation's: never a file of another
            record = self.ctx.save(record, Event.DISCARD, step=DiscardStep.STOPPING_QEMU)
            self.ctx.crash_point("discard", DiscardStep.STOPPING_QEMU)
            report(ProgressEvent("discard", "stopping-qemu"))
            with anyio.CancelScope(shield=True):
                record = await self._run_discard(
                    record, launch, timeout, report, started, cold=cold
                )
            if record.state is State.FAILED:  # not even the cold start ran: no VM is running
                raise ForgeFailed(f"{record.error}; {record.next_step}")
            return record

    def _require_discardable(self) -> SessionRecord:
        """The session's record if a discard may start. Refused (nothing changed) also once
        recover found the forge bypassed: the guest wrote to the originals since enable, and the
        memory state of enable would run on disks it does not match (a corrupted guest)."""
        record = self.ctx.require_session("discard", lambda _st: True)
        if status_of(record).originals_written:
            why = f" ({record.error})" if record.error else ""
            raise PrerequisiteError(
                f"cannot discard session {record.session_id}: the forge was bypassed{why}; the "
                "memory state saved at enable no longer matches the original disks, so resuming "
                "it would corrupt the guest. Safe way out: "
                + (
                    record.next_step
                    or "keep the VM as it runs on its originals and remove the session's "
                    "overlays and memory file by hand ('forgeqmp status' lists them)"
                )
            )
        return self.ctx.require_session("discard", lambda st: st.can_discard)

    async def finish_discard(
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
        pid = self.ctx.conn.peer.pid
        current = describe_process(pid)
        if current.argv != record.qemu.argv and not _is_active_argv(current.argv, record):
            raise PrerequisiteError(
                "QEMU now runs with another command line than at enable, so the memory state "
                "may not fit it; restart it with the recorded one (forgeqmp status shows it) "
                "or commit instead"
            )
        machine = await self.ctx.send(QUERY_MACHINE_TYPE)
        if str(machine).removesuffix("-machine") != record.qemu.machine:
            raise PrerequisiteError(
                f"the machine type is {machine}, not {record.qemu.machine} as at enable; "
                "the memory state cannot be restored onto it; start QEMU with the recorded command "
                "line (forgeqmp status shows it), or commit instead"
            )
        disks = {d.qdev: d for d in await self.ctx.disks()}
        for disk in record.disks:
            now = disks.get(disk.qdev)
            if (
                record.state is State.ACTIVE
                and now is not None
                and (now.node == disk.device_node or now.file == disk.base_file)
            ):
                raise PrerequisiteError(
                    f"disk {disk.name} runs on its original image, not on its overlay: QEMU was "
                    "started with the original command line since enable, so the forge was "
                    "bypassed and the memory state saved at enable no longer matches the disks; "
                    "discard would corrupt the guest. Run 'forgeqmp recover' to record that, and "
                    "keep the VM as it runs"
                )
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
        # Opened once: the digest is computed from this open file and QEMU is handed the same one,
        # so what verifies is what loads (a file put in its place meanwhile is neither).
        memory_fd, unopened = _open_memory(memory)
        try:
            return await self._run_discard_with(
                record, launch, timeout, report, started, memory_fd, unopened, cold=cold
            )
        finally:
            if memory_fd is not None:
                os.close(memory_fd)

    async def _run_discard_with(
        self,
        record: SessionRecord,
        launch: Launcher,
        timeout: float,
        report: ProgressCallback,
        started: float,
        memory_fd: int | None,
        unopened: str | None,
        *,
        cold: bool,
    ) -> SessionRecord:
        """:meth:`_run_discard` with the memory file open as ``memory_fd`` (None: it could not
        be opened, ``unopened`` says why): its digest is verified while QEMU loads it."""
        memory = record.memory
        verdict: dict[str, str | None] = {}
        verified = anyio.Event()

        async def verify() -> None:
            try:
                verdict["problem"] = unopened or await anyio.to_thread.run_sync(
                    _memory_problem, memory, memory_fd
                )
            finally:
                verified.set()

        problem: str | None = None
        unstarted: ForgeFailed | QMPError | None = None
        after_resume: tuple[Command, ...] = ()
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(verify)
                    await self._stop_qemu(record)
                    record = self.ctx.save(record, step=DiscardStep.QEMU_STOPPED)
                    self.ctx.crash_point("discard", DiscardStep.QEMU_STOPPED)
                    if cold:
                        problem = "a cold start was asked for"
                    elif memory_fd is not None:
                        report(ProgressEvent("discard", "restoring-memory"))
                        problem, unstarted, after_resume = await self._restore_retrying(
                            record, launch, report, verified, verdict, memory_fd
                        )
                    else:
                        problem = unopened or "the memory file is missing"
                if unstarted is not None:  # raised here, not as the task group's ExceptionGroup
                    raise unstarted
                # The digest check says exactly what is wrong with the file; prefer it to the
                # symptom the load showed (a truncated file fails the load too).
                if not cold:
                    problem = verdict.get("problem") or problem
                if problem is None:
                    await self.ctx.send(CONT)
                    restored = True
                else:
                    restored = False
                    report(ProgressEvent("discard", "cold-start", {"reason": problem}))
                    await self._cold_start(record, launch)
                seconds = round(time.monotonic() - started, 3)
                # The VM runs from here: say so now (the restore's cleanup, and removing the
                # overlays and a memory file of GiBs, take a few tenths of a second more before
                # the call returns).
                report(
                    ProgressEvent(
                        "discard",
                        "running",
                        {"memory_restored": restored, "resume_seconds": seconds},
                    )
                )
                if restored:
                    self.ctx.crash_point("discard", DiscardStep.RESUMED)
                    await self._after_resume(after_resume)
        except Exception as exc:
            reason = (
                "the discard deadline passed"
                if isinstance(exc, TimeoutError)
                else self.ctx.failure_reason(exc, pid=None, since=0.0)  # the inner error(s)
            )
            spec = self.ctx.spec(record, incoming=False)
            cold_start = (
                f"cd {shlex.quote(spec.cwd)} && {shlex.join(spec.argv)}, then run "
                "'forgeqmp recover'"
            )
            if memory is not None and verified.is_set() and verdict.get("problem") is None:
                next_step = (
                    "the disks are reverted but the VM is not running, and the memory state is "
                    "intact: fix the cause above, then run 'forgeqmp discard' again to resume the "
                    "VM from it (with --launcher PATH if the platform starts QEMU its own way); "
                    "only to give it up, start the VM cold with: " + cold_start
                )
            else:
                next_step = (
                    "the disks are reverted but the VM is not running; start it with: " + cold_start
                )
            return self.ctx.save(
                record,
                Event.DISCARD_FAILED,
                failure_phase=State.DISCARDING,
                rolled_back=False,
                error=f"discard could not start the VM: {reason}",
                next_step=next_step,
            )
        for disk in record.disks:
            if disk.overlay_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.overlay_file)
        self.ctx.remove_memory_file(record)
        record = self.ctx.save(
            record,
            Event.DISCARDED,
            step=DiscardStep.DISCARDED,
            memory_restored=restored,
            resume_seconds=seconds,
            error=None if restored else f"memory not restored, VM cold-started: {problem}",
            finished_at=_now(),
        )
        self.ctx.crash_point("discard", DiscardStep.DISCARDED)
        log.info(
            "discard %s: VM running %s, %.2f s after discard began",
            record.session_id,
            "from the memory state" if restored else "cold (memory not restored)",
            seconds,
        )
        report(ProgressEvent("discard", "discarded"))
        return record

    async def _stop_qemu(self, record: SessionRecord) -> None:
        """Quit QEMU and wait until the process is really gone (by pidfd, not zombie reaping)."""
        pid = record.qemu.pid
        if self.ctx.conn.connected:
            pid = self.ctx.conn.peer.pid
            with contextlib.suppress(QMPError):
                await self.ctx.send(QUIT, timeout=10)
        elif not recorded_qemu_alive(record):
            return  # QEMU is not running (the recorded pid is gone or now another program's)
        await self.ctx.conn.close()
        gone = await anyio.to_thread.run_sync(wait_gone, pid, 30.0)
        if not gone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not await anyio.to_thread.run_sync(wait_gone, pid, 10.0):
                raise ForgeFailed(f"QEMU (pid {pid}) does not exit, even after SIGKILL")

    async def _restore(
        self, record: SessionRecord, launch: Launcher, memory_fd: int
    ) -> tuple[str | None, tuple[Command, ...]]:
        """Start QEMU waiting for the memory state and load it from ``memory_fd`` (the open file
        being verified); the guest stays paused.

        Returns (None, what to send once the guest runs again) when loaded, else (why not, ())
        (then QEMU is stopped again)."""
        plan = plan_restore(record)
        await launch(self.ctx.spec(record, incoming=True))
        await self.ctx.conn.reconnect()
        log.info(
            "discard %s: QEMU relaunched waiting for the memory state, pid %d; restoring %s",
            record.session_id,
            self.ctx.conn.peer.pid,
            plan.memory_file,
        )
        self.ctx.crash_point("discard", DiscardStep.QEMU_LAUNCHED)
        conn = self.ctx.conn
        try:
            await self.ctx.send(plan.set_capabilities())
            plan, parameters_before = await self._set_load_parameters(plan)
            fdset_id = await self._hand_memory_file(plan, memory_fd)
            with conn.subscribe("MIGRATION") as migration:
                await self.ctx.send(plan.migrate_incoming(fdset_id))
                ev = await migration.wait(
                    lambda e: e["data"]["status"] in _MIGRATION_ENDED,
                    DEFAULT_DISCARD_TIMEOUT * 10,  # bounded by the caller's deadline
                    "the memory state to load",
                )
            if ev["data"]["status"] == "completed":
                self.ctx.crash_point("discard", DiscardStep.MEMORY_LOADED)
                return None, plan.after_resume(fdset_id, parameters_before)
            info = await self.ctx.send(QUERY_MIGRATE)
            return f"loading the memory state failed: {info.get('error-desc', 'no detail')}", ()
        except (QMPError, ForgeFailed) as exc:
            return f"loading the memory state failed: {exc}", ()

    async def _set_load_parameters(self, plan: RestorePlan) -> tuple[RestorePlan, dict[str, Any]]:
        """The load's ``multifd-channels`` (:meth:`RestorePlan.set_parameters`), with the
        parameters read before it. A speed-up only: QEMU refusing it is logged and the load
        runs on the QEMU's own count (the plan returned then sets nothing back)."""
        command = plan.set_parameters()
        if command is None:
            return plan, {}
        try:
            before = dict(await self.ctx.send(QUERY_MIGRATE_PARAMETERS))
            await self.ctx.send(command)
        except QMPCommandError as exc:
            log.warning(
                "discard: %s refused (%s): the memory state loads on QEMU's own multifd channels",
                command,
                exc,
            )
            return attrs.evolve(plan, multifd_channels=None), {}
        return plan, before

    async def _after_resume(self, commands: Sequence[Command]) -> None:
        """The restore's cleanup once the guest runs again (:meth:`RestorePlan.after_resume`):
        the fdset removed (QEMU keeps its descriptor open until then: the deleted memory file,
        guest RAM, would stay allocated, and readable through /proc/<pid>/fd, while the VM runs)
        and the migration capabilities set back to QEMU's defaults (multifd/mapped-ram would
        change the platform's next migration). The guest runs its restored state whatever QEMU
        answers: a refusal is logged, never a reason to restore again. A QEMU that no longer
        answers at all (it died right after ``cont``) is raised: the VM is not running, and the
        memory file, still there, can be restored again."""
        for command in commands:
            try:
                await self.ctx.send(command)
            except QMPCommandError as exc:
                log.warning(
                    "discard: %s after the restore failed: %s (the VM runs its restored state)",
                    command.name,
                    exc,
                )

    async def _hand_memory_file(self, plan: RestorePlan, memory_fd: int) -> int | None:
        """Pass the open memory file to QEMU (a duplicate of ``memory_fd``: the same open file,
        whose digest is being verified) as the plan says; returns its fdset id, if any.

        Both transports bind the load to that file: ``file:/dev/fdset/N`` (mapped-ram, QEMU
        reads with pread) and ``fd:NAME`` (a stream read from the shared file offset, which is
        put back to the start for each attempt; the digest reads with pread and never moves it).
        """
        os.lseek(memory_fd, 0, os.SEEK_SET)
        if plan.uses_fdset:
            fdset_id, _ = await self.ctx.conn.add_fd(memory_fd, opaque=plan.fdset_opaque)
            return fdset_id
        await self.ctx.conn.pass_fd(memory_fd, plan.fd_name)
        return None

    async def _restore_retrying(
        self,
        record: SessionRecord,
        launch: Launcher,
        report: ProgressCallback,
        verified: anyio.Event,
        verdict: dict[str, str | None],
        memory_fd: int,
    ) -> tuple[str | None, ForgeFailed | QMPError | None, tuple[Command, ...]]:
        """:meth:`_restore`, tried again (up to RESTORE_ATTEMPTS in all) when QEMU died or
        failed while starting or loading, as long as the memory file matches its digest.

        Returns (None, None, what to send once the guest runs) when loaded, else why not and,
        when the last attempt could not even start QEMU, that error (the caller raises it: a cold
        start through the same launcher would fail the same way), and ()."""
        for attempt in range(1, RESTORE_ATTEMPTS + 1):
            if attempt > 1:
                await self._stop_restoring_qemu()
            try:
                problem, after_resume = await self._restore(record, launch, memory_fd)
            except (ForgeFailed, QMPError) as exc:  # the launch, or QMP of the new QEMU
                start_failure: ForgeFailed | QMPError | None = exc
                problem = f"starting QEMU for the memory restore failed: {exc}"
            else:
                start_failure = None
            if problem is None:
                return None, None, after_resume
            # Only while the file is what enable saved: a damaged file fails every time, and the
            # digest's verdict says why.
            await verified.wait()
            if verdict.get("problem") is not None or attempt == RESTORE_ATTEMPTS:
                return problem, start_failure, ()
            report(
                ProgressEvent(
                    "discard", "restoring-memory", {"attempt": attempt + 1, "after": problem}
                )
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _stop_restoring_qemu(self) -> None:
        """Stop whatever QEMU a failed restore left (it may be dead already, or still loading)."""
        peer = self.ctx.conn._peer  # the QEMU launched for the restore, if it was reached
        if self.ctx.conn.connected:
            with contextlib.suppress(QMPError):
                await self.ctx.send(QUIT, timeout=10)
        await self.ctx.conn.close()
        if peer is not None and not await anyio.to_thread.run_sync(wait_gone, peer.pid, 30.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(peer.pid, signal.SIGKILL)
            if not await anyio.to_thread.run_sync(wait_gone, peer.pid, 10.0):
                raise ForgeFailed(f"QEMU (pid {peer.pid}) does not exit, even after SIGKILL")

    async def _cold_start(self, record: SessionRecord, launch: Launcher) -> None:
        """Stop whatever QEMU the restore left and boot cold on the (reverted) disks."""
        if self.ctx.conn.connected:
            pid = self.ctx.conn.peer.pid
            with contextlib.suppress(QMPError):
                await self.ctx.send(QUIT, timeout=10)
            await self.ctx.conn.close()
            await anyio.to_thread.run_sync(wait_gone, pid, 30.0)
        await launch(self.ctx.spec(record, incoming=False))
        await self.ctx.conn.reconnect()
        log.info("discard %s: QEMU started cold, pid %d", record.session_id, self.ctx.conn.peer.pid)
        if await self.ctx.runstate() != "running":
            await self.ctx.send(CONT)


def _open_memory(memory: MemoryRecord | None) -> tuple[int | None, str | None]:
    """The memory file opened read-only (never through a symlink), or None and why not."""
    if memory is None:
        return None, None
    try:
        return os.open(memory.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), None
    except FileNotFoundError:
        return None, "the memory file is missing"
    except OSError as exc:
        return None, f"the memory file cannot be opened: {exc}"


def _memory_problem(memory: MemoryRecord | None, memory_fd: int | None) -> str | None:
    """Why the memory file open as ``memory_fd`` cannot be trusted, or None when it matches the
    digest recorded at enable (by the algorithm recorded with it: old records' SHA-256 too)."""
    if memory is None or memory.digest is None:
        return "no verified memory state was recorded at enable"
    if memory_fd is None:
        return "the memory file is missing"
    try:
        digest, size = memhash.hash_fd(memory_fd, algorithm=memory.digest_algorithm)
    except OSError as exc:
        return f"the memory file cannot be read: {exc}"
    if memory.size is not None and size != memory.size:
        return f"the memory file has {size} bytes, not {memory.size} as saved: it was truncated"
    if digest != memory.digest:
        return "the memory file does not match the digest recorded at enable: it was altered"
    return None


def _is_active_argv(argv: Sequence[str], record: SessionRecord) -> bool:
    """``argv`` is the command line that runs the session's disks on their overlays."""
    try:
        return tuple(argv) == active_argv(record)
    except PrerequisiteError:
        return False
