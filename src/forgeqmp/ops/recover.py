"""The recover driver: observe QEMU and the files, run the plan :func:`forgeqmp.core.reconcile.reconcile`
made, save the record it says is true, and observe again until there is nothing left to do.

Every decision is in :mod:`forgeqmp.core.reconcile`; this module only does the I/O. An action that fails
is not retried blindly: the driver observes again and lets ``reconcile`` decide from what is now
true (part of the plan may have happened). After a few rounds without reaching a fixed point it
records the session FAILED with what went wrong, which is still a true state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs

from forgeqmp.adapters import memhash
from forgeqmp.adapters.launcher import Launcher, detached_launcher
from forgeqmp.adapters.qemuimg import commit_overlay, find_qemu_img
from forgeqmp.adapters.qemuproc import qemu_down
from forgeqmp.adapters.statedir import LOCK_FILE, InstanceLock, StateDir
from forgeqmp.core.names import fdset_opaque
from forgeqmp.core.plans.common import (
    QUERY_BLOCK,
    QUERY_FDSETS,
    QUERY_JOBS,
    QUERY_MIGRATE,
    QUERY_MIGRATE_CAPABILITIES,
    QUERY_MIGRATE_PARAMETERS,
    QUERY_NAMED_BLOCK_NODES,
    QUERY_STATUS,
    find_job,
    job_resume,
)
from forgeqmp.core.progress import ProgressCallback, ProgressEvent
from forgeqmp.core.reconcile import (
    Action,
    CancelMigration,
    CloseFd,
    CommitBack,
    CommitOffline,
    DeleteFile,
    DeviceView,
    DropJob,
    FinishDiscard,
    FinishJob,
    HashMemory,
    JobView,
    Observation,
    QemuView,
    RecoveryPlan,
    RemoveFdset,
    RemoveNode,
    ResetMigration,
    RestoreThrottle,
    ResumeGuest,
    reconcile,
    stale_reason,
)
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import TERMINAL, WORKING, Event, State, next_state
from forgeqmp.errors import (
    ForgeError,
    ForgeFailed,
    IllegalTransition,
    QEMUUnreachable,
    QMPDisconnected,
)
from forgeqmp.ops.blockjobs import BlockJobs
from forgeqmp.ops.context import Context, _check_timeout, _now, send
from forgeqmp.ops.converge import WriteBound
from forgeqmp.ops.discard import Discard

__all__ = [
    "DEFAULT_RECOVER_TIMEOUT",
    "lock_held",
    "observe",
    "recorded_files",
    "run_recover",
    "stale",
]

log = logging.getLogger("forgeqmp.recover_driver")

#: Seconds recover may take in all (finishing a commit job or a discard dominates).
DEFAULT_RECOVER_TIMEOUT = 600.0
#: Observe-plan-act rounds before recover gives up and records what stands in the way.
_MAX_ROUNDS = 4


def recorded_files(record: SessionRecord) -> frozenset[str]:
    """Every file the session created: its overlays and its memory file (the only files recover
    may delete)."""
    paths = {d.overlay_file for d in record.disks if d.overlay_file is not None}
    if record.memory is not None:
        paths.add(record.memory.path)
    return frozenset(paths)


# --- observing -----------------------------------------------------------------------------------


def _file_sizes(record: SessionRecord) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in sorted(recorded_files(record)):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):  # a symlink or anything else there is not ours
            sizes[path] = st.st_size
    return sizes


async def _ensure_connection(ctx: Context, record: SessionRecord) -> bool:
    """Connect to whatever QEMU runs for the instance now; False if none runs.

    :raises QEMUUnreachable: a QEMU may run but does not answer (never treated as stopped).
    """
    conn = ctx.conn
    if conn.connected:
        try:
            await send(conn, QUERY_STATUS)
            return True
        except QMPDisconnected:
            pass
    try:
        await conn.reconnect()
        return True
    except QEMUUnreachable:
        if qemu_down(conn.socket_path, record):
            return False
        raise


async def observe(ctx: Context, record: SessionRecord) -> Observation:
    """What is true now: the QEMU behind the instance's socket (if any) and the session's files."""
    files = _file_sizes(record)
    if not await _ensure_connection(ctx, record):
        return Observation(qemu=None, files=files)
    conn = ctx.conn
    status = await send(conn, QUERY_STATUS)
    blocks = await send(conn, QUERY_BLOCK)
    wanted = {d.qdev for d in record.disks}
    devices: dict[str, DeviceView] = {}
    for entry in blocks:
        qdev = str(entry.get("qdev") or "")
        if qdev not in wanted:
            continue
        inserted = entry.get("inserted")
        devices[qdev] = (
            DeviceView(str(inserted["node-name"]), str(inserted.get("file")))
            if inserted
            else DeviceView()
        )
    nodes = frozenset(
        str(n["node-name"]) for n in await send(conn, QUERY_NAMED_BLOCK_NODES) if n.get("node-name")
    )
    jobs = tuple(
        JobView(str(j["id"]), str(j["type"]), str(j["status"]), j.get("error"))
        for j in await send(conn, QUERY_JOBS)
    )
    migration = str((await send(conn, QUERY_MIGRATE)).get("status") or "none")
    opaque = fdset_opaque(record.session_id)
    fdsets = tuple(
        int(s["fdset-id"])
        for s in await send(conn, QUERY_FDSETS)
        if any(fd.get("opaque") == opaque for fd in s.get("fds", []))
    )
    capabilities = {
        str(c["capability"]): bool(c["state"]) for c in await send(conn, QUERY_MIGRATE_CAPABILITIES)
    }
    parameters = dict(await send(conn, QUERY_MIGRATE_PARAMETERS))
    return Observation(
        qemu=QemuView(
            pid=conn.peer.pid,
            runstate=str(status["status"]),
            devices=devices,
            nodes=nodes,
            jobs=jobs,
            migration=migration,
            fdsets=fdsets,
            capabilities=capabilities,
            parameters={
                k: parameters[k]
                for k in ("downtime-limit", "max-bandwidth", "multifd-channels")
                if k in parameters
            },
        ),
        files=files,
    )


# --- acting --------------------------------------------------------------------------------------


class _ActionFailed(Exception):
    def __init__(self, action: Action, cause: BaseException) -> None:
        self.action = action
        self.cause = cause
        super().__init__(f"{action.describe()}: {cause}")


async def _finish_job(ctx: Context, _record: SessionRecord, action: FinishJob) -> None:
    conn = ctx.conn
    record = ctx.current()
    disk = record.disk(action.disk)
    bounds = WriteBound(ctx, anyio.Lock(), operation="recover")
    with conn.subscribe(
        "JOB_STATUS_CHANGE", predicate=lambda ev: ev["data"]["id"] == action.job_id
    ) as sub:
        jobs = await ctx.send(QUERY_JOBS)
        status = (find_job(jobs, action.job_id) or {}).get("status")
        if status is None:
            return  # gone meanwhile: the next observation tells where the disk is
        if status == "paused":
            await ctx.send(job_resume(action.job_id))
        if status not in ("ready", "pending", "waiting", "aborting", "concluded"):
            async with anyio.create_task_group() as tg:
                # As commit does: a guest outwriting the copy would keep the job from being ready.
                deadline = anyio.current_effective_deadline()
                if deadline == float("inf"):
                    deadline = anyio.current_time() + DEFAULT_RECOVER_TIMEOUT
                tg.start_soon(bounds.watch, disk, action.job_id, deadline)
                await sub.wait(
                    lambda e: e["data"]["status"] in ("ready", "concluded"),
                    DEFAULT_RECOVER_TIMEOUT * 10,  # bounded by recover's deadline
                    f"the commit job {action.job_id} to be ready",
                )
                tg.cancel_scope.cancel()
    committing = record.state is not State.CREATING and record.failure_phase is not State.CREATING

    def update(current: SessionRecord) -> SessionRecord:
        if committing:
            return current.evolve_disk(
                disk.name, merged=True, overlay_node=None, overlay_file_node=None, commit_job=None
            )
        return current.evolve_disk(disk.name, overlay_node=None, overlay_file_node=None)

    await BlockJobs(ctx).pivot(
        disk.name,
        disk.qdev,
        disk.device_node,
        action.job_id,
        update,
        mark_step=committing,
        operation="recover",
    )
    await bounds.restore(disk.name)


async def _commit_offline(ctx: Context, _record: SessionRecord, action: CommitOffline) -> None:
    record = ctx.current()
    disk = record.disk(action.disk)
    try:
        empty = os.path.getsize(action.overlay_file) == 0
    except FileNotFoundError:
        return
    if not empty:  # an empty file was never formatted: it holds nothing to merge
        await commit_overlay(find_qemu_img(record), disk, record.qemu.env)
    ctx.save(ctx.current().evolve_disk(disk.name, overlay_node=None, overlay_file_node=None))


async def _hash_memory(path: str) -> tuple[str, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return await anyio.to_thread.run_sync(memhash.hash_fd, fd)  # not fsynced: as enable
    finally:
        os.close(fd)


async def _send_commands(
    ctx: Context,
    _record: SessionRecord,
    action: RemoveNode | ResetMigration | RemoveFdset | CloseFd | RestoreThrottle,
) -> None:
    for command in action.commands():
        await ctx.send(command)


async def _cancel_migration(ctx: Context, _record: SessionRecord, _action: CancelMigration) -> None:
    await ctx.cancel_migration()


async def _drop_job(ctx: Context, _record: SessionRecord, action: DropJob) -> None:
    await BlockJobs(ctx).drop_job(action.job_id)


async def _commit_back(ctx: Context, record: SessionRecord, action: CommitBack) -> None:
    disk = record.disk(action.disk)
    await BlockJobs(ctx).commit_back(
        disk.name, disk.qdev, action.top_node, action.base_node, action.job_id
    )


async def _resume_guest(ctx: Context, _record: SessionRecord, _action: ResumeGuest) -> None:
    await ctx.resume_if_stopped()


async def _delete_file(_ctx: Context, record: SessionRecord, action: DeleteFile) -> None:
    if action.path not in recorded_files(record):  # reconcile never asks; never do it
        raise ForgeFailed(f"refusing to delete {action.path}: the session did not create it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(action.path)
    with contextlib.suppress(OSError):
        _fsync_dir(os.path.dirname(action.path))


async def _fingerprint(
    _ctx: Context, _record: SessionRecord, action: HashMemory
) -> tuple[str, int]:
    return await _hash_memory(action.path)


_Runner = Callable[[Context, SessionRecord, Any], Awaitable[Any]]

#: How each action type runs (the one dispatch; each type's order is its ``order``).
#: FinishDiscard ends the round and is run by the loop itself.
_RUNNERS: Mapping[type, _Runner] = {
    CancelMigration: _cancel_migration,
    FinishJob: _finish_job,
    DropJob: _drop_job,
    CommitBack: _commit_back,
    CommitOffline: _commit_offline,
    ResumeGuest: _resume_guest,
    DeleteFile: _delete_file,
    HashMemory: _fingerprint,
    RemoveNode: _send_commands,
    ResetMigration: _send_commands,
    RemoveFdset: _send_commands,
    CloseFd: _send_commands,
    RestoreThrottle: _send_commands,
}


async def _run(ctx: Context, record: SessionRecord, action: Action) -> Any:
    """Run one action; returns its result (HashMemory: digest and size)."""
    return await _RUNNERS[type(action)](ctx, record, action)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the loop ------------------------------------------------------------------------------------


def _final_record(
    current: SessionRecord, plan: RecoveryPlan, digest: tuple[str, int] | None
) -> SessionRecord:
    new = plan.record
    if digest is not None and new.memory is not None:
        new = new.evolve(
            memory=attrs.evolve(
                new.memory,
                digest=digest[0],
                digest_algorithm=memhash.ALGORITHM,
                size=digest[1],
            )
        )
    if new.state is State.ACTIVE and new.activated_at is None:
        new = new.evolve(activated_at=_now())
    finished = new.state in TERMINAL or (new.state is State.FAILED and new.rolled_back)
    if finished and new.finished_at is None:
        new = new.evolve(finished_at=_now())
    if plan.event is not None and next_state(current.state, plan.event) is not new.state:
        raise IllegalTransition(
            f"recover planned {plan.event.value!r} from {current.state.value!r} but a record in "
            f"{new.state.value!r}; this is a bug in forgeqmp, please report it"
        )
    return new


async def run_recover(
    ctx: Context,
    *,
    launcher: Launcher | None = None,
    timeout: float = DEFAULT_RECOVER_TIMEOUT,
    report: ProgressCallback | None = None,
) -> SessionRecord | None:
    """Reconcile the instance's session with what is true (see
    :meth:`forgeqmp.forge.Instance.recover`)."""
    timeout = _check_timeout("timeout", timeout)
    tell: Callable[[Any], None] = report or (lambda _event: None)
    launch = launcher or ctx.launcher or functools.partial(detached_launcher, timeout=timeout)
    problems: list[str] = []
    if ctx.store.load() is None and not ctx.state_dir.path.is_dir():
        return None  # checked before the lock too, which would create the state dir
    with InstanceLock(ctx.state_dir, "forgeqmp recover"):
        # A killed operation's (never a file of another), also when it was killed writing the
        # first record of its session: then there is no record, only its temporary file.
        ctx.store.remove_temp_files()
        record = ctx.store.load()
        if record is None:
            return None
        with anyio.fail_after(timeout):
            for _round in range(_MAX_ROUNDS):
                plan = reconcile(record, await observe(ctx, record))
                tell(
                    ProgressEvent(
                        "recover",
                        "plan",
                        {
                            "state": plan.state.value,
                            "found": list(plan.findings),
                            "actions": [a.describe() for a in plan.actions],
                        },
                    )
                )
                digest: tuple[str, int] | None = None
                try:
                    for action in plan.actions:
                        if isinstance(action, FinishDiscard):  # the last action: it ends recover
                            tell(ProgressEvent("recover", "action", {"do": action.describe()}))
                            return await Discard(ctx).finish_discard(record, launch, timeout, tell)
                        tell(ProgressEvent("recover", "action", {"do": action.describe()}))
                        try:
                            result = await _run(ctx, record, action)
                        except (ForgeError, OSError) as exc:
                            if action.tidying:
                                log.warning("recover: %s failed: %s", action.describe(), exc)
                                continue
                            raise _ActionFailed(action, exc) from exc
                        if isinstance(action, HashMemory):
                            digest = result
                except _ActionFailed as exc:
                    log.warning("recover: %s", exc)
                    problems.append(str(exc))
                    record = ctx.current()
                    continue
                current = ctx.current()
                new = _final_record(current, plan, digest)
                if attrs.evolve(new, updated_at=current.updated_at) != current:
                    new = ctx.save(new)
                record = new
                if not plan.actions:
                    tell(ProgressEvent("recover", "done", {"state": record.state.value}))
                    return record
        return _give_up(ctx, record, problems)


def _give_up(ctx: Context, record: SessionRecord, problems: Sequence[str]) -> SessionRecord:
    """Record that recover could not reach a fixed point, and why (a true state nonetheless)."""
    phase = record.failure_phase if record.state is State.FAILED else record.state
    if phase is None or phase in TERMINAL:
        raise ForgeFailed("recover could not finish: " + "; ".join(problems))
    reason = "recover could not finish: " + ("; ".join(problems) or "QEMU kept changing")
    record = ctx.save(
        record,
        Event.RECOVERED_FAILED,
        failure_phase=phase,
        rolled_back=False,
        error=reason,
        next_step="fix what stands in the way (see error), then run 'forgeqmp recover' again",
    )
    raise ForgeFailed(f"{reason}; the session is recorded FAILED; fix it and run recover again")


# --- status --------------------------------------------------------------------------------------


def lock_held(state_dir: StateDir) -> bool | None:
    """Whether some process holds the instance's lock now, without taking it (a status query
    must never make a concurrent enable fail): read from ``/proc/locks``. None if it cannot be
    told (no lock file means nobody ever locked: False)."""
    path = Path(state_dir.path) / LOCK_FILE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if "->" in fields[:2]:
                    continue  # a blocked waiter, not a holder
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return True
    except OSError:
        return _probe_lock(path)
    return False


def _probe_lock(path: Path) -> bool | None:
    """Fallback without /proc/locks: try a shared lock for an instant."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return True if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def stale(state_dir: StateDir, record: SessionRecord) -> str | None:
    """Why the record of ``state_dir`` is stale (an interrupted operation), or None."""
    qemu_alive: bool | None = None
    if record.state in WORKING:
        qemu_alive = not qemu_down(record.qemu.qmp_socket, record)
    return stale_reason(record, lock_held=lock_held(state_dir), qemu_alive=qemu_alive)
