"""The raw baseline: the QEMU recipe (``../shared/design/qemu-recipe.md``) as a minimal
hand-written QMP sequence over bare qemu.qmp, with nothing forgeqmp adds (no prerequisite checks,
no session record, no undo, no deadlines, no feature probe).

The benchmarks run forgeqmp and this side by side on the same guest, so the ratio of the two is
forgeqmp's own cost. It does the same work the recipe says a correct snapshot needs:

- enable: overlays made and added before the pause; the memory file passed as an fd
  (``fd:`` or ``file:/dev/fdset/N``) or named (plain ``file:``); ``pause-before-switchover`` and
  one ``transaction`` in the pause (``background-snapshot``: stop, transaction, migrate, cont);
  then fsync and the file's digest (forgeqmp's: XXH3-128 of the data extents);
- commit: ``block-commit`` per disk in parallel, ``job-complete`` at ready, dismiss, remove the
  overlay;
- discard: ``quit``, wait for the process to be gone, start the same argv with ``-incoming defer
  -S``, ``migrate-incoming`` the file (a ``mapped-ram`` one on forgeqmp's
  :data:`~forgeqmp.core.plans.discard.RESTORE_MULTIFD_CHANNELS`), ``cont``: no hash verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

from forgeqmp.adapters import memhash
from forgeqmp.core.plans.discard import RESTORE_MULTIFD_CHANNELS

DOWNTIME_LIMIT_MS = 20
MAX_BANDWIDTH = 1 << 40


class Raw:
    """One bare qemu.qmp connection; ``caps`` are the migration capabilities this QEMU knows."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.qmp = QMPClient("bench-raw")
        self.caps: frozenset[str] = frozenset()

    async def connect(self) -> Raw:
        await self.qmp.connect(self.socket_path)
        reply = await self.qmp.execute("query-migrate-capabilities")
        self.caps = frozenset(c["capability"] for c in reply)
        return self

    async def close(self) -> None:
        await self.qmp.disconnect()

    async def cmd(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        return await self.qmp.execute(name, dict(args) if args is not None else None)

    async def __aenter__(self) -> Raw:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class RawDisk:
    qdev: str
    node: str
    file: str
    fmt: str
    size: int


@dataclass
class RawSession:
    """What a raw enable made: overlays (disk, overlay node, file) and the memory file."""

    overlays: list[tuple[RawDisk, str, str]]
    memory: str
    pause_ms: float | None = None
    save_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


async def disks(raw: Raw) -> list[RawDisk]:
    """The writable disks, by qdev path, with the node attached to each now."""
    found = []
    for b in await raw.cmd("query-block"):
        ins = b.get("inserted")
        if not b.get("qdev") or not ins or b.get("removable") or ins.get("ro"):
            continue
        image = ins["image"]
        found.append(
            RawDisk(
                b["qdev"],
                ins["node-name"],
                image["filename"],
                image["format"],
                image["virtual-size"],
            )
        )
    return found


def _stamp(event: Mapping[str, Any]) -> float:
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


async def _until(listener: EventListener, status: str, seen: list[dict[str, Any]]) -> None:
    """Read events (keeping them in ``seen``) until MIGRATION reaches ``status``."""
    while True:
        ev = dict(await listener.get())
        seen.append(ev)
        if ev["event"] == "MIGRATION":
            got = ev["data"]["status"]
            if got == status:
                return
            if got in ("failed", "cancelled"):
                raise RuntimeError(f"migration {got}")


def _pause_ms(events: Sequence[Mapping[str, Any]]) -> float | None:
    stops = [_stamp(e) for e in events if e["event"] == "STOP"]
    resumes = [_stamp(e) for e in events if e["event"] == "RESUME"]
    if not stops or not resumes:
        return None
    return max(0.0, resumes[-1] - stops[0]) * 1000


def hash_memory(path: str) -> str:
    """fsync the file's directory, then the file's digest: the same work forgeqmp does
    (:func:`forgeqmp.adapters.memhash.hash_fd`, XXH3-128 of the data extents; the file itself
    is not fsynced, as forgeqmp's Active does not wait for it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        dfd = os.open(os.path.dirname(path), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        digest, _size = memhash.hash_fd(fd)
    finally:
        os.close(fd)
    return digest


async def enable(
    raw: Raw,
    targets: Sequence[RawDisk],
    memory: str,
    *,
    strategy: str,
    transport: str,
    qemu_img: str,
    env: Mapping[str, str],
    tag: str,
) -> RawSession:
    """Snapshot ``targets`` and save memory into ``memory``. ``strategy``: precopy, mapped-ram or
    background-snapshot; ``transport``: fd, fdset-file or file (plain ``file:<path>``)."""
    t0 = time.monotonic()
    session = RawSession([], memory)
    # 1. overlays, before anything pauses
    for i, d in enumerate(targets):
        node, path = f"raw{tag}-{i}", f"{d.file}.raw-{tag}.qcow2"
        argv = [qemu_img, "create", "-q", "-f", "qcow2", "-b", d.file, "-F", d.fmt, "-u", path]
        await asyncio.to_thread(_run, [*argv, str(d.size)], env)
        await raw.cmd(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": node,
                "backing": None,
                "file": {"driver": "file", "filename": path},
            },
        )
        session.overlays.append((d, node, path))
    actions = [
        {"type": "blockdev-snapshot", "data": {"node": d.node, "overlay": node}}
        for d, node, _ in session.overlays
    ]
    t_overlays = time.monotonic()
    # 2. the memory file and its transport
    fdset = None
    if transport == "file":
        uri = f"file:{memory}"
    else:
        fd = os.open(memory, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            raw.qmp.send_fd_scm(fd)
            if transport == "fd":
                await raw.cmd("getfd", {"fdname": "rawmem"})
                uri = "fd:rawmem"
            else:
                fdset = (await raw.cmd("add-fd"))["fdset-id"]
                uri = f"file:/dev/fdset/{fdset}"
        finally:
            os.close(fd)
    background = strategy == "background-snapshot"
    wanted = {
        "events": True,
        "pause-before-switchover": not background,
        "background-snapshot": background,
        "multifd": strategy == "mapped-ram",
        "mapped-ram": strategy == "mapped-ram",
    }
    await raw.cmd(
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": k, "state": v} for k, v in wanted.items() if k in raw.caps
            ]
        },
    )
    params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH}
    if not background:
        params["downtime-limit"] = DOWNTIME_LIMIT_MS
    await raw.cmd("migrate-set-parameters", params)
    # 3.-6. save, with the disks snapshotted while the guest is paused
    seen: list[dict[str, Any]] = []
    with raw.qmp.listener(("MIGRATION", "STOP", "RESUME")) as events:
        t_save = time.monotonic()
        if background:
            await raw.cmd("stop")
            await raw.cmd("transaction", {"actions": actions})
            await raw.cmd("migrate", {"uri": uri})
            await raw.cmd("cont")
            await _until(events, "completed", seen)
        else:
            await raw.cmd("migrate", {"uri": uri})
            await _until(events, "pre-switchover", seen)
            await raw.cmd("transaction", {"actions": actions})
            await raw.cmd("migrate-continue", {"state": "pre-switchover"})
            await _until(events, "completed", seen)
            # No event says the runstate left finish-migrate (cont fails before): poll.
            while (status := (await raw.cmd("query-status"))["status"]) == "finish-migrate":  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            if status != "running":
                await raw.cmd("cont")
        session.save_s = time.monotonic() - t_save
        seen += [dict(e) for e in events.clear()]
    session.pause_ms = _pause_ms(seen)
    if fdset is not None:
        await raw.cmd("remove-fd", {"fdset-id": fdset})
    # 7. fingerprinted for discard
    t_hash = time.monotonic()
    await asyncio.to_thread(hash_memory, memory)
    t1 = time.monotonic()
    session.timings = {
        "overlays_s": t_overlays - t0,
        "save_s": session.save_s,
        "hash_s": t1 - t_hash,
        "total_s": t1 - t0,
    }
    return session


async def commit(raw: Raw, session: RawSession) -> float:
    """Merge every overlay into its base, live, disks in parallel; seconds taken."""
    t0 = time.monotonic()
    jobs = {f"{node}-c": (d, node, path) for d, node, path in session.overlays}
    with raw.qmp.listener("JOB_STATUS_CHANGE") as events:
        for job, (d, node, _path) in jobs.items():
            await raw.cmd(
                "block-commit",
                {"job-id": job, "device": node, "base-node": d.node, "auto-dismiss": False},
            )
        left, completing = set(jobs), set()
        while left:
            ev = await events.get()
            job, status = ev["data"]["id"], ev["data"]["status"]
            if job not in left:
                continue
            if status == "ready" and job not in completing:
                # A refusal right after ready is transient: the job goes ready again.
                with contextlib.suppress(ExecuteError):
                    await raw.cmd("job-complete", {"id": job})
                    completing.add(job)
            elif status == "concluded":
                left.discard(job)
    for job in await raw.cmd("query-jobs"):
        if job["id"] in jobs and job.get("error"):
            raise RuntimeError(f"commit {job['id']}: {job['error']}")
    for job, (_d, node, path) in jobs.items():
        await raw.cmd("job-dismiss", {"id": job})
        await raw.cmd("blockdev-del", {"node-name": node})
        os.unlink(path)
    return time.monotonic() - t0


def _run(argv: Sequence[str], env: Mapping[str, str]) -> None:
    subprocess.run(argv, check=True, env=dict(env))


def _launch(
    argv: Sequence[str], cwd: str, env: Mapping[str, str], log: str
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def _wait_gone(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [], 30)
    finally:
        os.close(pidfd)


@dataclass
class RawRestore:
    """A raw discard: the QEMU it started and how long each step took."""

    process: subprocess.Popen[bytes]
    timings: dict[str, float]


async def discard(
    raw: Raw,
    pid: int,
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    memory: str,
    *,
    transport: str,
    capabilities: Sequence[str] = (),
    log: str = os.devnull,
) -> RawRestore:
    """Quit QEMU, start ``argv`` waiting for the state, load ``memory`` into it, resume.

    ``transport``: ``file`` (QEMU opens the file) or ``fd`` (7.2). ``capabilities``: those the
    save used that the load needs too (mapped-ram, multifd). The connection is replaced by one to
    the new QEMU."""
    t0 = time.monotonic()
    with contextlib.suppress(Exception):  # QEMU drops the connection as it quits
        await raw.cmd("quit")
    with contextlib.suppress(Exception):
        await raw.close()
    await asyncio.to_thread(_wait_gone, pid)
    t_quit = time.monotonic()
    if os.path.exists(raw.socket_path):
        os.unlink(raw.socket_path)
    process = await asyncio.to_thread(_launch, [*argv, "-incoming", "defer", "-S"], cwd, env, log)
    raw.qmp = QMPClient("bench-raw")
    while True:
        try:
            await raw.qmp.connect(raw.socket_path)
            break
        except Exception:
            if process.poll() is not None:
                raise RuntimeError(f"QEMU exited with {process.returncode} at start") from None
            raw.qmp = QMPClient("bench-raw")
            await asyncio.sleep(0.005)
    t_launch = time.monotonic()
    await raw.cmd(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": c, "state": True} for c in ("events", *capabilities)]},
    )
    if "multifd" in capabilities:  # the recipe's load: more channels than QEMU's 2 (faster)
        await raw.cmd("migrate-set-parameters", {"multifd-channels": RESTORE_MULTIFD_CHANNELS})
    if transport == "fd":
        fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw.qmp.send_fd_scm(fd)
            await raw.cmd("getfd", {"fdname": "rawload"})
        finally:
            os.close(fd)
        uri = "fd:rawload"
    else:
        uri = f"file:{memory}"
    seen: list[dict[str, Any]] = []
    with raw.qmp.listener("MIGRATION") as events:
        await raw.cmd("migrate-incoming", {"uri": uri})
        await _until(events, "completed", seen)
    t_loaded = time.monotonic()
    await raw.cmd("cont")
    t1 = time.monotonic()
    return RawRestore(
        process,
        {
            "quit_s": t_quit - t0,
            "launch_s": t_launch - t_quit,
            "load_s": t_loaded - t_launch,
            "total_s": t1 - t0,
        },
    )


async def round_trips(raw: Raw, n: int) -> float:
    """Seconds for ``n`` sequential ``query-status`` round trips."""
    t0 = time.perf_counter()
    for _ in range(n):
        await raw.qmp.execute("query-status")
    return time.perf_counter() - t0
