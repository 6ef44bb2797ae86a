"""The live commit over the fake QMP peer: the real operation (``Instance.commit``) against a
scripted QEMU and a temporary state dir. A commit that goes through, and the ways one stops:
QEMU refusing ``block-commit``, a job ending with an error, a job that disappears, the deadline,
QEMU going away mid-commit. Each time: the typed error, what the record says afterwards (state,
step, error, next step, which disks are merged) and what was sent to QEMU."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from fakeqmp import Fail, FakeQMP, Reply, job_event  # tests/unit is on sys.path
from records import DEAD_PID, make_record

from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import State
from forgeqmp.errors import ForgeFailed, TaskRunning
from forgeqmp.forge import Instance

#: The pid of a QEMU that is alive for the whole test (this process: never signalled by commit).
ALIVE = os.getpid()


class Qemu:
    """The block side of a scripted QEMU for one forged disk: what is attached to the device and
    which jobs exist, changed by the commands the commit sends."""

    def __init__(self, record: SessionRecord, index: int = 0) -> None:
        self.disk = record.disks[index]
        self.attached = str(self.disk.overlay_node)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.job_id = f"{str(self.disk.overlay_node).removesuffix('-fmt')}-commit"

    def query_block(self, _args: Any) -> list[dict[str, Any]]:
        return [{"qdev": self.disk.qdev, "inserted": {"node-name": self.attached, "file": "x"}}]

    def query_jobs(self, _args: Any) -> list[dict[str, Any]]:
        return list(self.jobs.values())

    def job(self, status: str, error: str | None = None) -> None:
        job = {
            "id": self.job_id,
            "type": "commit",
            "status": status,
            "current-progress": 1,
            "total-progress": 2,
        }
        if error is not None:
            job["error"] = error
        self.jobs[self.job_id] = job

    def block_commit(
        self, status: str, *, error: str | None = None, disconnect: bool = False
    ) -> Callable[[Any], Reply]:
        """A ``block-commit`` QEMU accepts: the job is created and reaches ``status``."""

        def answer(_args: Any) -> Reply:
            self.job(status, error)
            return Reply(
                {},
                events=[job_event(self.job_id, "created"), job_event(self.job_id, status)],
                disconnect=disconnect,
            )

        return answer

    def job_complete(self, _args: Any) -> Reply:
        self.job("concluded")
        self.attached = self.disk.device_node
        return Reply({}, events=[job_event(self.job_id, "concluded")])

    def job_cancel(self, _args: Any) -> Reply:
        self.job("concluded", "operation cancelled")
        return Reply({}, events=[job_event(self.job_id, "concluded")])

    def job_dismiss(self, _args: Any) -> dict[str, Any]:
        self.jobs.pop(self.job_id, None)
        return {}


def setup(
    tmp_path: Path,
    *,
    pid: int = ALIVE,
    runstate: str = "running",
    record: SessionRecord | None = None,
) -> tuple[Instance, FakeQMP, Qemu, SessionRecord]:
    record = record or make_record(State.ACTIVE, root=tmp_path)
    state = StateDir(tmp_path / "state")
    state.ensure()
    RecordStore(state).save(record)
    assert record.memory is not None
    Path(record.memory.path).write_bytes(b"guest RAM")
    for d in record.disks:
        Path(d.base_file).write_bytes(b"original")
        Path(str(d.overlay_file)).write_bytes(b"overlay")
    qemu = Qemu(record)
    peer = FakeQMP(
        {
            "query-jobs": qemu.query_jobs,
            "query-migrate": {},
            "query-block": qemu.query_block,
            "query-status": {"status": runstate, "running": runstate == "running"},
            "stop": {},
            "cont": {},
            "job-complete": qemu.job_complete,
            "job-cancel": qemu.job_cancel,
            "job-dismiss": qemu.job_dismiss,
            "blockdev-del": {},
        },
        pid=pid,
    )
    return Instance(peer.as_connection(), state), peer, qemu, record


def commit(vm: Instance, **kw: Any) -> SessionRecord:
    return anyio.run(lambda: vm.commit(**kw), backend="asyncio")


def saved(vm: Instance) -> SessionRecord:
    record = vm.session()
    assert record is not None
    return record


def block_commit_args(qemu: Qemu) -> dict[str, Any]:
    return {
        "job-id": qemu.job_id,
        "device": qemu.disk.overlay_node,
        "base-node": qemu.disk.device_node,
        "auto-dismiss": False,
    }


def test_a_commit_that_goes_through_merges_pivots_and_resumes(tmp_path: Path) -> None:
    vm, peer, qemu, record = setup(tmp_path)
    peer.script("block-commit", qemu.block_commit("ready"))
    done = commit(vm)
    peer.check()
    assert done.state is State.COMMITTED
    assert done.step == "committed"
    assert saved(vm) == done
    (disk,) = done.disks
    assert disk.merged
    assert disk.overlay_node is None
    assert done.paused_by_forgeqmp is False
    assert not Path(str(record.disks[0].overlay_file)).exists()
    assert record.memory is not None
    assert not Path(record.memory.path).exists()
    actions = [(s.command, s.arguments) for s in peer.actions()]
    assert actions == [
        ("block-commit", block_commit_args(qemu)),
        ("stop", None),
        ("job-complete", {"id": qemu.job_id}),
        ("job-dismiss", {"id": qemu.job_id}),
        ("cont", None),
        ("blockdev-del", {"node-name": record.disks[0].overlay_node}),
        ("blockdev-del", {"node-name": record.disks[0].overlay_file_node}),
    ]


def test_block_commit_refused_leaves_the_original_untouched_and_discard_possible(
    tmp_path: Path,
) -> None:
    vm, peer, qemu, record = setup(tmp_path)
    peer.script("block-commit", Fail("GenericError", "Permission conflict on node 'disk0-fmt'"))
    with pytest.raises(ForgeFailed, match=r"commit stopped: .*Permission conflict"):
        commit(vm)
    peer.check()
    after = saved(vm)
    assert after.state is State.FAILED
    assert after.failure_phase is State.COMMITTING
    assert after.step == "committing"
    assert after.rolled_back is False
    assert after.error is not None
    assert "Permission conflict on node 'disk0-fmt'" in after.error
    assert "not started (originals untouched): disk0" in after.error
    assert after.next_step is not None
    assert "'forgeqmp discard': no original was written into" in after.next_step
    (disk,) = after.disks
    assert disk.merged is False  # unmarked: QEMU created no job
    assert disk.overlay_node == record.disks[0].overlay_node
    assert record.memory is not None
    assert Path(record.memory.path).exists()  # discard still needs it
    assert [(s.command, s.arguments) for s in peer.actions()] == [
        ("block-commit", block_commit_args(qemu))
    ]


def test_a_job_that_concludes_with_an_error_stops_the_commit_partly_merged(
    tmp_path: Path,
) -> None:
    vm, peer, qemu, record = setup(tmp_path)
    peer.script("block-commit", qemu.block_commit("concluded", error="No space left on device"))
    with pytest.raises(ForgeFailed, match="No space left on device"):
        commit(vm)
    peer.check()
    after = saved(vm)
    assert after.state is State.FAILED
    assert after.failure_phase is State.COMMITTING
    assert after.error is not None
    assert "committing disk disk0 failed: No space left on device" in after.error
    assert "partly merged" in after.error
    assert after.next_step is not None
    assert after.next_step.startswith("free space on the file system of the original")
    (disk,) = after.disks
    assert disk.merged is True  # its original may hold part of the writes
    assert disk.overlay_node == record.disks[0].overlay_node
    assert after.paused_by_forgeqmp is False  # the guest was resumed
    commands = [s.command for s in peer.actions()]
    assert commands[0] == "block-commit"
    assert "job-complete" not in commands
    assert commands.index("stop") < commands.index("job-dismiss") < commands.index("cont")
    assert "blockdev-del" not in commands  # the overlay still holds writes: kept
    assert Path(str(record.disks[0].overlay_file)).exists()


def test_a_job_that_disappears_stops_the_commit_and_resumes_the_guest(tmp_path: Path) -> None:
    vm, peer, qemu, _ = setup(tmp_path)
    peer.script("block-commit", qemu.block_commit("ready"))
    ready = qemu.query_jobs

    def vanished_at_the_pivot(args: Any) -> list[dict[str, Any]]:
        if "stop" in peer.commands:  # paused for the switch: the job is gone
            qemu.jobs.clear()
        return ready(args)

    peer.script("query-jobs", vanished_at_the_pivot)
    with pytest.raises(
        ForgeFailed, match=f"the commit job {qemu.job_id} of disk disk0 disappeared"
    ):
        commit(vm)
    peer.check()
    after = saved(vm)
    assert after.state is State.FAILED
    assert after.failure_phase is State.COMMITTING
    assert after.error is not None
    assert "disappeared" in after.error
    assert after.next_step == "run 'forgeqmp commit' again to finish the disks still on overlays"
    assert after.disks[0].merged is True
    assert after.paused_by_forgeqmp is False
    commands = [s.command for s in peer.actions()]
    assert commands == ["block-commit", "stop", "cont"]


def test_the_deadline_leaves_the_job_running_and_the_next_commit_continues_it(
    tmp_path: Path,
) -> None:
    vm, peer, qemu, _ = setup(tmp_path)
    peer.script("block-commit", qemu.block_commit("running"))  # not ready within the deadline
    with pytest.raises(ForgeFailed, match=r"the commit deadline \(0.05 s\) passed"):
        commit(vm, timeout=0.05)
    peer.check()
    after = saved(vm)
    assert after.state is State.FAILED
    assert after.failure_phase is State.COMMITTING
    assert after.error is not None
    assert after.error.startswith("the commit deadline (0.05 s) passed")
    assert "still merging in QEMU: disk0" in after.error
    assert after.disks[0].merged is True  # the job ran: its original may hold part of the data
    # The job is left copying in QEMU (cancelling it would throw its progress away), and the
    # record names it.
    assert after.disks[0].commit_job == qemu.job_id
    assert after.next_step is not None
    assert after.next_step.startswith("the merge continues in QEMU (disk0: ")
    assert "run 'forgeqmp commit' again" in after.next_step
    assert [(s.command, s.arguments) for s in peer.actions()] == [
        ("block-commit", block_commit_args(qemu)),
    ]
    assert qemu.jobs[qemu.job_id]["status"] == "running"

    # Meanwhile the job got ready: the next commit switches the disk over without a new job.
    qemu.job("ready")
    done = commit(vm)
    peer.check()
    assert done.state is State.COMMITTED
    assert done.disks[0].overlay_node is None
    assert done.disks[0].commit_job is None
    assert [s.command for s in peer.actions()] == [
        "block-commit",  # the first commit's, only
        "stop",
        "job-complete",
        "job-dismiss",
        "cont",
        "blockdev-del",
        "blockdev-del",
    ]
    assert qemu.jobs == {}


def test_a_job_left_running_that_failed_meanwhile_is_started_again(tmp_path: Path) -> None:
    vm, peer, qemu, _ = setup(tmp_path)
    peer.script("block-commit", qemu.block_commit("running"))
    with pytest.raises(ForgeFailed, match="deadline"):
        commit(vm, timeout=0.05)
    qemu.job("concluded", "Input/output error")  # the job left running failed meanwhile
    peer.script("block-commit", qemu.block_commit("ready"))
    assert commit(vm).state is State.COMMITTED
    peer.check()
    commands = [s.command for s in peer.actions()]
    assert commands[:4] == ["block-commit", "job-dismiss", "block-commit", "stop"], commands


def test_qemu_going_away_mid_commit_is_recorded_with_its_exit(tmp_path: Path) -> None:
    vm, peer, qemu, record = setup(tmp_path, pid=DEAD_PID)
    peer.script("block-commit", qemu.block_commit("running", disconnect=True))
    with pytest.raises(ForgeFailed, match="commit stopped"):
        commit(vm)
    peer.check()
    after = saved(vm)
    assert after.state is State.FAILED
    assert after.failure_phase is State.COMMITTING
    assert after.error is not None
    assert "dropped" in after.error
    assert f"QEMU (pid {DEAD_PID}) exited" in after.error
    # QEMU could not be asked whether the job ran: the disk stays marked (discard refused).
    assert after.disks[0].merged is True
    assert after.disks[0].overlay_node == record.disks[0].overlay_node
    assert after.next_step == "run 'forgeqmp commit' again to finish the disks still on overlays"
    assert [s.command for s in peer.actions()] == ["block-commit"]


def test_a_running_block_job_refuses_the_commit_and_changes_nothing(tmp_path: Path) -> None:
    vm, peer, qemu, record = setup(tmp_path)
    qemu.jobs["backup0"] = {"id": "backup0", "type": "backup", "status": "running"}
    with pytest.raises(TaskRunning, match=r"backup0 \(backup, running\)"):
        commit(vm)
    peer.check()
    assert saved(vm) == record
    assert peer.actions() == []


class Runstate:
    """QEMU's runstate as ``stop`` and ``cont`` change it; ``stop`` answers ``late`` seconds
    after the guest paused (a caller's deadline can pass while the pause is in flight)."""

    def __init__(self, status: str = "running", *, late: float = 0.0) -> None:
        self.status = status
        self.late = late

    def query_status(self, _args: Any) -> dict[str, Any]:
        return {"status": self.status, "running": self.status == "running"}

    def stop(self, _args: Any) -> Reply:
        self.status = "paused"
        return Reply({}, late=self.late)

    def cont(self, _args: Any) -> dict[str, Any]:
        self.status = "running"
        return {}

    def script(self, peer: FakeQMP) -> None:
        peer.script("query-status", self.query_status)
        peer.script("stop", self.stop)
        peer.script("cont", self.cont)


def test_a_deadline_passing_while_the_guest_pauses_for_the_switch_resumes_it(
    tmp_path: Path,
) -> None:
    """The commit's deadline passes while ``stop`` is in flight (QEMU paused the guest, its
    answer not yet read): the switch is not cut short, the guest runs again afterwards, and as
    the deadline passed with every disk merged, the commit is finished, not failed: the
    overlay's nodes and file and the memory file are removed, the record says committed."""
    vm, peer, qemu, record = setup(tmp_path)
    guest = Runstate(late=0.5)
    guest.script(peer)
    peer.script("block-commit", qemu.block_commit("ready"))
    done = commit(vm, timeout=0.2)
    peer.check()
    assert guest.status == "running"
    commands = [s.command for s in peer.actions()]
    assert commands.index("cont") > commands.index("stop")
    assert commands[-2:] == ["blockdev-del", "blockdev-del"]  # the overlay's nodes
    assert done.state is State.COMMITTED
    assert done.paused_by_forgeqmp is False
    assert done.error is None
    assert qemu.attached == qemu.disk.device_node  # the switch went through
    assert not Path(str(record.disks[0].overlay_file)).exists()
    assert record.memory is not None
    assert not Path(record.memory.path).exists()


def test_a_deadline_passing_with_a_disk_not_merged_fails_the_commit(tmp_path: Path) -> None:
    """Two disks, the deadline passes after the first one's switch while the second's job is
    still copying: the commit fails (one disk merged, one left merging), it is not finished."""
    record = make_record(State.ACTIVE, root=tmp_path, disks=2)
    vm, peer, qemu, _ = setup(tmp_path, record=record)
    second = Qemu(record, index=1)
    guest = Runstate(late=0.3)
    guest.script(peer)
    blocks = {qemu.disk.qdev: qemu, second.disk.qdev: second}

    def block_commit(args: Any) -> Reply:
        owner = qemu if args["job-id"] == qemu.job_id else second
        return owner.block_commit("ready" if owner is qemu else "running")(args)

    peer.script("block-commit", block_commit)
    peer.script("query-block", lambda a: [b for q in blocks.values() for b in q.query_block(a)])
    peer.script("query-jobs", lambda a: qemu.query_jobs(a) + second.query_jobs(a))
    peer.script("job-complete", qemu.job_complete)
    peer.script("job-dismiss", qemu.job_dismiss)
    with pytest.raises(ForgeFailed, match="deadline"):
        commit(vm, timeout=0.2)
    after = saved(vm)
    assert after.state is State.FAILED
    assert guest.status == "running"
    assert after.disks[0].overlay_node is None  # merged
    assert after.disks[1].overlay_node is not None  # still merging in QEMU


def test_a_commit_resumes_a_guest_an_interrupted_switch_left_paused(tmp_path: Path) -> None:
    """The record says forgeqmp paused the guest (a switch cut short by a killed controller)
    and QEMU shows it paused: the next commit resumes it first, and ends with it running."""
    vm, peer, qemu, record = setup(tmp_path)
    RecordStore(StateDir(tmp_path / "state")).save(record.evolve(paused_by_forgeqmp=True))
    guest = Runstate("paused")
    guest.script(peer)
    peer.script("block-commit", qemu.block_commit("ready"))
    done = commit(vm)
    peer.check()
    assert done.state is State.COMMITTED
    assert done.paused_by_forgeqmp is False
    assert guest.status == "running"
    assert [s.command for s in peer.actions()][:2] == ["cont", "block-commit"]


def test_a_pause_that_is_not_forgeqmps_stays(tmp_path: Path) -> None:
    """A guest its owner paused (the record does not say forgeqmp did) is committed paused and
    stays paused: forgeqmp resumes only its own pauses."""
    vm, peer, qemu, _ = setup(tmp_path)
    guest = Runstate("paused")
    guest.script(peer)
    peer.script("block-commit", qemu.block_commit("ready"))
    assert commit(vm).state is State.COMMITTED
    peer.check()
    assert guest.status == "paused"
    assert "cont" not in [s.command for s in peer.actions()]
