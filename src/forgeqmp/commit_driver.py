"""Commit: merge every forged disk's overlay back into its original, live and disks in parallel
(``block-commit``, each disk switched back with the guest paused for milliseconds), or offline
with ``qemu-img commit`` while QEMU is not running.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import anyio
import anyio.to_thread

from forgeqmp.driver_base import (
    _UNDO_TIMEOUT,
    DEFAULT_COMMIT_TIMEOUT,
    PROGRESS_INTERVAL,
    DriverBase,
    _attached_nodes,
    _check_timeout,
    _now,
    _overlay_gone,
    status_of,
)
from forgeqmp.errors import (
    ForgeError,
    ForgeFailed,
    PrerequisiteError,
)
from forgeqmp.power import (
    commit_overlay,
    find_qemu_img,
)
from forgeqmp.progress import ProgressCallback, ProgressEvent
from forgeqmp.record import (
    DiskRecord,
    SessionRecord,
)
from forgeqmp.statedir import InstanceLock
from forgeqmp.states import Event, State

__all__ = ["CommitDriver"]


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
            status = status_of(record).apply(Event.COMMIT)
            self.store.remove_temp_files()  # a killed operation's: never a file of another
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
