"""The QMP commands more than one plan sends, as values (sans-IO): the read-only queries, the
guest's run state, block jobs and nodes, and what was passed to QEMU for a migration.

The queries are named constants too, so that every command forgeqmp sends is data a reader finds
here or in the plan of its step (:mod:`forgeqmp.core.plans.enable`, ``commit``, ``discard``,
``recover``), and the operations only execute them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from forgeqmp.core.plans.command import Command

__all__ = [
    "CONT",
    "MIGRATE_CANCEL",
    "QUERY_BLOCK",
    "QUERY_FDSETS",
    "QUERY_JOBS",
    "QUERY_MACHINE_TYPE",
    "QUERY_MIGRATE",
    "QUERY_MIGRATE_CAPABILITIES",
    "QUERY_MIGRATE_PARAMETERS",
    "QUERY_NAMED_BLOCK_NODES",
    "QUERY_STATUS",
    "QUIT",
    "STOP",
    "blockdev_del",
    "close_fd",
    "continue_from_pre_switchover",
    "find_job",
    "job_cancel",
    "job_complete",
    "job_dismiss",
    "job_resume",
    "qom_get",
    "remove_fdset",
]

# --- read-only queries ---------------------------------------------------------------------------

#: The disk devices and the node attached to each.
QUERY_BLOCK: Final = Command("query-block")
#: Every named node of the block graph.
QUERY_NAMED_BLOCK_NODES: Final = Command("query-named-block-nodes")
#: The block jobs (id, type, status, progress, error).
QUERY_JOBS: Final = Command("query-jobs")


def find_job(jobs: Iterable[Mapping[str, Any]], job_id: str) -> Mapping[str, Any] | None:
    """The entry of ``job_id`` in a :data:`QUERY_JOBS` answer, None when QEMU has no such job."""
    return next((job for job in jobs if job["id"] == job_id), None)


#: The runstate (``running``, ``paused``, ``finish-migrate``...).
QUERY_STATUS: Final = Command("query-status")
#: The migration's status (and its error, once failed).
QUERY_MIGRATE: Final = Command("query-migrate")
#: The migration capabilities and whether each is on.
QUERY_MIGRATE_CAPABILITIES: Final = Command("query-migrate-capabilities")
#: The migration parameters.
QUERY_MIGRATE_PARAMETERS: Final = Command("query-migrate-parameters")
#: The fdsets QEMU holds (and the ``opaque`` text of each member).
QUERY_FDSETS: Final = Command("query-fdsets")


def qom_get(path: str, prop: str) -> Command:
    """Read the QOM property ``prop`` of the object at ``path``."""
    return Command("qom-get", {"path": path, "property": prop})


#: The machine type QEMU runs (``pc-q35-10.0-machine``...).
QUERY_MACHINE_TYPE: Final = qom_get("/machine", "type")

# --- the guest's run state -----------------------------------------------------------------------

#: Pause the guest.
STOP: Final = Command("stop")
#: Resume the guest.
CONT: Final = Command("cont")
#: Stop QEMU.
QUIT: Final = Command("quit")

# --- migration -----------------------------------------------------------------------------------

#: Cancel the running migration.
MIGRATE_CANCEL: Final = Command("migrate_cancel")


def continue_from_pre_switchover() -> Command:
    """Let a migration paused at ``pause-before-switchover`` go on."""
    return Command("migrate-continue", {"state": "pre-switchover"})


def remove_fdset(fdset_id: int) -> Command:
    """Close every descriptor of the fdset ``fdset_id`` in QEMU (the memory file passed by
    ``add-fd``)."""
    return Command("remove-fd", {"fdset-id": fdset_id})


def close_fd(name: str) -> Command:
    """Close the descriptor passed by ``getfd`` as ``name``."""
    return Command("closefd", {"fdname": name})


# --- block jobs and nodes ------------------------------------------------------------------------


def job_complete(job_id: str) -> Command:
    """Complete a ready job (a commit of the active layer: switch the device to the base)."""
    return Command("job-complete", {"id": job_id})


def job_dismiss(job_id: str) -> Command:
    """Remove a concluded job (jobs run with ``auto-dismiss: false`` to keep their error)."""
    return Command("job-dismiss", {"id": job_id})


def job_cancel(job_id: str) -> Command:
    """Cancel a job."""
    return Command("job-cancel", {"id": job_id})


def job_resume(job_id: str) -> Command:
    """Resume a paused job."""
    return Command("job-resume", {"id": job_id})


def blockdev_del(node: str) -> Command:
    """Remove the node ``node`` from the block graph (nothing may use it)."""
    return Command("blockdev-del", {"node-name": node})
