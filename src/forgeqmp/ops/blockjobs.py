"""The block-job steps more than one operation takes, over an operation's
:class:`~forgeqmp.ops.context.Context`: running a job to its end, dropping one, committing an
overlay back (an undone enable), the pivot that switches a disk from its overlay back to its
original with the guest paused for milliseconds, and removing the overlay's nodes and restoring
the original's block options afterwards. The QMP each sends is planned in
:mod:`forgeqmp.core.plans`."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from forgeqmp.core.blockopts import BlockOptions, options_restored, reopen_command
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.commit import DiskCommit, attached_nodes, remove_overlay_nodes
from forgeqmp.core.plans.common import (
    CONT,
    QUERY_BLOCK,
    QUERY_JOBS,
    QUERY_NAMED_BLOCK_NODES,
    STOP,
    find_job,
    job_cancel,
    job_complete,
    job_dismiss,
)
from forgeqmp.core.record import DiskRecord, SessionRecord
from forgeqmp.core.steps import CommitStep, Pivoting
from forgeqmp.errors import (
    ForgeError,
    ForgeFailed,
    QMPCommandError,
    QMPError,
)
from forgeqmp.ops.context import _UNDO_TIMEOUT, Context

# The logger names are part of the documented interface (docs/embedding.md, "Logs"): these steps
# log under the name they had when they were part of the shared driver base.
log = logging.getLogger("forgeqmp.driver_base")

__all__ = ["BlockJobs"]


class BlockJobs:
    """The block-job steps of one operation, over its context."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def run_job(self, command: Command, job_id: str, what: str, timeout: float) -> None:
        """Run a job-creating command to its conclusion, check its error, dismiss it."""
        with self.ctx.conn.subscribe(
            "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
        ) as sub:
            await self.ctx.send(command)
            await sub.wait(lambda ev: ev["data"]["status"] == "concluded", timeout, what)
        jobs = await self.ctx.send(QUERY_JOBS)
        error = (find_job(jobs, job_id) or {}).get("error")
        await self.ctx.send(job_dismiss(job_id))
        if error:
            raise ForgeFailed(f"{what} failed: {error}")

    async def drop_job(self, job_id: str) -> None:
        jobs = await self.ctx.send(QUERY_JOBS)
        job = find_job(jobs, job_id)
        if job is None:
            return
        if job["status"] != "concluded":
            with self.ctx.conn.subscribe(
                "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
            ) as sub:
                with contextlib.suppress(QMPCommandError):
                    await self.ctx.send(job_cancel(job_id))
                await sub.wait(
                    lambda ev: ev["data"]["status"] == "concluded", _UNDO_TIMEOUT, "job end"
                )
        await self.ctx.send(job_dismiss(job_id))

    async def commit_back(
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
        conn = self.ctx.conn
        job = DiskCommit(
            disk=disk, qdev=qdev, top_node=top_node, base_node=base_node, job_id=job_id
        )
        with conn.subscribe(
            "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
        ) as sub:
            await self.ctx.send(job.start())
            await sub.wait(
                lambda e: e["data"]["status"] in ("ready", "concluded"),
                _UNDO_TIMEOUT,
                "commit ready",
            )

        def left_overlay(record: SessionRecord) -> SessionRecord:
            return record.evolve_disk(disk, overlay_node=None, overlay_file_node=None)

        await self.pivot(disk, qdev, base_node, job_id, left_overlay, mark_step=False)

    async def pivot(
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
        conn = self.ctx.conn
        async with lock if lock is not None else contextlib.nullcontext():
            with conn.subscribe("STOP", "RESUME") as runstate_events:
                pausing = await self.ctx.runstate() == "running"
                if pausing:
                    await self.ctx.flush_before_pause()
                # From the pause to the resume, nothing from outside (the caller's deadline, a
                # cancellation) interrupts the switch: it is milliseconds, and cut short it
                # would leave the guest paused. It is bounded by its own deadline.
                with anyio.CancelScope(shield=True), anyio.fail_after(_UNDO_TIMEOUT):
                    await self._switch(
                        disk, qdev, base_node, job_id, update, pausing, mark_step, operation
                    )
                await self.restore_after_pivot(disk)
                return self.ctx.pause_ms(runstate_events.history) if pausing else None

    async def _switch(
        self,
        disk: str,
        qdev: str,
        base_node: str,
        job_id: str,
        update: Callable[[SessionRecord], SessionRecord],
        pausing: bool,
        mark_step: bool,
        operation: str,
    ) -> None:
        """The pivot's switch: pause the guest (``pausing``), complete the job, check the disk
        is on ``base_node``, record it, and resume the guest whatever happened."""
        conn = self.ctx.conn
        resumed = False
        if pausing:
            # On disk before the pause: a recover after a kill anywhere from here to the
            # resume below knows the pause is ours, and resumes the guest.
            marks: dict[str, Any] = {"step": Pivoting(disk)} if mark_step else {}
            self.ctx.save(self.ctx.current(), paused_by_forgeqmp=True, **marks)
        try:
            if pausing:
                await self.ctx.send(STOP)
                self.ctx.crash_point(operation, CommitStep.PIVOTING)
            with conn.subscribe(
                "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == job_id
            ) as sub:
                jobs = await self.ctx.send(QUERY_JOBS)
                status = (find_job(jobs, job_id) or {}).get("status")
                if status is None:
                    raise ForgeFailed(f"the commit job {job_id} of disk {disk} disappeared")
                if status == "ready":
                    await self.complete_job(job_id)
                elif status not in ("pending", "waiting", "aborting", "concluded"):
                    raise ForgeFailed(f"the commit job {job_id} is {status}, not ready")
                if status != "concluded":
                    await sub.wait(
                        lambda e: e["data"]["status"] == "concluded",
                        _UNDO_TIMEOUT,
                        f"the commit of {disk} to end",
                    )
            jobs = await self.ctx.send(QUERY_JOBS)
            error = (find_job(jobs, job_id) or {}).get("error")
            await self.ctx.send(job_dismiss(job_id))
            if error:
                raise ForgeFailed(f"committing disk {disk} failed: {error}")
            attached = attached_nodes(await self.ctx.send(QUERY_BLOCK))
            if attached.get(qdev) != base_node:
                raise ForgeFailed(
                    f"after its commit, disk {disk} is on node {attached.get(qdev)!r}, "
                    f"not its original {base_node!r}"
                )
            self.ctx.crash_point(operation, CommitStep.PIVOTED)
            changes: dict[str, Any] = {"step": CommitStep.COMMITTING} if mark_step else {}
            self.ctx.save(update(self.ctx.current()), **changes)
            self.ctx.crash_point(operation, CommitStep.DISK_RECORDED)
        finally:
            if pausing:
                # Its own shield and deadline: the switch's deadline may be what ended it.
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(_UNDO_TIMEOUT),
                    contextlib.suppress(QMPError),
                ):
                    await self.ctx.send(CONT)  # also when the STOP never reached QEMU
                    resumed = True
            if resumed or not pausing:
                with contextlib.suppress(ForgeError, OSError):
                    record = self.ctx.current()
                    done: dict[str, Any] = {"paused_by_forgeqmp": False} if resumed else {}
                    if mark_step and record.step == Pivoting(disk):
                        done["step"] = CommitStep.COMMITTING
                    if any(getattr(record, k) != v for k, v in done.items()):
                        self.ctx.save(record, **done)

    async def complete_job(self, job_id: str) -> None:
        """``job-complete``, retried while QEMU says the job is not ready yet (transient)."""
        while True:
            try:
                await self.ctx.send(job_complete(job_id))
                return
            except QMPCommandError as exc:
                if "cannot accept command verb" not in exc.desc and "not ready" not in exc.desc:
                    raise
            await anyio.sleep(0.05)

    async def drop_overlay(self, disk: DiskRecord) -> None:
        """Remove a merged disk's overlay nodes from the graph and its file from the disk."""
        for command in remove_overlay_nodes(disk):
            try:
                await self.ctx.send(command)
            except QMPCommandError as exc:
                if "not found" not in exc.desc.lower() and "cannot find" not in exc.desc.lower():
                    raise
        if disk.overlay_file is not None:
            # Freeing a GiB of extents takes the file system 0.2-0.3 s here: in a worker
            # thread, so that the other disks' steps (and their switches) do not wait for it.
            await anyio.to_thread.run_sync(_unlink_if_present, disk.overlay_file)

    async def restore_after_pivot(self, name: str) -> None:
        """After a disk went back onto its original (commit, an undone enable, recover): give
        the original its options back, or record a warning that says it could not. Never
        raises: the disk's data is where the record says either way."""
        try:
            disk = self.ctx.current().disk(name)
            warning = await self.restore_options(disk)
            if warning is not None:
                log.warning("%s", warning)
                current = self.ctx.current()
                self.ctx.save(current, warnings=(*current.warnings, warning))
        except (ForgeError, OSError) as exc:
            log.warning("the options of disk %s were not checked after its pivot: %s", name, exc)

    async def restore_options(self, disk: DiskRecord) -> str | None:
        """Put back the original node's block options that QEMU reset when it was snapshotted
        and pivoted back (``detect-zeroes`` of a legacy ``-drive``; see :mod:`forgeqmp.core.blockopts`).
        Returns a warning when they could not be restored (the data is merged either way)."""
        wanted = BlockOptions.from_json(disk.options)
        if wanted is None:
            return None
        node = disk.device_node
        nodes = await self.ctx.send(QUERY_NAMED_BLOCK_NODES)
        now = next((n for n in nodes if n.get("node-name") == node), None)
        if now is None or options_restored(wanted, now):
            return None
        problem = "this QEMU has no human-monitor-command to reopen it with"
        reopen = reopen_command(node, wanted)
        if reopen is None:
            problem = f"{node!r} cannot be named in a reopen command"
        elif reopen.name in (await self.ctx.features()).commands:
            try:
                reply = await self.ctx.send(reopen)
            except QMPCommandError as exc:
                reply = exc.desc
            nodes = await self.ctx.send(QUERY_NAMED_BLOCK_NODES)
            now = next((n for n in nodes if n.get("node-name") == node), now)
            if options_restored(wanted, now):
                return None
            problem = f"QEMU did not reopen it: {str(reply).strip() or 'no reason given'}"
        return (
            f"disk {disk.name} is merged, but its options differ from before enable "
            f"(wanted detect-zeroes={wanted.detect_zeroes}, cache.direct={wanted.cache_direct}; "
            f"{problem}); restart the VM to get its configured options back"
        )


def _unlink_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
