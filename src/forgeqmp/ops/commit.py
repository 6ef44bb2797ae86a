"""Commit: merge every forged disk's overlay back into its original, live and disks in parallel
(``block-commit``, each disk switched back with the guest paused for milliseconds), or offline
with ``qemu-img commit`` while QEMU is not running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import anyio
import anyio.to_thread
import attrs

from forgeqmp.adapters.statedir import InstanceLock
from forgeqmp.core.progress import ProgressCallback, ProgressEvent
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
from forgeqmp.ops.context import (
    _UNDO_TIMEOUT,
    DEFAULT_COMMIT_TIMEOUT,
    PROGRESS_INTERVAL,
    DriverBase,
    _attached_nodes,
    _check_timeout,
    _now,
    _overlay_gone,
)
from forgeqmp.ops.power import (
    commit_overlay,
    find_qemu_img,
)

# The logger names are part of the documented interface (docs/embedding.md, "Logs"): they
# stay what they were before the modules moved.
log = logging.getLogger("forgeqmp.commit_driver")

__all__ = ["CommitDriver"]

#: What a stopped commit's next step is when the original's file system is full.
_NO_SPACE = "No space left on device"


@attrs.define
class _JobsSent:
    """Which disks' ``block-commit`` was sent to QEMU, and which QEMU accepted (a job exists):
    only those can have written into their originals."""

    sent: set[str] = attrs.field(factory=set)
    accepted: set[str] = attrs.field(factory=set)


class CommitDriver(DriverBase):
    """The commit operation of an :class:`~forgeqmp.forge.Instance`."""

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
            self.store.remove_temp_files()  # a killed operation's: never a file of another
            if not self.conn.connected:
                return await self._commit_offline(record, timeout, report)
            await self._check_no_task()
            pid, since = self.conn.peer.pid, self._started()
            blocks = await self.conn.execute("query-block")
            attached = _attached_nodes(blocks)
            pending = [d for d in record.disks if attached.get(d.qdev) == d.overlay_node]
            record = self._begin_commit(record)
            saver = anyio.Lock()
            no_return = anyio.Event()
            jobs = _JobsSent()
            try:
                with anyio.fail_after(timeout):
                    async with anyio.create_task_group() as tg:
                        for disk in pending:
                            tg.start_soon(self._commit_disk, disk, saver, report, no_return, jobs)
                        if pending:
                            tg.start_soon(self._remove_memory_file_after, no_return, record)
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    reason = self._commit_reason(exc, timeout, pid=pid, since=since)
                    record = await self._commit_failed(reason, pending, jobs)
                if isinstance(exc, Exception):  # an interrupt (Ctrl-C) stays one
                    raise ForgeFailed(
                        f"commit stopped: {record.error}; {record.next_step}"
                    ) from None
                raise
            record = self._reload(record)
            self._remove_memory_file(record)
            record = self._save(
                record,
                Event.COMMITTED,
                step=CommitStep.COMMITTED,
                finished_at=_now(),
            )
            self._crash_point("commit", CommitStep.COMMITTED)
            report(ProgressEvent("commit", "committed"))
            return record

    async def _commit_disk(
        self,
        disk: DiskRecord,
        saver: anyio.Lock,
        report: ProgressCallback,
        no_return: anyio.Event,
        jobs: _JobsSent,
    ) -> None:
        assert disk.overlay_node is not None
        conn = self.conn
        job_id = _job_id(disk)
        await self._mark_merged(disk, saver)
        with conn.subscribe(
            "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
        ) as sub:
            jobs.sent.add(disk.name)
            try:
                await conn.execute(
                    "block-commit",
                    {
                        "job-id": job_id,
                        "device": disk.overlay_node,
                        "base-node": disk.device_node,
                        "auto-dismiss": False,
                    },
                )
            except QMPCommandError:
                jobs.sent.discard(disk.name)  # refused: QEMU created no job
                raise
            jobs.accepted.add(disk.name)
            # Only now may the original receive data: the memory state is useless from here
            # (before, a job QEMU refuses leaves discard possible, with the memory).
            no_return.set()
            self._crash_point("commit", CommitStep.JOB_STARTED)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._report_job_progress, job_id, disk.name, report)
                await sub.wait(
                    lambda e: e["data"]["status"] in ("ready", "concluded"),
                    DEFAULT_COMMIT_TIMEOUT * 24,  # bounded by the caller's deadline
                    f"the commit of {disk.name} to be ready",
                )
                tg.cancel_scope.cancel()
        self._crash_point("commit", CommitStep.JOB_READY)
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
        self._crash_point("commit", CommitStep.DISK_MERGED)
        log.info(
            "commit: disk %s merged into %s, overlay %s removed; guest paused %s ms to switch",
            disk.name,
            disk.base_file,
            disk.overlay_file,
            "?" if pause_ms is None else f"{pause_ms:.1f}",
        )
        report(ProgressEvent("commit", "disk-merged", {"disk": disk.name, "pause_ms": pause_ms}))

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

    def _commit_reason(
        self, cause: BaseException, timeout: float, *, pid: int | None, since: float
    ) -> str:
        if isinstance(cause, TimeoutError):
            return f"the commit deadline ({timeout:g} s) passed"
        return self._failure_reason(cause, pid=pid, since=since)

    async def _commit_failed(
        self, reason: str, started: Sequence[DiskRecord] = (), jobs: _JobsSent | None = None
    ) -> SessionRecord:
        """Stop the jobs not past the point of no return; record per disk exactly what is merged.

        ``started``: the disks as they were when the commit started (their overlay node names,
        which the record drops once a disk is back on its original). ``jobs``: whose commit job
        was sent and accepted; a disk marked at its point of no return whose job QEMU never
        created is unmarked, its original untouched (so discard stays possible if no disk's
        original received data)."""
        conn = self.conn
        existing: set[str] | None = None  # ids of the commit jobs QEMU has; None: unknown
        with contextlib.suppress(Exception), anyio.fail_after(_UNDO_TIMEOUT):
            listed = await conn.execute("query-jobs")
            existing = {str(job["id"]) for job in listed}
            for job in listed:
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
        if jobs is not None:
            for disk in record.disks:
                started_as = originals.get(disk.name, disk)
                if (
                    disk.merged
                    and disk.overlay_node is not None
                    and _job_never_created(started_as, jobs, existing)
                ):
                    record = record.evolve_disk(disk.name, merged=False)
        return self._save_commit_failure(record, reason)

    def _save_commit_failure(self, record: SessionRecord, reason: str) -> SessionRecord:
        """Record a stopped commit as Failed, saying which disks are merged and which are not."""
        done = [d.name for d in record.disks if d.merged and d.overlay_node is None]
        partly = [d.name for d in record.disks if d.merged and d.overlay_node is not None]
        untouched = [d.name for d in record.disks if not d.merged]
        if partly or untouched:
            next_step = "run 'forgeqmp commit' again to finish the disks still on overlays"
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
        return self._save(
            record,
            Event.COMMIT_FAILED,
            failure_phase=State.COMMITTING,
            rolled_back=False,
            error=f"{reason}; {detail}",
            next_step=next_step,
        )

    def _begin_commit(self, record: SessionRecord) -> SessionRecord:
        """Record that the commit runs (again: a failed one's error is cleared)."""
        record = self._save(
            record,
            Event.COMMIT,
            step=CommitStep.COMMITTING,
            failure_phase=None,
            error=None,
            next_step=None,
        )
        self._crash_point("commit", CommitStep.COMMITTING)
        return record

    async def _mark_merged(self, disk: DiskRecord, saver: anyio.Lock) -> None:
        """The point of no return of ``disk``: recorded before its original receives any data
        (from then on discard is refused)."""
        async with saver:
            self._save(self._current().evolve_disk(disk.name, merged=True))
            self._crash_point("commit", CommitStep.DISK_MARKED)

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
                self._save(_overlay_gone(self._current(), disk.name))
            if disk.overlay_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.overlay_file)
            self._crash_point("commit", CommitStep.DISK_MERGED)
            report(ProgressEvent("commit", "disk-merged", {"disk": disk.name, "pause_ms": None}))

        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    for disk in pending:
                        tg.start_soon(merge, disk)
        except BaseException as exc:
            reason = self._commit_reason(exc, timeout, pid=None, since=0.0)
            record = self._save_commit_failure(self._current(), reason)
            if isinstance(exc, Exception):  # an interrupt (Ctrl-C) stays one
                raise ForgeFailed(f"commit stopped: {record.error}; {record.next_step}") from None
            raise
        record = self._current()
        self._remove_memory_file(record)
        record = self._save(
            record,
            Event.COMMITTED,
            step=CommitStep.COMMITTED,
            finished_at=_now(),
            next_step="the VM is stopped: start it with its original command line",
        )
        self._crash_point("commit", CommitStep.COMMITTED)
        report(ProgressEvent("commit", "committed"))
        return record

    async def _remove_memory_file_after(self, event: anyio.Event, record: SessionRecord) -> None:
        """Once ``event`` is set (a disk is recorded merged: discard can never use the memory
        file again), remove the file while the disks merge; removing gigabytes of page cache
        takes a while."""
        await event.wait()
        await anyio.to_thread.run_sync(self._remove_memory_file, record)


def _job_id(disk: DiskRecord) -> str:
    assert disk.overlay_node is not None
    return f"{disk.overlay_node.removesuffix('-fmt')}-commit"


def _job_never_created(disk: DiskRecord, jobs: _JobsSent, existing: set[str] | None) -> bool:
    """Whether QEMU certainly never created ``disk``'s commit job (so nothing was written into
    its original): its ``block-commit`` was never sent or was refused, or it was sent without an
    answer and QEMU, asked after, has no such job. Unknown (QEMU did not answer): False."""
    if disk.name not in jobs.sent:
        return True
    if disk.name in jobs.accepted or existing is None:
        return False
    return _job_id(disk) not in existing
