"""The write bound of a live commit that does not converge, over an operation's
:class:`~forgeqmp.ops.context.Context`: watch a disk's commit job while it copies, bound the
guest's writes on that disk when the job would not become ready in time, and set the platform's
throttle back afterwards. What is decided, and why it makes the commit finish, is in
:mod:`forgeqmp.core.plans.converge`; every step is recorded before it is taken (the disk's
``throttle`` field) and is a crash point (:class:`~forgeqmp.core.steps.ThrottleStep`)."""

from __future__ import annotations

import logging

import anyio

from forgeqmp.core import names
from forgeqmp.core.plans.common import QUERY_BLOCK, QUERY_JOBS, find_job
from forgeqmp.core.plans.converge import (
    JobSample,
    bounded_limits,
    copy_rate,
    dirty_rate,
    first_bound,
    needs_bound,
    platform_limits,
    set_throttle,
    tighter,
)
from forgeqmp.core.record import DiskRecord
from forgeqmp.core.steps import ThrottleStep
from forgeqmp.errors import ForgeFailed
from forgeqmp.ops.context import PROGRESS_INTERVAL, Context

log = logging.getLogger("forgeqmp.commit_driver")

__all__ = ["WriteBound"]


class WriteBound:
    """The guest-write bounds of one commit's disks, over its context; ``lock`` serialises the
    record writes with the commit's other per-disk tasks."""

    def __init__(self, ctx: Context, lock: anyio.Lock, operation: str = "commit") -> None:
        self.ctx = ctx
        self.lock = lock
        self.operation = operation

    async def watch(self, disk: DiskRecord, job_id: str, deadline: float) -> None:
        """Sample ``job_id`` until cancelled (the caller does, once the job is ready), bounding
        the guest's writes to ``disk`` whenever the job would not become ready in time.
        ``deadline``: :func:`anyio.current_time` by which the job must be ready."""
        samples: list[JobSample] = []
        bound: tuple[int, int] | None = None
        while True:
            listed = await self.ctx.send(QUERY_JOBS)
            job = find_job(listed, job_id)
            if job is not None and job["status"] == "running":
                now = anyio.current_time()
                samples.append(
                    JobSample(now, int(job["current-progress"]), int(job["total-progress"]))
                )
                if needs_bound(samples, deadline - now, bound):
                    rate = copy_rate(samples) or 0.0
                    fresh = first_bound(rate) if bound is None else tighter(bound)
                    log.info(
                        "commit: disk %s does not converge (copies %.0f B/s, the guest dirties "
                        "%.0f B/s, %d B left): bounding its writes to %d B/s, %d writes/s",
                        disk.name,
                        rate,
                        dirty_rate(samples) or 0.0,
                        samples[-1].remaining,
                        *fresh,
                    )
                    await self.apply(disk, fresh)
                    bound = fresh
                    samples = samples[-1:]  # a new window, under the new bound
            await anyio.sleep(PROGRESS_INTERVAL)

    async def apply(self, disk: DiskRecord, bound: tuple[int, int]) -> None:
        """Record the platform's throttle of ``disk`` (once), then bound its guest writes."""
        async with self.lock:
            record = self.ctx.current()
            platform = record.disk(disk.name).throttle
            if platform is None:
                inserted = next(
                    (
                        b.get("inserted") or {}
                        for b in await self.ctx.send(QUERY_BLOCK)
                        if b.get("qdev") == disk.qdev
                    ),
                    None,
                )
                if inserted is None:
                    raise ForgeFailed(f"the device {disk.qdev} of disk {disk.name} disappeared")
                platform = platform_limits(inserted)
                self.ctx.save(record.evolve_disk(disk.name, throttle=platform))
                self.ctx.crash_point(self.operation, ThrottleStep.RECORDED)
            index = [d.name for d in record.disks].index(disk.name)
            group = names.throttle_group(record.session_id, index)
            await self.ctx.send(set_throttle(disk.qdev, bounded_limits(platform, bound, group)))
            self.ctx.crash_point(self.operation, ThrottleStep.APPLIED)

    async def restore(self, name: str) -> None:
        """Set the platform's throttle of disk ``name`` back, if forgeqmp recorded it (and so may
        have bounded it), then clear the record of it."""
        async with self.lock:
            disk = self.ctx.current().disk(name)
            if disk.throttle is None:
                return
            await self.ctx.send(set_throttle(disk.qdev, disk.throttle))
            self.ctx.crash_point(self.operation, ThrottleStep.RESTORED)
            self.ctx.save(self.ctx.current().evolve_disk(name, throttle=None))
            log.info("commit: disk %s: its guest writes are no longer bounded", name)
