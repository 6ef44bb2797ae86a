"""The QMP plan of commit: per disk, one ``block-commit`` job of the overlay into the original,
the pivot back onto the original, and the overlay's nodes removed (sans-IO).

The sequence of one disk (the QEMU recipe's; disks run in parallel):

1. ``block-commit`` with ``job-id``, ``device`` = the overlay (the active layer), ``base-node`` =
   the original's format node and ``auto-dismiss: false`` (so that the job's error is kept);
   wait for the job to be ``ready`` (in sync);
2. the pivot, with the guest paused for milliseconds (:data:`~forgeqmp.core.plans.common.STOP`
   ... :data:`~forgeqmp.core.plans.common.CONT`): ``job-complete`` (the device switches to the
   original), wait ``concluded``, read the job's error, ``job-dismiss``;
3. ``blockdev-del`` of the overlay's format node, then of its file node; the file is deleted.

The same job and pivot move a disk back onto its original when an enable is undone or recover
finishes a commit (:func:`disk_commit` from a record, or :class:`DiskCommit` from its nodes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from forgeqmp.core import names
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.common import blockdev_del, job_cancel, job_complete, job_dismiss
from forgeqmp.core.record import DiskRecord, SessionRecord

__all__ = [
    "CommitPlan",
    "DiskCommit",
    "attached_nodes",
    "disk_commit",
    "is_commit_job",
    "plan_commit",
    "remove_overlay_nodes",
]


def is_commit_job(job: Mapping[str, Any]) -> bool:
    """Whether a ``query-jobs`` entry is a commit job of forgeqmp's (by type and id)."""
    return job.get("type") == "commit" and str(job.get("id", "")).endswith(names.COMMIT_JOB_SUFFIX)


@attrs.frozen
class DiskCommit:
    """The commit of one disk's top node into its base node: the job, and the pivot that
    completes it."""

    disk: str
    qdev: str
    top_node: str
    base_node: str
    job_id: str
    #: The job's copy speed limit (bytes/s); None: unlimited (what forgeqmp runs with; a test
    #: hook slows the copy with it).
    speed: int | None = None

    def start(self) -> Command:
        """Start the job; it stays until dismissed, so that its error can be read."""
        args: dict[str, Any] = {
            "job-id": self.job_id,
            "device": self.top_node,
            "base-node": self.base_node,
            "auto-dismiss": False,
        }
        if self.speed is not None:
            args["speed"] = self.speed
        return Command("block-commit", args)

    def complete(self) -> Command:
        """The pivot: the device switches from the top node to the base node."""
        return job_complete(self.job_id)

    def dismiss(self) -> Command:
        """Remove the concluded job."""
        return job_dismiss(self.job_id)

    def cancel(self) -> Command:
        """Stop the job before it completes (the top node keeps every write)."""
        return job_cancel(self.job_id)


def remove_overlay_nodes(disk: DiskRecord) -> tuple[Command, ...]:
    """``blockdev-del`` of the overlay's format node, then of its file node (those recorded)."""
    return tuple(
        blockdev_del(node)
        for node in (disk.overlay_node, disk.overlay_file_node)
        if node is not None
    )


def disk_commit(disk: DiskRecord, speed: int | None = None) -> DiskCommit:
    """The commit of ``disk``'s overlay into its original, from its record (``speed``: the
    job's copy limit in bytes/s, None: unlimited).

    :raises ValueError: the disk has no overlay (nothing to commit).
    """
    if disk.overlay_node is None:
        raise ValueError(f"disk {disk.name} has no overlay to commit")
    return DiskCommit(
        disk=disk.name,
        qdev=disk.qdev,
        top_node=disk.overlay_node,
        base_node=disk.device_node,
        job_id=names.commit_job(disk.overlay_node),
        speed=speed,
    )


def attached_nodes(query_block: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """qdev path → the node attached to it now (from ``query-block``)."""
    return {
        str(b.get("qdev")): str(b["inserted"]["node-name"])
        for b in query_block
        if b.get("qdev") and b.get("inserted")
    }


@attrs.frozen
class CommitPlan:
    """The disks a live commit merges: those still running on their overlay."""

    disks: tuple[DiskCommit, ...]

    def starts(self) -> tuple[Command, ...]:
        """Every disk's ``block-commit`` (sent in parallel)."""
        return tuple(d.start() for d in self.disks)


def plan_commit(record: SessionRecord, query_block: Sequence[Mapping[str, Any]]) -> CommitPlan:
    """The commit of every recorded disk that ``query-block`` shows on its overlay (a disk
    already back on its original, after an interrupted commit, has nothing left to merge)."""
    attached = attached_nodes(query_block)
    return CommitPlan(
        tuple(
            disk_commit(d)
            for d in record.disks
            if d.overlay_node is not None and attached.get(d.qdev) == d.overlay_node
        )
    )
