"""Failure paths of commit and discard, on real QEMU (every build), each reached deterministically:

- a commit block job that QEMU ends with an error (force-cancelled by a second QMP client right
  after it started), one that disappears (cancelled and dismissed by another client once ready), and one
  that ends without moving the disk back onto its original (cancelled once ready: QEMU completes it
  without the pivot, so the disk is left on the wrong node). Each time the commit fails with QEMU's
  reason (exit 4), the guest runs on, no write is lost, discard is refused (the commit passed its
  point of no return) and the next commit finishes the job;
- discard refused once a commit has written into an original: the controller is killed right after
  the first of two disks was merged (crash point ``commit:disk-merged``), before and after recover;
- discard refused for a changed configuration: a disk of another size, QEMU restarted with another
  command line, or with another machine type; nothing changes, and the session can still be
  committed.

The second QMP client talks to a second QMP monitor of the guest (QEMU serves one client per
monitor). It acts exactly when the driver reaches a crash point: :func:`forgeqmp.adapters.crashpoints.reached`
is replaced, in this process, by a hook that runs the client and returns (no crash).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import forgeqmp
from forgeqmp.adapters import crashpoints
from forgeqmp.adapters.launcher import LaunchSpec, detached_launcher
from forgeqmp.adapters.process import wait_gone
from forgeqmp.adapters.qmp import connect as qmp_connect
from forgeqmp.core.states import State
from forgeqmp.testing import DiskSpec, QemuInstance

from .helpers import (
    block_graph,
    commit,
    commit_killed_at,
    discard,
    enable,
    files_under,
    qmp,
    run,
    sha256_of,
)

pytestmark = pytest.mark.qemu

DATA_MIB = 16


# --- helpers -------------------------------------------------------------------------------------


def second_monitor(vm_dir: Path) -> tuple[str, list[str]]:
    socket = str(vm_dir / "qmp2.sock")
    return socket, ["-qmp", f"unix:{socket},server=on,wait=off"]


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread and wait for it (the driver's event loop is blocked meanwhile, as
    when another process acts between two of its steps)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the second QMP client hung"
    if "error" in out:
        raise out["error"]
    return out.get("value")


async def _other_client(socket: str, action: Callable[[Any], Any]) -> Any:
    async with qmp_connect(socket) as conn:
        return await action(conn)


async def _wait_job(conn: Any, job_id: str, wanted: str) -> None:
    with anyio.fail_after(60):
        while True:
            jobs = {j["id"]: j for j in await conn.execute("query-jobs")}
            if jobs.get(job_id, {}).get("status") == wanted:
                return
            await anyio.sleep(0.02)


@pytest.fixture
def at_crash_point(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Install ``hooks[(operation, step)] = fn``: fn runs (once) when a driver reaches that point."""
    hooks: dict[tuple[str, str], Callable[[], Any]] = {}
    fired: list[tuple[str, str]] = []

    def reached(operation: str, step: str, qemu_pid: int | None = None) -> None:
        hook = hooks.pop((operation, step), None)
        if hook is not None:
            fired.append((operation, step))
            hook()

    monkeypatch.setattr(crashpoints, "reached", reached)
    return {"hooks": hooks, "fired": fired}


def commit_error(vm: QemuInstance, state: Path) -> forgeqmp.ForgeFailed:
    """The ForgeFailed a commit raises. Today the API lets it out of a task group wrapped in an
    ExceptionGroup (the "exits" work unwraps it); either way the one error inside is what counts."""
    with pytest.raises((forgeqmp.ForgeFailed, BaseExceptionGroup)) as info:
        run(commit, vm.qmp_socket, state)
    error: BaseException = info.value
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    assert isinstance(error, forgeqmp.ForgeFailed), repr(info.value)
    return error


def load(state: Path) -> forgeqmp.SessionRecord:
    record = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    assert record is not None
    return record


def cli(vm: QemuInstance, state: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """``forgeqmp --json ...``: (exit code, the final JSON object)."""
    command = [sys.executable, "-m", "forgeqmp", "--qmp", vm.qmp_socket]
    command += ["--state-dir", str(state), "--json", *args]
    done = subprocess.run(
        command,
        env={**vm.build.environ(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines, done.stderr
    return done.returncode, lines[-1]


def running(vm: QemuInstance) -> bool:
    return bool(run(qmp, vm.qmp_socket, "query-status")["status"] == "running")


def session_files(state: Path, record: forgeqmp.SessionRecord) -> dict[str, str]:
    """Hash of every file of the session that exists (record, memory file, overlays) and of each
    original."""
    paths = files_under(state) | {d.overlay_file for d in record.disks if d.overlay_file}
    paths |= {d.base_file for d in record.disks}
    return {p: sha256_of(p) for p in sorted(paths) if Path(p).exists()}


def assert_commit_failed_and_is_retried(
    vm: QemuInstance, state: Path, error: forgeqmp.ForgeFailed, data: str
) -> None:
    """After a commit that failed: exit 4, FAILED with the disk pending on its overlay, the guest
    running with its data, discard refused; then the next commit finishes and keeps the data."""
    assert error.exit_code == 4
    failed = load(state)
    assert failed.state is State.FAILED
    assert failed.failure_phase is State.COMMITTING
    assert not failed.rolled_back
    [disk] = failed.disks
    assert disk.overlay_node is not None  # still on its overlay, which holds every write
    assert disk.overlay_file is not None
    assert Path(disk.overlay_file).exists()
    assert running(vm)
    attached, _nodes = block_graph(vm.qmp_socket)
    assert [node for _q, node, _d in attached] == [disk.overlay_node]
    assert vm.disk_md5("d0", DATA_MIB) == data
    with pytest.raises(forgeqmp.PrerequisiteError) as refused:
        run(discard, vm.qmp_socket, state)
    assert refused.value.exit_code == 3
    assert load(state) == failed  # refused: nothing changed

    done = run(commit, vm.qmp_socket, state)
    assert done.state is State.COMMITTED
    assert vm.disk_md5("d0", DATA_MIB) == data
    attached, nodes = block_graph(vm.qmp_socket)
    assert [node for _q, node, _d in attached] == ["d0-fmt"]
    assert not [n for n in nodes if n.startswith("fq")]
    assert not Path(disk.overlay_file).exists()


# --- commit jobs that fail -----------------------------------------------------------------------


def test_commit_jobs_that_fail_disappear_or_do_not_pivot(  # type: ignore[no-untyped-def]
    qemu_factory, tmp_path_factory: pytest.TempPathFactory, at_crash_point: dict[str, Any]
) -> None:
    monitor_dir = tmp_path_factory.mktemp("mon")
    other, extra = second_monitor(monitor_dir)
    vm = qemu_factory(disks=[DiskSpec("d0", "qcow2", 64)], memory_mib=256, extra_args=extra)
    hooks = at_crash_point["hooks"]

    def session(name: str) -> tuple[Path, str]:
        state = tmp_path_factory.mktemp(name) / "state"
        assert run(enable, vm.qmp_socket, state).state is State.ACTIVE
        return state, vm.write_disk("d0", DATA_MIB, seed=name)

    # 1. QEMU ends the job with an error: force-cancelled by another client right after it
    # started (copying or already ready: a forced cancel ends it with an error either way).
    state, data = session("job-error")
    seen: dict[str, Any] = {}

    async def cancel_while_copying(conn: Any) -> None:
        [job] = await conn.execute("query-jobs")
        await conn.execute("block-job-cancel", {"device": job["id"], "force": True})
        await _wait_job(conn, job["id"], "concluded")
        [job] = await conn.execute("query-jobs")
        seen["error"] = job.get("error")

    hooks[("commit", "job-started")] = lambda: in_thread(
        lambda: run(_other_client, other, cancel_while_copying)
    )
    error = commit_error(vm, state)
    assert at_crash_point["fired"] == [("commit", "job-started")]
    assert seen["error"], "QEMU reported no error for the cancelled job"
    assert seen["error"] in str(error)  # QEMU's own reason, passed on
    assert_commit_failed_and_is_retried(vm, state, error, data)

    # 2. The job disappears: cancelled and dismissed by another client once ready.
    state, data = session("job-gone")
    gone: dict[str, str] = {}

    async def cancel_and_dismiss(conn: Any) -> None:
        [job] = await conn.execute("query-jobs")
        gone["id"] = job["id"]
        await conn.execute("block-job-cancel", {"device": job["id"], "force": True})
        await _wait_job(conn, job["id"], "concluded")
        await conn.execute("job-dismiss", {"id": job["id"]})
        assert await conn.execute("query-jobs") == []

    hooks[("commit", "job-ready")] = lambda: in_thread(
        lambda: run(_other_client, other, cancel_and_dismiss)
    )
    at_crash_point["fired"].clear()
    error = commit_error(vm, state)
    assert at_crash_point["fired"] == [("commit", "job-ready")]
    assert gone["id"] in str(error)
    assert_commit_failed_and_is_retried(vm, state, error, data)

    # 3. The job ends without the pivot: a plain cancel of a ready commit job completes it but
    # leaves the disk on its overlay, i.e. the disk is not on its original node afterwards.
    state, data = session("no-pivot")
    overlay = next(d.overlay_node for d in load(state).disks)

    async def cancel_ready(conn: Any) -> None:
        [job] = await conn.execute("query-jobs")
        assert job["status"] == "ready"
        await conn.execute("block-job-cancel", {"device": job["id"]})
        await _wait_job(conn, job["id"], "concluded")
        [job] = await conn.execute("query-jobs")
        assert not job.get("error")  # QEMU sees no failure: only the node tells

    hooks[("commit", "job-ready")] = lambda: in_thread(
        lambda: run(_other_client, other, cancel_ready)
    )
    at_crash_point["fired"].clear()
    error = commit_error(vm, state)
    assert at_crash_point["fired"] == [("commit", "job-ready")]
    assert repr(overlay) in str(error)
    assert "'d0-fmt'" in str(error)
    assert_commit_failed_and_is_retried(vm, state, error, data)


# --- discard refused once a commit wrote into an original ----------------------------------------


def test_discard_is_refused_once_a_commit_merged_a_disk(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=[DiskSpec("d0", "qcow2", 32), DiskSpec("d1", "qcow2", 32)])
    state = tmp_path / "state"
    record = run(enable, vm.qmp_socket, state, all_disks=True)
    data = {d: vm.write_disk(d, 2, seed=f"{d}B") for d in ("d0", "d1")}
    commit_killed_at(vm.qmp_socket, state, "disk-merged", vm.build.environ())
    crashed = load(state)
    merged = [d.name for d in crashed.disks if d.merged and d.overlay_node is None]
    # The first disk back on its original, merged, killed the controller; the other one's
    # switch, running in parallel, may have been done by then too.
    assert merged, crashed.disks

    def refused() -> None:
        before = session_files(state, record)
        pid = vm.pid
        code, final = cli(vm, state, "discard")
        assert code == 3, final
        assert final["exit_code"] == 3
        assert session_files(state, record) == before
        assert vm.pid == pid
        assert running(vm)

    refused()  # interrupted commit (COMMITTING)
    code, final = cli(vm, state, "recover")
    recovered = load(state)
    assert recovered.state in (State.FAILED, State.COMMITTED)
    assert code == (4 if recovered.state is State.FAILED else 0), final
    refused()  # after recover: past the point of no return for good
    if load(state).state is not State.COMMITTED:
        code, final = cli(vm, state, "commit")
        assert code == 0, final
    assert load(state).state is State.COMMITTED
    assert {d: vm.disk_md5(d, 2) for d in data} == data


# --- discard refused for a changed configuration -------------------------------------------------


def stop_qemu(vm: QemuInstance) -> None:
    pid = vm.pid
    run(qmp, vm.qmp_socket, "quit")
    assert wait_gone(pid, 30)


def start(vm: QemuInstance, argv: tuple[str, ...] | list[str]) -> None:
    spec = LaunchSpec(
        argv=tuple(argv),
        cwd=str(vm.workdir),
        env=vm.build.environ(),
        qmp_socket=vm.qmp_socket,
        incoming=False,
        log_file=str(vm.workdir / "qemu.log"),
    )
    since = time.monotonic()
    run(detached_launcher, spec)
    vm.wait_ready(since=since, timeout=180)


async def _start_argv(vm: QemuInstance, state: Path) -> tuple[str, ...]:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state, allow_offline=True) as inst:
        return tuple(inst.start_spec().argv)


def test_discard_is_refused_when_the_configuration_changed(  # type: ignore[no-untyped-def]
    qemu_factory, tmp_path: Path
) -> None:
    config = tmp_path / "machine.cfg"
    config.write_text('[machine]\n  type = "q35"\n')
    vm = qemu_factory(
        disks=[DiskSpec("d0", "qcow2", 32)], memory_mib=256, extra_args=["-readconfig", str(config)]
    )
    state = tmp_path / "state"
    record = run(enable, vm.qmp_socket, state)
    data = vm.write_disk("d0", 2, seed="after-enable")

    def refused(why: str) -> None:
        before = session_files(state, record)
        saved = load(state)
        pid = vm.pid
        with pytest.raises(forgeqmp.PrerequisiteError, match=why) as info:
            run(discard, vm.qmp_socket, state)
        assert info.value.exit_code == 3
        code, final = cli(vm, state, "discard")
        assert code == 3, final
        assert why in final["error"]
        assert load(state) == saved
        assert session_files(state, record) == before
        assert vm.pid == pid
        assert running(vm)
        assert vm.disk_md5("d0", 2) == data

    # A disk of another size than at enable (grown on its overlay).
    [disk] = record.disks
    run(qmp, vm.qmp_socket, "block_resize", {"node-name": disk.overlay_node, "size": 48 << 20})
    refused("another size")

    # QEMU restarted (on the overlays) with another command line.
    on_overlays = run(_start_argv, vm, state)
    stop_qemu(vm)
    start(vm, [*on_overlays, "-name", "changed"])
    refused("another command line")

    # The same command line, but another machine type (from the configuration file it reads).
    stop_qemu(vm)
    config.write_text('[machine]\n  type = "pc"\n')
    start(vm, on_overlays)
    machine = run(qmp, vm.qmp_socket, "qom-get", {"path": "/machine", "property": "type"})
    assert str(machine).startswith("pc-i440fx-"), machine  # the file really changed it
    refused("machine type")

    # The session is still whole: commit keeps every write.
    assert run(commit, vm.qmp_socket, state).state is State.COMMITTED
    assert vm.disk_md5("d0", 2) == data
