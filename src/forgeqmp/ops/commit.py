"""Commit: merge every forged disk's overlay back into its original, live and disks in parallel
(``block-commit``, each disk switched back with the guest paused for milliseconds), or offline
with ``qemu-img commit`` while QEMU is not running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread
import attrs

from forgeqmp.adapters import crashpoints
from forgeqmp.adapters.hostflush import write_back_while
from forgeqmp.adapters.qemuimg import (
    commit_overlay,
    find_qemu_img,
)
from forgeqmp.adapters.statedir import InstanceLock
from forgeqmp.core import names
from forgeqmp.core.plans.commit import (
    attached_nodes,
    disk_commit,
    is_commit_job,
    plan_commit,
)
from forgeqmp.core.plans.common import QUERY_BLOCK, QUERY_JOBS, find_job, job_resume
from forgeqmp.core.progress import JobProgress, ProgressCallback, ProgressEvent, RateEstimate
from forgeqmp.core.record import (
    DiskRecord,
    SessionRecord,
)
from forgeqmp.core.states import Event, State
from forgeqmp.core.steps import CommitStep
from forgeqmp.errors import (
    ForgeFailed,
    PrerequisiteError,
    QMPCommandError,
)
from forgeqmp.ops.blockjobs import BlockJobs
from forgeqmp.ops.context import (
    _UNDO_TIMEOUT,
    DEFAULT_COMMIT_TIMEOUT,
    PROGRESS_INTERVAL,
    Context,
    _check_timeout,
    _now,
    _overlay_gone,
)
from forgeqmp.ops.converge import WriteBound

# The logger names are part of the documented interface (docs/embedding.md, "Logs"): they
# stay what they were before the modules moved.
log = logging.getLogger("forgeqmp.commit_driver")

__all__ = ["Commit"]

#: What a stopped commit's next step is when the original's file system is full.
_NO_SPACE = "No space left on device"


@attrs.define
class _JobsSent:
    """Which disks' ``block-commit`` was sent to QEMU, and which QEMU accepted (a job exists):
    only those can have written into their originals."""

    sent: set[str] = attrs.field(factory=set)
    accepted: set[str] = attrs.field(factory=set)


class Commit:
    """The commit operation, over the shared :class:`~forgeqmp.ops.context.Context` of an
    :class:`~forgeqmp.forge.Instance` (its entry point: :meth:`run`)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.jobs = BlockJobs(ctx)

    async def run(
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
        is then Failed with that detail per disk, and a later commit finishes the rest. The jobs
        such a stop finds running are left running in QEMU (the record names them, ``status``
        shows how far they got): the next commit (or ``recover``) waits for them where they
        are instead of copying from the start again, so a disk too big for one timeout still
        gets merged by retries.

        :raises InvalidArgument: a bad timeout. Nothing changed.
        :raises NoSession: no Active session (or no failed commit to finish). Nothing changed.
        :raises TaskRunning: another task runs on the instance. Nothing changed.
        :raises ForgeFailed: the commit stopped; the record says which disks are merged.
        """
        timeout = _check_timeout("timeout", timeout)
        report = on_progress or (lambda _event: None)
        # Refused without a session before taking the lock, which would create the state dir.
        self.ctx.require_session("commit", lambda st: st.can_commit)
        with InstanceLock(self.ctx.state_dir, "forgeqmp commit"):
            record = self.ctx.require_session("commit", lambda st: st.can_commit)
            self.ctx.store.remove_temp_files()  # a killed operation's: never a file of another
            if not self.ctx.conn.connected:
                return await self._commit_offline(record, timeout, report)
            await self.ctx.check_no_task(_left_running(record))
            record = await self.ctx.resume_left_paused(record)
            pid, since = self.ctx.conn.peer.pid, self.ctx.started()
            plan = plan_commit(record, await self.ctx.send(QUERY_BLOCK))
            pending = [record.disk(job.disk) for job in plan.disks]
            record = self._begin_commit(record)
            saver = anyio.Lock()
            bounds = WriteBound(self.ctx, saver)
            no_return = anyio.Event()
            jobs = _JobsSent()
            deadline = anyio.current_time() + timeout
            try:
                with anyio.fail_after(timeout):
                    async with anyio.create_task_group() as tg:
                        for disk in pending:
                            tg.start_soon(
                                self._commit_disk, disk, saver, report, no_return, jobs, deadline
                            )
                        if pending:
                            tg.start_soon(self._remove_memory_file_after, no_return, record)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    await self._restore_throttles(bounds)
                    done = isinstance(exc, TimeoutError) and await self._tidy_if_all_merged(pending)
                    if not done:
                        reason = self._commit_reason(exc, timeout, pid=pid, since=since)
                        record = await self._commit_failed(
                            reason, pending, jobs, keep_running=_stopped_from_outside(exc)
                        )
                if not done:
                    if isinstance(exc, Exception):  # an interrupt (Ctrl-C) stays one
                        raise ForgeFailed(
                            f"commit stopped: {record.error}; {record.next_step}"
                        ) from None
                    raise
            record = self.ctx.reload(record)
            self.ctx.remove_memory_file(record)
            record = self.ctx.save(
                record,
                Event.COMMITTED,
                step=CommitStep.COMMITTED,
                finished_at=_now(),
            )
            self.ctx.crash_point("commit", CommitStep.COMMITTED)
            report(ProgressEvent("commit", "committed"))
            return record

    async def _commit_disk(
        self,
        disk: DiskRecord,
        saver: anyio.Lock,
        report: ProgressCallback,
        no_return: anyio.Event,
        jobs: _JobsSent,
        deadline: float,
    ) -> None:
        conn = self.ctx.conn
        bounds = WriteBound(self.ctx, saver)
        job_id = disk_commit(disk).job_id
        with conn.subscribe(
            "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
        ) as sub:
            left = await self._job_left_running(disk, job_id)
            if left is None:
                await self._start_commit_job(disk, job_id, saver, jobs)
                status = "created"
            else:
                jobs.sent.add(disk.name)
                jobs.accepted.add(disk.name)
                status = left.status
            # Only now may the original receive data: the memory state is useless from here
            # (before, a job QEMU refuses leaves discard possible, with the memory).
            no_return.set()
            meter = _ProgressMeter(disk.name, report)
            if status not in _SETTLED:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._report_job_progress, job_id, meter)
                    # A guest that outwrites the copy would keep the job from ever being ready.
                    tg.start_soon(bounds.watch, disk, job_id, deadline)
                    # QEMU flushes the original before the job is ready: written back during
                    # the copy, that flush has little left to write (see hostflush).
                    tg.start_soon(write_back_while, disk.base_file)
                    await sub.wait(
                        lambda e: e["data"]["status"] in ("ready", "concluded"),
                        DEFAULT_COMMIT_TIMEOUT * 24,  # bounded by the caller's deadline
                        f"the commit of {disk.name} to be ready",
                    )
                    tg.cancel_scope.cancel()
            await self._report_job_done(job_id, meter)
        self.ctx.crash_point("commit", CommitStep.JOB_READY)
        pause_ms = await self.jobs.pivot(
            disk.name,
            disk.qdev,
            disk.device_node,
            job_id,
            lambda record: _overlay_gone(record, disk.name),
            mark_step=True,
            lock=saver,
        )
        await bounds.restore(disk.name)
        await self.jobs.drop_overlay(disk)
        self.ctx.crash_point("commit", CommitStep.DISK_MERGED)
        log.info(
            "commit: disk %s merged into %s, overlay %s removed; guest paused %s ms to switch",
            disk.name,
            disk.base_file,
            disk.overlay_file,
            "?" if pause_ms is None else f"{pause_ms:.1f}",
        )
        report(ProgressEvent("commit", "disk-merged", {"disk": disk.name, "pause_ms": pause_ms}))

    async def _job_left_running(self, disk: DiskRecord, job_id: str) -> JobProgress | None:
        """The job a stopped commit left running for ``disk`` (recorded in the record and still
        in QEMU, not failed), which this commit waits for instead of starting a new one; None:
        there is none, start one."""
        if disk.commit_job != job_id:
            return None
        listed = await self.ctx.send(QUERY_JOBS)
        job = find_job(listed, job_id)
        if job is None:
            return None
        if job["status"] == "concluded" and job.get("error"):
            await self.jobs.drop_job(job_id)  # it failed: a new job starts over from the overlay
            return None
        if job["status"] == "paused":
            await self.ctx.send(job_resume(job_id))
        progress = JobProgress.from_job(job)
        log.info(
            "commit: disk %s: reattaching to its commit job %s (%s, %s)",
            disk.name,
            job_id,
            progress.status,
            progress.describe(),
        )
        return progress

    async def _start_commit_job(
        self, disk: DiskRecord, job_id: str, saver: anyio.Lock, jobs: _JobsSent
    ) -> None:
        """Record ``disk``'s point of no return, then start its ``block-commit`` job."""
        assert disk.overlay_node is not None
        await self._mark_merged(disk, saver, job_id)
        jobs.sent.add(disk.name)
        try:
            await self.ctx.send(disk_commit(disk, crashpoints.commit_speed()).start())
        except QMPCommandError:
            jobs.sent.discard(disk.name)  # refused: QEMU created no job
            raise
        jobs.accepted.add(disk.name)
        self.ctx.crash_point("commit", CommitStep.JOB_STARTED)

    async def _report_job_progress(self, job_id: str, meter: _ProgressMeter) -> None:
        """Report the job's bytes done/total and ETA every :data:`PROGRESS_INTERVAL` until
        cancelled (once the job is ready)."""
        while True:
            jobs = await self.ctx.send(QUERY_JOBS)
            job = find_job(jobs, job_id)
            if job is not None:
                meter.sample(JobProgress.from_job(job))
            await anyio.sleep(PROGRESS_INTERVAL)

    async def _report_job_done(self, job_id: str, meter: _ProgressMeter) -> None:
        """The final ``done == total`` progress of a job that is ready (or ended), also when it
        got there between two polls or before the first (a small disk): a ``disk-merged`` event
        alone says nothing of the bytes."""
        jobs = await self.ctx.send(QUERY_JOBS)
        job = find_job(jobs, job_id)
        if job is None or job.get("error"):
            return
        progress = JobProgress.from_job(job)
        total = max(progress.total, progress.done)
        meter.sample(attrs.evolve(progress, done=total, total=total))

    async def _tidy_if_all_merged(self, started: Sequence[DiskRecord]) -> bool:
        """The deadline passed after every disk was merged and back on its original (the last
        switch takes its milliseconds whatever the deadline): the commit's work is done, so it
        is finished rather than failed. Removes what the cut-short steps left (the overlays'
        nodes and files). False: some disk is not merged yet."""
        record = self.ctx.current()
        if any(d.overlay_node is not None for d in record.disks):
            return False
        log.info("commit: the deadline passed after the last disk was merged: finishing it")
        for disk in started:
            with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
                await self.jobs.drop_overlay(disk)
        return True

    async def _restore_throttles(self, bounds: WriteBound) -> None:
        """A stopped commit leaves no guest write bounded: the platform's throttles go back
        (a throttle that cannot be set back stays recorded, for recover)."""
        for disk in self.ctx.current().disks:
            if disk.throttle is not None:
                with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
                    await bounds.restore(disk.name)

    def _commit_reason(
        self, cause: BaseException, timeout: float, *, pid: int | None, since: float
    ) -> str:
        if isinstance(cause, TimeoutError):
            return f"the commit deadline ({timeout:g} s) passed"
        return self.ctx.failure_reason(cause, pid=pid, since=since)

    async def _commit_failed(
        self,
        reason: str,
        started: Sequence[DiskRecord] = (),
        jobs: _JobsSent | None = None,
        *,
        keep_running: bool = False,
    ) -> SessionRecord:
        """Stop the jobs not past the point of no return; record per disk exactly what is merged.

        ``started``: the disks as they were when the commit started (their overlay node names,
        which the record drops once a disk is back on its original). ``jobs``: whose commit job
        was sent and accepted; a disk marked at its point of no return whose job QEMU never
        created is unmarked, its original untouched (so discard stays possible if no disk's
        original received data). ``keep_running``: the commit was stopped from outside (its
        deadline, a cancellation), not by a failure: the recorded jobs still copying are left
        running in QEMU, so that the next commit continues them instead of starting over."""
        existing: set[str] | None = None  # ids of the commit jobs QEMU has; None: unknown
        running: dict[str, JobProgress] = {}  # disk name → its job, left running
        recorded = {d.commit_job: d.name for d in self.ctx.current().disks if d.commit_job}
        with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
            listed = await self.ctx.send(QUERY_JOBS)
            existing = {str(job["id"]) for job in listed}
            for job in listed:
                if not is_commit_job(job):
                    continue
                progress = JobProgress.from_job(job)
                if keep_running and job["id"] in recorded and _still_copying(job):
                    running[recorded[job["id"]]] = progress
                    continue
                await self.jobs.drop_job(job["id"])
        record = self.ctx.store.load()
        assert record is not None
        attached: dict[str, str] = {}
        with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
            attached = attached_nodes(await self.ctx.send(QUERY_BLOCK))
        done = [d for d in record.disks if attached.get(d.qdev) == d.device_node]
        originals = {d.name: d for d in started}
        for disk in done:
            with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
                await self.jobs.drop_overlay(originals.get(disk.name, disk))
            record = _overlay_gone(record, disk.name)
        if jobs is not None:
            for disk in record.disks:
                started_as = originals.get(disk.name, disk)
                if (
                    disk.merged
                    and disk.overlay_node is not None
                    and _job_never_created(started_as, jobs, existing)
                ):
                    record = record.evolve_disk(disk.name, merged=False, commit_job=None)
        for disk in record.disks:
            if disk.commit_job is not None and disk.name not in running:
                record = record.evolve_disk(disk.name, commit_job=None)  # no job left for it
        return self._save_commit_failure(record, reason, running)

    def _save_commit_failure(
        self,
        record: SessionRecord,
        reason: str,
        running: Mapping[str, JobProgress] | None = None,
    ) -> SessionRecord:
        """Record a stopped commit as Failed, saying which disks are merged and which are not,
        and how far the jobs left ``running`` in QEMU (disk name → job) got."""
        running = running or {}
        done = [d.name for d in record.disks if d.merged and d.overlay_node is None]
        partly = [d.name for d in record.disks if d.merged and d.overlay_node is not None]
        untouched = [d.name for d in record.disks if not d.merged]
        if partly or untouched:
            next_step = "run 'forgeqmp commit' again to finish the disks still on overlays"
            if running:
                next_step = (
                    f"the merge continues in QEMU ({_running_text(running)}): run 'forgeqmp "
                    "commit' again to finish it from there ('forgeqmp status' shows how far it "
                    "got)"
                )
            if _NO_SPACE in reason:
                next_step = (
                    "free space on the file system of the original image(s) (or grow it), then "
                    "run 'forgeqmp commit' again to finish the disks still on overlays"
                )
            if not done and not partly:
                next_step += ", or 'forgeqmp discard': no original was written into"
        else:
            next_step = "run 'forgeqmp recover' to finish the session"
        detail = (
            f"disks fully merged: {', '.join(done) or 'none'}; still on overlays: "
            f"{', '.join(partly + untouched) or 'none'}"
        )
        if partly:
            detail += (
                f"; of those, partly merged (their originals hold part of the writes, so "
                f"discard is no longer possible): {', '.join(partly)}"
            )
        if untouched:
            detail += f"; of those, not started (originals untouched): {', '.join(untouched)}"
        if running:
            detail += f"; still merging in QEMU: {_running_text(running)}"
        return self.ctx.save(
            record,
            Event.COMMIT_FAILED,
            failure_phase=State.COMMITTING,
            rolled_back=False,
            error=f"{reason}; {detail}",
            next_step=next_step,
        )

    def _begin_commit(self, record: SessionRecord) -> SessionRecord:
        """Record that the commit runs (again: a failed one's error is cleared)."""
        record = self.ctx.save(
            record,
            Event.COMMIT,
            step=CommitStep.COMMITTING,
            failure_phase=None,
            error=None,
            next_step=None,
        )
        self.ctx.crash_point("commit", CommitStep.COMMITTING)
        return record

    async def _mark_merged(
        self, disk: DiskRecord, saver: anyio.Lock, job_id: str | None = None
    ) -> None:
        """The point of no return of ``disk``: recorded before its original receives any data
        (from then on discard is refused), with the id of the job about to be started."""
        async with saver:
            self.ctx.save(self.ctx.current().evolve_disk(disk.name, merged=True, commit_job=job_id))
            self.ctx.crash_point("commit", CommitStep.DISK_MARKED)

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
        record = self._begin_commit(record)
        report(ProgressEvent("commit", "offline", {"disks": [d.name for d in pending]}))
        saver = anyio.Lock()

        async def merge(disk: DiskRecord) -> None:
            await self._mark_merged(disk, saver)
            await commit_overlay(qemu_img, disk, record.qemu.env)
            async with saver:
                self.ctx.save(_overlay_gone(self.ctx.current(), disk.name))
            if disk.overlay_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.overlay_file)
            self.ctx.crash_point("commit", CommitStep.DISK_MERGED)
            report(ProgressEvent("commit", "disk-merged", {"disk": disk.name, "pause_ms": None}))

        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    for disk in pending:
                        tg.start_soon(merge, disk)
        except BaseException as exc:
            reason = self._commit_reason(exc, timeout, pid=None, since=0.0)
            record = self._save_commit_failure(self.ctx.current(), reason)
            if isinstance(exc, Exception):  # an interrupt (Ctrl-C) stays one
                raise ForgeFailed(f"commit stopped: {record.error}; {record.next_step}") from None
            raise
        record = self.ctx.current()
        self.ctx.remove_memory_file(record)
        record = self.ctx.save(
            record,
            Event.COMMITTED,
            step=CommitStep.COMMITTED,
            finished_at=_now(),
            next_step="the VM is stopped: start it with its original command line",
        )
        self.ctx.crash_point("commit", CommitStep.COMMITTED)
        report(ProgressEvent("commit", "committed"))
        return record

    async def _remove_memory_file_after(self, event: anyio.Event, record: SessionRecord) -> None:
        """Once ``event`` is set (a disk is recorded merged: discard can never use the memory
        file again), remove the file while the disks merge; removing gigabytes of page cache
        takes a while."""
        await event.wait()
        await anyio.to_thread.run_sync(self.ctx.remove_memory_file, record)


@attrs.define
class _ProgressMeter:
    """One disk's progress reports: each new done/total once, with the ETA from the rate
    measured since the first sample (:class:`~forgeqmp.core.progress.RateEstimate`)."""

    disk: str
    report: ProgressCallback
    estimate: RateEstimate | None = None
    last: tuple[int, int] | None = None

    def sample(self, job: JobProgress) -> None:
        now = time.monotonic()
        if self.estimate is None:
            self.estimate = RateEstimate(now, job.done)
        if (job.done, job.total) == self.last:
            return
        self.last = (job.done, job.total)
        detail = {"disk": self.disk, **self.estimate.detail(now, job.done, job.total)}
        self.report(ProgressEvent("commit", "progress", detail))


#: Job states past copying: the job waits for its completion (or ended); no event to wait for.
_SETTLED = frozenset({"ready", "pending", "waiting", "aborting", "concluded"})


def _left_running(record: SessionRecord) -> frozenset[str]:
    """The ids of the commit jobs a stopped commit of ``record`` left running in QEMU."""
    return frozenset(
        d.commit_job for d in record.disks if d.commit_job is not None and d.overlay_node
    )


def _stopped_from_outside(exc: BaseException) -> bool:
    """Whether a commit ended by ``exc`` was stopped (deadline, cancellation, interrupt) rather
    than failed: then its running jobs are left to go on in QEMU."""
    return isinstance(exc, TimeoutError | KeyboardInterrupt | anyio.get_cancelled_exc_class())


def _still_copying(job: Mapping[str, Any]) -> bool:
    """Whether a ``query-jobs`` entry is a job that goes on (or waits) without us."""
    return job["status"] in ("created", "running", "paused", "ready", "standby") and not job.get(
        "error"
    )


def _running_text(running: Mapping[str, JobProgress]) -> str:
    return ", ".join(f"{name}: {job.describe()}" for name, job in sorted(running.items()))


def _job_never_created(disk: DiskRecord, jobs: _JobsSent, existing: set[str] | None) -> bool:
    """Whether QEMU certainly never created ``disk``'s commit job (so nothing was written into
    its original): its ``block-commit`` was never sent or was refused, or it was sent without an
    answer and QEMU, asked after, has no such job. Unknown (QEMU did not answer): False."""
    if disk.name not in jobs.sent:
        return True
    if disk.name in jobs.accepted or existing is None:
        return False
    assert disk.overlay_node is not None
    return names.commit_job(disk.overlay_node) not in existing
