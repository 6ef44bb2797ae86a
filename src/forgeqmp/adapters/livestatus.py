"""What ``status`` adds to the session record: the live view of QEMU and of the overlays.

- ``qemu``: QEMU's runstate (``running``, ``paused``, ``io-error``...), ``unreachable`` when
  nothing answers on the socket, ``busy`` while another forgeqmp process works on the instance
  (QEMU serves one QMP client at a time: status never makes that process wait or fail).
- Per disk: the overlay's size on disk (allocated bytes), the free space left on its file
  system, and the device's ``io_status`` (``ok``, ``failed``, ``nospace``).
- Per disk with a commit job left running by a stopped commit: ``commit_job``, the job's id,
  status and bytes done/total as QEMU reports them (``status`` and ``done`` null when QEMU was
  not asked or has no such job).
- ``qemu_advice``: what to do when QEMU paused the guest on an I/O error; an overlay's file
  system that fills up does that (the disks' default ``werror=enospc``).

:func:`advice` is pure; :func:`observe` gathers its inputs (``stat``/``statvfs`` and two QMP
queries on a short-lived connection).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import anyio
import attrs

from forgeqmp.adapters.preflight import free_space
from forgeqmp.adapters.qmp import connect as qmp_connect
from forgeqmp.core.preflight import OVERLAY_MINIMUM
from forgeqmp.core.progress import JobProgress
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import State
from forgeqmp.errors import QMPError

log = logging.getLogger(__name__)

__all__ = ["LiveStatus", "OverlayUsage", "advice", "observe", "overlay_usage"]

#: How long status waits for QEMU's greeting and each reply (s): a silent QEMU is "unreachable".
QUERY_TIMEOUT = 3.0

MiB = 1 << 20


@attrs.frozen
class OverlayUsage:
    """An overlay file's allocated size and the free space of its file system (None: unknown)."""

    size: int | None
    free: int | None


@attrs.frozen
class LiveStatus:
    """The live part of ``status``."""

    qemu: str
    #: qdev (as query-block reports it) → the device's io-status ("ok", "failed", "nospace").
    io_status: Mapping[str, str]
    #: disk name → usage of its overlay, for the overlays that exist.
    overlays: Mapping[str, OverlayUsage]
    #: job id → its progress, for every block job QEMU runs (empty: QEMU was not asked).
    jobs: Mapping[str, JobProgress] = attrs.field(factory=dict)
    #: QEMU's ``query-named-block-nodes`` (None: QEMU was not asked), where a session of any
    #: state dir shows (:func:`forgeqmp.adapters.recordstore.graph_sessions`).
    block_nodes: tuple[Mapping[str, Any], ...] | None = None

    def advice(self, record: SessionRecord | None) -> str | None:
        """What to do about QEMU's state (see :func:`advice`)."""
        return advice(record, self.qemu, self.io_status, self.overlays)

    def update(self, status: dict[str, Any], record: SessionRecord | None) -> str:
        """Add the live keys to a ``status`` object; returns the lines for people (none when
        there is no session and nothing to advise)."""
        status["qemu"] = self.qemu
        status["qemu_advice"] = self.advice(record)
        lines = [f"  qemu: {self.qemu}"]
        qdevs = {d.name: d.qdev for d in record.disks} if record is not None else {}
        left = (
            {d.name: d.commit_job for d in record.disks if d.overlay_node and d.commit_job}
            if record is not None
            else {}
        )
        for disk in status.get("disks", []):
            name = str(disk.get("name"))
            job_id = left.get(name)
            job = self.jobs.get(job_id) if job_id is not None else None
            disk["commit_job"] = (
                None
                if job_id is None
                else {
                    "id": job_id,
                    "status": job.status if job is not None else None,
                    "done": job.done if job is not None else None,
                    "total": job.total if job is not None else None,
                }
            )
            if job is not None:
                lines.append(f"  commit job of {name}: {job.status}, {job.describe()} merged")
            elif job_id is not None:
                lines.append(f"  commit job of {name}: {job_id} (not seen in QEMU)")
            usage = self.overlays.get(name)
            disk["overlay_bytes"] = usage.size if usage is not None else None
            disk["overlay_free_bytes"] = usage.free if usage is not None else None
            disk["io_status"] = self.io_status.get(qdevs.get(name, ""))
            if usage is not None and usage.size is not None:
                free = (
                    f", {_mib(usage.free)} free on its file system"
                    if usage.free is not None
                    else ""
                )
                lines.append(f"  overlay of {disk.get('name')}: {_mib(usage.size)} on disk{free}")
        if status["qemu_advice"]:
            lines.append(f"  attention: {status['qemu_advice']}")
        elif record is None:
            return ""
        return "\n".join(lines)


def overlay_usage(path: str) -> OverlayUsage | None:
    """The usage of the overlay at ``path``, or None when there is no such file."""
    try:
        size = os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.info("cannot stat %s: %s", path, exc)
        size = None
    try:
        free: int | None = free_space(os.path.dirname(path)).available
    except OSError as exc:
        log.info("cannot statvfs the directory of %s: %s", path, exc)
        free = None
    return OverlayUsage(size, free)


def advice(
    record: SessionRecord | None,
    qemu: str,
    io_status: Mapping[str, str],
    overlays: Mapping[str, OverlayUsage],
) -> str | None:
    """What to do about QEMU's runstate during a session, or None when nothing is needed.

    ``io-error``: QEMU paused the guest because a disk write failed; when the disk's overlay
    lives on a full file system (QEMU says ``nospace``, or the overlay's free space is below the
    minimum), that is the cause, and the two ways out are discard (back to the moment of enable)
    or freeing space and resuming with QMP ``cont``. A low-space warning is given while the
    guest still runs.
    """
    unfinished = record is not None and record.state in (
        State.ACTIVE,
        State.COMMITTING,
        State.DISCARDING,
    )
    full = []
    if record is not None:
        for disk in record.disks:
            usage = overlays.get(disk.name)
            low = usage is not None and usage.free is not None and usage.free < OVERLAY_MINIMUM
            if io_status.get(disk.qdev) == "nospace" or (qemu == "io-error" and low):
                where = os.path.dirname(disk.overlay_file) if disk.overlay_file else "its directory"
                full.append(f"{disk.name} (overlay in {where})")
    if qemu == "io-error":
        if full and unfinished:
            return (
                "QEMU paused the guest (runstate io-error): a write to a forged disk found no "
                f"space on the file system of its overlay: {', '.join(full)}. Either discard the "
                "session ('forgeqmp discard': disks and memory go back to the moment of enable), "
                "or free space on that file system and resume the guest with QMP 'cont'; then "
                "commit or discard as planned"
            )
        return (
            "QEMU paused the guest (runstate io-error): a disk write failed. Look at the host's "
            "disk and free space, fix the cause, then resume the guest with QMP 'cont'"
        )
    if qemu == "running" and unfinished and record is not None and record.state is State.ACTIVE:
        low_disks = [
            f"{name} ({_mib(u.free)} free)"
            for name, u in overlays.items()
            if u.free is not None and u.free < OVERLAY_MINIMUM
        ]
        if low_disks:
            return (
                "little free space is left where these overlays grow: "
                + ", ".join(low_disks)
                + "; when it is gone QEMU pauses the guest (io-error). Free space there, or "
                "commit or discard the session soon"
            )
    return None


def observe(socket_path: str, record: SessionRecord | None, *, busy: bool | None) -> LiveStatus:
    """Look at QEMU and at the overlays now. ``busy``: another forgeqmp process holds the
    instance's lock (QEMU is then not asked). Never raises for an unreachable QEMU."""
    overlays: dict[str, OverlayUsage] = {}
    if record is not None:
        for disk in record.disks:
            if disk.overlay_file:
                usage = overlay_usage(disk.overlay_file)
                if usage is not None:
                    overlays[disk.name] = usage
    if busy:
        return LiveStatus("busy", {}, overlays)
    try:
        qemu, io_status, jobs, nodes = anyio.run(_query, socket_path, backend="asyncio")
    except QMPError as exc:
        log.info("status: QEMU not reachable on %s: %s", socket_path, exc)
        return LiveStatus("unreachable", {}, overlays)
    return LiveStatus(qemu, io_status, overlays, jobs, nodes)


async def _query(
    socket_path: str,
) -> tuple[str, dict[str, str], dict[str, JobProgress], tuple[Mapping[str, Any], ...]]:
    """What ``status`` asks QEMU, on one connection."""
    async with qmp_connect(
        socket_path, timeout=QUERY_TIMEOUT, command_timeout=QUERY_TIMEOUT
    ) as conn:
        runstate = str((await conn.execute("query-status"))["status"])
        blocks = await conn.execute("query-block")
        listed = await conn.execute("query-jobs")
        nodes = tuple(await conn.execute("query-named-block-nodes", {"flat": True}))
    io_status: dict[str, str] = {}
    for block in blocks:
        qdev, status = block.get("qdev"), block.get("io-status")
        if qdev and status:
            io_status[str(qdev)] = str(status)
    jobs = {str(j["id"]): JobProgress.from_job(j) for j in listed}
    return runstate, io_status, jobs, nodes


def _mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / MiB:.1f} MiB"
