"""Recover's decision (sans-IO): examples for the cells of the fault matrix, and properties over
generated records and observations: every plan is a legal move, never deletes a file the session
did not create nor an overlay whose writes are not merged, and is a fixed point once applied."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_schema import migration_statuses
from records import (  # tests/unit is on sys.path (rootdir-relative)
    make_disk,
    make_memory,
    make_qemu,
    make_record,
)

from forgeqmp.core.argv import active_argv, cold_argv, start_argv
from forgeqmp.core.lifecycle import status_of
from forgeqmp.core.names import session_tag
from forgeqmp.core.plans.discard import DEFAULT_MULTIFD_CHANNELS, RESTORE_MULTIFD_CHANNELS
from forgeqmp.core.reconcile import (
    ENABLE_STEPS_AFTER_SNAPSHOT,
    MIGRATION_RUNNING,
    Action,
    CancelMigration,
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
    ResumeGuest,
    Where,
    reconcile,
    stale_reason,
    where_is,
)
from forgeqmp.core.record import DiskRecord, SessionRecord
from forgeqmp.core.states import FORGE_BYPASSED, TERMINAL, Event, State, next_state
from forgeqmp.errors import PrerequisiteError

SID = "3f2a9c1e-4b7d-4e8a-9c3b-2d1e0f9a8b7c"
TAG = session_tag(SID)
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PID = 4242
MEMORY = "/state/memory-3f2a9c1e.bin"
MEMORY_SIZE = 1 << 20
SHA = "ab" * 32


def qemu_argv(n: int) -> tuple[str, ...]:
    argv = ["/usr/bin/qemu-system-x86_64", "-machine", "q35", "-m", "256"]
    for i in range(n):
        argv += [
            "-blockdev",
            f"driver=file,filename=/img/d{i}.qcow2,node-name=d{i}-file",
            "-blockdev",
            f"driver=qcow2,file=d{i}-file,node-name=d{i}-fmt",
            "-device",
            f"virtio-blk-pci,id=d{i},drive=d{i}-fmt,serial=d{i}",
        ]
    return (*argv, "-qmp", "unix:/run/vm/qmp.sock,server=on,wait=off")


def disk(i: int, **changes: Any) -> DiskRecord:
    values: dict[str, Any] = {
        "name": f"d{i}",
        "qdev": f"/machine/peripheral/d{i}/virtio-backend",
        "device_node": f"d{i}-fmt",
        "base_file": f"/img/d{i}.qcow2",
        "overlay_file": f"/img/d{i}.qcow2.forge-3f2a9c1e.qcow2",
        "merged": False,
    }
    values.update(changes)
    return make_disk(i, **values)


def record(state: State = State.ACTIVE, *, n: int = 2, **changes: Any) -> SessionRecord:
    """The shared factory's record of ``n`` disks ``d0``... that ``qemu_argv(n)`` runs."""
    values: dict[str, Any] = {
        "step": "active",
        "finished_at": None,
        "disks": tuple(disk(i) for i in range(n)),
        "memory": make_memory(
            saved=state is not State.CREATING,
            path=MEMORY,
            **({"size": MEMORY_SIZE} if state is not State.CREATING else {}),
        ),
        "qemu": make_qemu(
            pid=PID,
            argv=qemu_argv(n),
            cwd="/run/vm",
            env={"PATH": "/usr/bin"},
            machine="q35",
            qmp_socket="/run/vm/qmp.sock",
        ),
    }
    values.update(changes)
    return make_record(state, **values)


def files_of(rec: SessionRecord, *, memory: bool = True, overlays: bool = True) -> dict[str, int]:
    files: dict[str, int] = {}
    if overlays:
        files.update({d.overlay_file: 200_000 for d in rec.disks if d.overlay_file})
    if memory and rec.memory is not None:
        files[rec.memory.path] = rec.memory.size or MEMORY_SIZE
    return files


def qemu_on(
    rec: SessionRecord,
    where: Mapping[str, Where] | Where,
    *,
    pid: int = PID,
    runstate: str = "running",
    jobs: tuple[JobView, ...] = (),
    migration: str = "none",
    extra_nodes: frozenset[str] = frozenset(),
    **changes: Any,
) -> QemuView:
    devices: dict[str, DeviceView] = {}
    nodes = {n for d in rec.disks for n in (f"{d.name}-fmt", f"{d.name}-file")}
    for d in rec.disks:
        w = where if isinstance(where, Where) else where[d.name]
        if w is Where.OVERLAY:
            devices[d.qdev] = DeviceView(d.overlay_node, d.overlay_file)
            nodes |= {n for n in (d.overlay_node, d.overlay_file_node) if n}
        elif w is Where.BASE:
            devices[d.qdev] = DeviceView(d.device_node, d.base_file)
        else:
            devices[d.qdev] = DeviceView("other-fmt", "/img/other.qcow2")
    return QemuView(
        pid=pid,
        runstate=runstate,
        devices=devices,
        nodes=frozenset(nodes | extra_nodes),
        jobs=jobs,
        migration=migration,
        **changes,
    )


def kinds(plan: RecoveryPlan) -> list[type]:
    return [type(a) for a in plan.actions]


def deleted(plan: RecoveryPlan) -> set[str]:
    return {a.path for a in plan.actions if isinstance(a, DeleteFile)}


# --- examples: enable interrupted ----------------------------------------------------------------


@pytest.mark.parametrize("step", ["planned", "overlays-created"])
def test_enable_interrupted_before_the_snapshot_with_qemu_dead_just_removes_files(
    step: str,
) -> None:
    rec = record(State.CREATING, step=step)
    plan = reconcile(rec, Observation(None, files_of(rec)))
    assert plan.event is Event.RECOVERED_FAILED
    assert plan.record.rolled_back
    assert CommitOffline not in kinds(plan)  # empty overlays: nothing to merge
    assert deleted(plan) == set(files_of(rec))
    assert not plan.vm_running
    assert "start it with its original command line" in plan.next_step


def test_enable_interrupted_after_the_snapshot_with_qemu_dead_merges_before_deleting() -> None:
    rec = record(State.CREATING, step="migration-started")
    plan = reconcile(rec, Observation(None, files_of(rec)))
    assert plan.record.rolled_back
    for d in rec.disks:
        merge = plan.actions.index(CommitOffline(d.name, str(d.overlay_file)))
        delete = next(
            i
            for i, a in enumerate(plan.actions)
            if isinstance(a, DeleteFile) and a.path == d.overlay_file
        )
        assert merge < delete


def test_enable_interrupted_at_snapshot_done_with_qemu_dead_finishes_the_forge() -> None:
    rec = record(State.CREATING, step="snapshot-done")
    plan = reconcile(rec, Observation(None, files_of(rec)))
    assert plan.event is Event.RECOVERED_ACTIVE
    assert kinds(plan) == [HashMemory]
    assert not deleted(plan)
    assert "QEMU stopped" in plan.next_step


def test_enable_interrupted_at_the_pause_cancels_moves_back_and_resumes() -> None:
    rec = record(State.CREATING, step="migration-started")
    qemu = qemu_on(
        rec,
        Where.OVERLAY,
        runstate="finish-migrate",
        migration="pre-switchover",
        fdsets=(3,),
        capabilities={"events": True, "pause-before-switchover": True},
        parameters={"downtime-limit": 20, "max-bandwidth": 1 << 40},
    )
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_FAILED
    assert plan.record.rolled_back
    k = kinds(plan)
    assert k[0] is CancelMigration
    assert k.count(CommitBack) == 2
    assert k.index(CommitBack) < k.index(ResumeGuest) < k.index(RemoveNode)
    assert RemoveFdset(3) in plan.actions
    reset = next(a for a in plan.actions if isinstance(a, ResetMigration))
    assert reset.capabilities == ("pause-before-switchover",)  # "events" is left alone
    assert dict(reset.parameters) == {"downtime-limit": 300, "max-bandwidth": 128 << 20}
    assert deleted(plan) == set(files_of(rec))
    assert plan.vm_running


def test_enable_interrupted_after_the_save_completes_the_forge_live() -> None:
    rec = record(State.CREATING, step="migration-started", paused_by_forgeqmp=True)
    qemu = qemu_on(rec, Where.OVERLAY, runstate="postmigrate", migration="completed")
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_ACTIVE
    assert kinds(plan)[0] is ResumeGuest
    assert HashMemory in kinds(plan)
    assert not deleted(plan)
    assert not plan.record.paused_by_forgeqmp


def test_enable_interrupted_before_its_pause_leaves_a_guest_paused_by_someone_else() -> None:
    rec = record(State.CREATING, step="overlays-created")
    qemu = qemu_on(rec, Where.BASE, runstate="paused")
    plan = reconcile(rec, Observation(qemu, files_of(rec, memory=False)))
    assert plan.event is Event.RECOVERED_FAILED
    assert plan.record.rolled_back
    assert ResumeGuest not in kinds(plan)
    assert any("not by forgeqmp" in w for w in plan.record.warnings), plan.record.warnings


def test_enable_on_a_restarted_qemu_keeps_an_overlay_that_may_hold_writes() -> None:
    rec = record(State.CREATING, step="migration-started")
    qemu = qemu_on(rec, Where.BASE, pid=PID + 1)
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_FAILED
    assert not plan.record.rolled_back
    assert not any(a.path.endswith(".qcow2") for a in plan.actions if isinstance(a, DeleteFile))
    assert "kept" in (plan.record.error or "")


# --- examples: an Active session -----------------------------------------------------------------


def test_active_with_qemu_on_the_overlays_is_left_alone() -> None:
    rec = record()
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY), files_of(rec)))
    assert plan.event is Event.RECOVERED_ACTIVE
    assert plan.actions == ()
    assert plan.record == rec


def test_active_with_qemu_stopped_stays_active_and_says_how_to_start_it() -> None:
    rec = record()
    plan = reconcile(rec, Observation(None, files_of(rec)))
    assert plan.event is Event.RECOVERED_ACTIVE
    assert plan.actions == ()
    assert "start_argv" in plan.next_step
    assert not plan.vm_running


def test_active_restarted_on_the_originals_is_a_bypassed_forge() -> None:
    rec = record()
    plan = reconcile(rec, Observation(qemu_on(rec, Where.BASE, pid=PID + 7), files_of(rec)))
    assert plan.event is Event.RECOVERED_FAILED
    assert "bypassed" in (plan.record.error or "")
    assert "do not discard" in plan.next_step
    assert not deleted(plan)
    # The record itself bars discard from now on (not only the advice): also once QEMU runs on
    # the overlays again and recover finds the session Active.
    assert plan.record.step == FORGE_BYPASSED
    assert not status_of(plan.record).can_discard
    with pytest.raises(PrerequisiteError, match="bypassed"):
        status_of(plan.record).apply(Event.DISCARD)
    again = reconcile(plan.record, Observation(qemu_on(rec, Where.OVERLAY, pid=999), files_of(rec)))
    assert again.event is Event.RECOVERED_ACTIVE
    assert not status_of(again.record).can_discard
    with pytest.raises(PrerequisiteError, match="bypassed"):
        status_of(again.record).apply(Event.DISCARD)


def test_active_restarted_on_the_overlays_is_intact_and_records_the_new_pid() -> None:
    rec = record()
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY, pid=999), files_of(rec)))
    assert plan.event is Event.RECOVERED_ACTIVE
    assert plan.record.qemu.pid == 999


def test_active_with_a_lost_overlay_and_qemu_stopped_fails_and_keeps_the_rest() -> None:
    rec = record()
    files = files_of(rec)
    del files[str(rec.disks[0].overlay_file)]
    plan = reconcile(rec, Observation(None, files))
    assert plan.event is Event.RECOVERED_FAILED
    assert "discard" in plan.next_step
    assert not deleted(plan)


# --- examples: commit interrupted ----------------------------------------------------------------


def committing(**changes: Any) -> SessionRecord:
    return record(State.COMMITTING, step="committing", **changes)


def test_commit_interrupted_before_any_merge_is_active_again() -> None:
    rec = committing()
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY), files_of(rec)))
    assert plan.event is Event.RECOVERED_ACTIVE
    assert plan.actions == ()


def test_commit_interrupted_during_jobs_finishes_them() -> None:
    rec = committing(disks=(disk(0, merged=True), disk(1, merged=True)))
    jobs = (
        JobView(f"{TAG}-0-commit", "commit", "ready"),
        JobView(f"{TAG}-1-commit", "commit", "running"),
    )
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY, jobs=jobs), files_of(rec)))
    assert plan.event is Event.RECOVERED_COMMITTED
    assert kinds(plan)[:2] == [FinishJob, FinishJob]
    assert deleted(plan) == set(files_of(rec))  # both overlays (after the jobs) and the memory
    assert all(d.merged and d.overlay_node is None for d in plan.record.disks)


def test_stopped_commit_with_its_jobs_left_running_is_finished_by_recover() -> None:
    # A commit stopped by its deadline left the job of d0 running in QEMU (the record names it)
    # and d1 untouched: recover finishes d0's job instead of dropping it, and leaves d1 pending.
    rec = record(
        State.FAILED,
        step="committing",
        failure_phase=State.COMMITTING,
        rolled_back=False,
        error="the commit deadline (0.5 s) passed",
        disks=(disk(0, merged=True, commit_job=f"{TAG}-0-commit"), disk(1)),
    )
    jobs = (JobView(f"{TAG}-0-commit", "commit", "running"),)
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY, jobs=jobs), files_of(rec)))
    assert [a for a in plan.actions if isinstance(a, FinishJob)] == [
        FinishJob(f"{TAG}-0-commit", "d0")
    ]
    assert not [a for a in plan.actions if isinstance(a, DropJob)]
    d0, d1 = plan.record.disks
    assert d0.merged
    assert d0.overlay_node is None
    assert d0.commit_job is None
    assert not d1.merged
    assert d1.overlay_node is not None
    assert status_of(plan.record).can_commit


def test_commit_interrupted_with_a_disk_pivoted_and_one_not_started() -> None:
    rec = committing(disks=(disk(0, merged=True), disk(1, merged=True)))
    where = {"d0": Where.BASE, "d1": Where.OVERLAY}
    plan = reconcile(rec, Observation(qemu_on(rec, where), files_of(rec)))
    assert plan.event is Event.RECOVERED_FAILED
    assert plan.record.failure_phase is State.COMMITTING
    status = status_of(plan.record)
    assert status.failure is not None
    assert status.failure.merged_disks == ("d0",)
    assert status.failure.pending_disks == ("d1",)
    assert rec.disks[1].overlay_file not in deleted(plan)
    assert "commit" in plan.next_step


def test_commit_paused_for_the_pivot_resumes_the_guest() -> None:
    rec = record(
        State.COMMITTING, step="pivoting:d0", disks=(disk(0, merged=True), disk(1, merged=True))
    )
    jobs = (JobView(f"{TAG}-0-commit", "commit", "ready"),)
    qemu = qemu_on(rec, {"d0": Where.OVERLAY, "d1": Where.BASE}, runstate="paused", jobs=jobs)
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_COMMITTED
    assert ResumeGuest in kinds(plan)


def test_commit_killed_after_recording_the_pivot_resumes_the_guest() -> None:
    """Issue 12 item 3: killed after a disk's pivot recorded ``committing`` and before ``cont``;
    the step names no pause, but the record said beforehand that forgeqmp was pausing."""
    rec = record(
        State.COMMITTING,
        step="committing",
        paused_by_forgeqmp=True,
        disks=(
            disk(0, merged=True, overlay_node=None, overlay_file_node=None),
            disk(1, merged=True, overlay_node=None, overlay_file_node=None),
        ),
    )
    qemu = qemu_on(rec, Where.BASE, runstate="paused")
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_COMMITTED
    assert ResumeGuest in kinds(plan)
    assert plan.vm_running
    assert not plan.record.paused_by_forgeqmp
    assert not plan.record.warnings


@pytest.mark.parametrize(
    ("runstate", "words"),
    [("paused", "not by forgeqmp"), ("io-error", "free space"), ("guest-panicked", "panicked")],
)
def test_commit_killed_before_pausing_leaves_a_guest_stopped_by_another_cause(
    runstate: str, words: str
) -> None:
    rec = committing()
    qemu = qemu_on(rec, Where.OVERLAY, runstate=runstate)
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_ACTIVE
    assert ResumeGuest not in kinds(plan)
    assert not plan.vm_running
    assert any(words in w and runstate in w for w in plan.record.warnings), plan.record.warnings
    # and status shows it
    assert any(words in w for w in plan.record.status_dict()["warnings"])


def test_a_finished_session_resumes_a_guest_it_left_paused() -> None:
    rec = record(
        State.COMMITTED,
        step="committed",
        paused_by_forgeqmp=True,
        disks=(disk(0, merged=True, overlay_node=None, overlay_file_node=None),),
        n=1,
    )
    qemu = qemu_on(rec, Where.BASE, runstate="paused")
    plan = reconcile(rec, Observation(qemu, {}))
    assert plan.event is None
    assert plan.actions == (ResumeGuest(),)
    assert not plan.record.paused_by_forgeqmp
    elsewhere = reconcile(rec, Observation(attrs.evolve(qemu, pid=PID + 1), {}))
    assert elsewhere.actions == ()  # another QEMU's pause is not ours


def test_commit_with_qemu_dead_leaves_pending_disks_for_an_offline_commit() -> None:
    rec = committing(
        disks=(
            disk(0, merged=True, overlay_node=None, overlay_file_node=None),
            disk(1, merged=True),
        )
    )
    files = files_of(rec)
    plan = reconcile(rec, Observation(None, files))
    assert plan.event is Event.RECOVERED_FAILED
    assert "offline" in plan.next_step
    assert rec.disks[1].overlay_file not in deleted(plan)
    assert rec.disks[0].overlay_file in deleted(plan)


def test_commit_with_qemu_dead_and_merged_overlay_gone_is_committed() -> None:
    rec = committing(disks=(disk(0, merged=True),))
    plan = reconcile(rec, Observation(None, files_of(rec, overlays=False)))
    assert plan.event is Event.RECOVERED_COMMITTED
    assert "stopped" in plan.next_step


# --- examples: discard interrupted ---------------------------------------------------------------


def test_discard_interrupted_before_quit_is_active_again() -> None:
    rec = record(State.DISCARDING, step="stopping-qemu")
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY), files_of(rec)))
    assert plan.event is Event.RECOVERED_ACTIVE
    assert plan.actions == ()


@pytest.mark.parametrize("step", ["stopping-qemu", "qemu-stopped"])
def test_discard_with_qemu_gone_is_finished(step: str) -> None:
    rec = record(State.DISCARDING, step=step)
    plan = reconcile(rec, Observation(None, files_of(rec)))
    assert plan.event is Event.RECOVERED_DISCARDED
    assert plan.actions == (FinishDiscard(),)


@pytest.mark.parametrize("runstate", ["inmigrate", "paused", "prelaunch"])
def test_discard_with_an_incoming_qemu_not_yet_running_is_finished(runstate: str) -> None:
    rec = record(State.DISCARDING, step="qemu-stopped")
    qemu = qemu_on(rec, Where.BASE, pid=PID + 1, runstate=runstate, migration="completed")
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.actions == (FinishDiscard(),)


@pytest.mark.parametrize(("migration", "restored"), [("completed", True), ("none", False)])
def test_discard_with_the_new_qemu_running_is_discarded(migration: str, restored: bool) -> None:
    rec = record(State.DISCARDING, step="qemu-stopped")
    qemu = qemu_on(rec, Where.BASE, pid=PID + 1, migration=migration)
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_DISCARDED
    assert plan.record.memory_restored is restored
    assert deleted(plan) == set(files_of(rec))


def test_discard_interrupted_after_the_resume_gives_back_what_the_restore_borrowed() -> None:
    # Killed between cont and the restore's cleanup: the new QEMU still holds the fdset of the
    # memory file and runs with the load's capabilities on; recover removes and turns them off.
    rec = record(State.DISCARDING, step="qemu-stopped")
    memory = attrs.evolve(rec.memory, capabilities=("events", "multifd", "mapped-ram"))
    rec = attrs.evolve(rec, memory=memory)
    on = {"events": True, "multifd": True, "mapped-ram": True, "pause-before-switchover": False}
    qemu = qemu_on(
        rec, Where.BASE, pid=PID + 1, migration="completed", fdsets=(4,), capabilities=on
    )
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_DISCARDED
    assert plan.record.memory_restored is True
    assert RemoveFdset(4) in plan.actions
    assert ResetMigration(("mapped-ram", "multifd")) in plan.actions
    assert deleted(plan) == set(files_of(rec))
    # A clean new QEMU (the cleanup had run) gets nothing; one migrating (someone else's
    # migration) keeps its settings.
    clean = attrs.evolve(qemu, fdsets=(), capabilities={"events": True})
    assert not {type(a) for a in reconcile(rec, Observation(clean, files_of(rec))).actions} & {
        RemoveFdset,
        ResetMigration,
    }
    migrating = attrs.evolve(qemu, migration="active")
    assert not {type(a) for a in reconcile(rec, Observation(migrating, files_of(rec))).actions} & {
        RemoveFdset,
        ResetMigration,
    }


def test_recover_sets_the_restores_multifd_channels_back_to_qemus_default() -> None:
    # Killed between cont and the cleanup of a mapped-ram load: the new QEMU still has the
    # load's 32 channels (even when the capabilities were already turned off); recover sets
    # QEMU's default back. Another count is the platform's: left alone, as on a precopy load.
    rec = record(State.DISCARDING, step="qemu-stopped")
    memory = attrs.evolve(rec.memory, capabilities=("events", "multifd", "mapped-ram"))
    mapped = attrs.evolve(rec, memory=memory)
    on = {"events": True, "multifd": True, "mapped-ram": True}
    qemu = qemu_on(
        mapped,
        Where.BASE,
        pid=PID + 1,
        migration="completed",
        capabilities=on,
        parameters={"multifd-channels": RESTORE_MULTIFD_CHANNELS},
    )
    reset = {"multifd-channels": DEFAULT_MULTIFD_CHANNELS}
    plan = reconcile(mapped, Observation(qemu, files_of(mapped)))
    assert ResetMigration(("mapped-ram", "multifd"), reset) in plan.actions
    caps_off = attrs.evolve(qemu, capabilities={"events": True})
    plan = reconcile(mapped, Observation(caps_off, files_of(mapped)))
    assert ResetMigration((), reset) in plan.actions
    platforms = attrs.evolve(caps_off, parameters={"multifd-channels": 8})
    plan = reconcile(mapped, Observation(platforms, files_of(mapped)))
    assert not [a for a in plan.actions if isinstance(a, ResetMigration)]
    precopy = attrs.evolve(rec, memory=attrs.evolve(rec.memory, capabilities=("events",)))
    plan = reconcile(precopy, Observation(caps_off, files_of(precopy)))
    assert not [a for a in plan.actions if isinstance(a, ResetMigration)]


def test_failed_discard_with_qemu_still_stopped_is_left_as_it_is() -> None:
    rec = record(
        State.FAILED,
        step="qemu-stopped",
        failure_phase=State.DISCARDING,
        error="discard could not start the VM: boom",
        next_step="start it with ...",
    )
    plan = reconcile(rec, Observation(None, files_of(rec)))
    assert plan.event is Event.RECOVERED_FAILED
    assert plan.actions == ()
    assert plan.record == rec


# --- examples: finished sessions and stale status ------------------------------------------------


@pytest.mark.parametrize("state", [State.COMMITTED, State.DISCARDED])
def test_finished_sessions_need_nothing(state: State) -> None:
    rec = record(state, step=state.value)
    plan = reconcile(rec, Observation(None, {}))
    assert plan.event is None
    assert plan.actions == ()
    assert plan.record == rec


def test_stale_reason() -> None:
    rec = record(State.COMMITTING, step="committing")
    assert stale_reason(rec, lock_held=True) is None
    assert stale_reason(rec, lock_held=None) is None
    reason = stale_reason(rec, lock_held=False, qemu_alive=False)
    assert reason is not None
    assert "recover" in reason
    assert "QEMU is not running" in reason
    assert stale_reason(record(), lock_held=False) is None


# --- power: the argv that keeps the forge --------------------------------------------------------


def test_active_argv_puts_each_pending_disk_on_its_overlay() -> None:
    rec = record(disks=(disk(0), disk(1, merged=True, overlay_node=None, overlay_file_node=None)))
    argv = active_argv(rec)
    text = " ".join(argv)
    assert f"virtio-blk-pci,id=d0,drive={TAG}-0-fmt,serial=d0" in argv
    assert "virtio-blk-pci,id=d1,drive=d1-fmt,serial=d1" in argv
    assert f"driver=qcow2,file={TAG}-0-file,backing=d0-fmt,node-name={TAG}-0-fmt" in argv
    assert f"filename={rec.disks[0].overlay_file}" in text
    assert "/img/d1.qcow2.forge" not in text
    # The originals' nodes stay defined: the overlay's backing and the commit's base.
    assert "driver=qcow2,file=d0-file,node-name=d0-fmt" in argv


def test_active_argv_escapes_commas_and_handles_json_devices() -> None:
    rec = record(n=1, disks=(disk(0, overlay_file="/img/a,b.qcow2"),))
    argv = list(rec.qemu.argv)
    argv[argv.index("virtio-blk-pci,id=d0,drive=d0-fmt,serial=d0")] = (
        '{"driver": "virtio-blk-pci", "id": "d0", "drive": "d0-fmt"}'
    )
    rec = rec.evolve(qemu=attrs.evolve(rec.qemu, argv=tuple(argv)))
    out = active_argv(rec)
    assert "driver=file,filename=/img/a,,b.qcow2,node-name=" + f"{TAG}-0-file" in out
    assert any(f'"drive":"{TAG}-0-fmt"' in a for a in out)


def test_active_argv_refuses_a_drive_configuration() -> None:
    rec = record(n=1)
    argv = ("/usr/bin/qemu-system-x86_64", "-drive", "file=/img/d0.qcow2,if=virtio")
    rec = rec.evolve(qemu=attrs.evolve(rec.qemu, argv=argv))
    with pytest.raises(Exception, match="-blockdev"):
        active_argv(rec)


def test_start_argv_follows_the_session() -> None:
    assert start_argv(record()) == active_argv(record())
    done = record(State.COMMITTED, step="committed")
    assert start_argv(done) == cold_argv(done.qemu.argv)
    with pytest.raises(Exception, match="recover"):
        start_argv(record(State.DISCARDING, step="stopping-qemu"))


# --- properties ----------------------------------------------------------------------------------

ENABLE_STEPS = ("planned", "overlays-created", "migration-started", "snapshot-done")
RUNSTATES = (
    "running",
    "paused",
    "postmigrate",
    "finish-migrate",
    "inmigrate",
    "prelaunch",
    "io-error",
)
JOB_STATES = ("running", "ready", "concluded", "paused", "pending", "aborting")
#: Every migration status of QEMU's schema (every recorded build), not a hand-picked few.
MIGRATIONS = migration_statuses()


@st.composite
def records(draw: st.DrawFn) -> SessionRecord:
    n = draw(st.integers(1, 3))
    state = draw(st.sampled_from(list(State)))
    phase = draw(
        st.sampled_from([State.CREATING, State.ACTIVE, State.COMMITTING, State.DISCARDING])
    )
    effective = phase if state is State.FAILED else state
    disks = []
    for i in range(n):
        merged = effective in (State.COMMITTING, State.COMMITTED) and draw(st.booleans())
        gone = (merged and draw(st.booleans())) or state is State.COMMITTED
        if effective is State.CREATING and draw(st.booleans()):
            gone = True  # moved back off its overlay by an undo
        if state is State.COMMITTED:
            merged = True
        disks.append(
            disk(
                i,
                merged=merged,
                overlay_node=None if gone else f"{TAG}-{i}-fmt",
                overlay_file_node=None if gone else f"{TAG}-{i}-file",
            )
        )
    step = {
        State.CREATING: draw(st.sampled_from(ENABLE_STEPS)),
        State.ACTIVE: "active",
        State.COMMITTING: draw(st.sampled_from(["committing", "pivoting:d0"])),
        State.DISCARDING: draw(st.sampled_from(["stopping-qemu", "qemu-stopped"])),
        State.COMMITTED: "committed",
        State.DISCARDED: "discarded",
    }[effective]
    rolled_back = state is State.FAILED and phase is State.CREATING and draw(st.booleans())
    base = record(
        State.ACTIVE if effective is State.CREATING else state, n=n
    )  # memory digest present unless creating
    memory = base.memory
    if effective is State.CREATING:
        memory = record(State.CREATING, n=n).memory
    return attrs.evolve(  # test data of any state (the code moves a record by events only)
        base,
        state=state,
        step=step,
        disks=tuple(disks),
        memory=memory,
        failure_phase=phase if state is State.FAILED else None,
        rolled_back=rolled_back,
        error="it failed" if state is State.FAILED else None,
        next_step="do something" if state is State.FAILED else None,
        memory_restored=draw(st.sampled_from([None, True, False]))
        if effective is State.DISCARDING
        else None,
        paused_by_forgeqmp=draw(st.booleans()),
    )


@st.composite
def observations(draw: st.DrawFn, rec: SessionRecord) -> Observation:
    files: dict[str, int] = {}
    for d in rec.disks:
        if d.overlay_file and draw(st.booleans()):
            files[d.overlay_file] = draw(st.sampled_from([0, 200_000]))
    if rec.memory is not None and draw(st.booleans()):
        files[rec.memory.path] = draw(st.sampled_from([0, 7, rec.memory.size or MEMORY_SIZE]))
    if not draw(st.booleans()):
        return Observation(None, files)
    where = {
        # A device can only be on an overlay node the record still names.
        d.name: draw(
            st.sampled_from([Where.OVERLAY, Where.BASE, Where.OTHER])
            if d.overlay_node
            else st.sampled_from([Where.BASE, Where.OTHER])
        )
        for d in rec.disks
    }
    jobs = []
    for i, _d in enumerate(rec.disks):
        if draw(st.booleans()):
            suffix = draw(st.sampled_from(["commit", "create", "create-undo"]))
            kind = "create" if suffix == "create" else "commit"
            jobs.append(JobView(f"{TAG}-{i}-{suffix}", kind, draw(st.sampled_from(JOB_STATES))))
    extra = draw(st.sets(st.sampled_from([f"{TAG}-9-fmt", f"{TAG}-9-file", "other-node"])))
    qemu = qemu_on(
        rec,
        where,
        pid=draw(st.sampled_from([PID, PID + 1])),
        runstate=draw(st.sampled_from(RUNSTATES)),
        jobs=tuple(jobs),
        migration=draw(st.sampled_from(MIGRATIONS)),
        extra_nodes=frozenset(extra),
        fdsets=tuple(draw(st.sets(st.integers(0, 3)))),
        capabilities={"events": True, "pause-before-switchover": draw(st.booleans())},
        parameters={"downtime-limit": draw(st.sampled_from([20, 300]))},
    )
    # Overlay nodes of a disk whose overlay is gone from the record may linger in QEMU.
    return Observation(qemu, files)


@st.composite
def cases(draw: st.DrawFn) -> tuple[SessionRecord, Observation]:
    rec = draw(records())
    try:
        status_of(rec)
    except Exception:  # a combination no driver writes (e.g. a rolled-back failure with merges)
        rec = record()
    return rec, draw(observations(rec))


def recorded_files(rec: SessionRecord) -> set[str]:
    files = {d.overlay_file for d in rec.disks if d.overlay_file}
    if rec.memory is not None:
        files.add(rec.memory.path)
    return files


MERGES = (FinishJob, CommitBack, CommitOffline)


def merged_before(plan: RecoveryPlan, disk_name: str, index: int) -> bool:
    return any(isinstance(a, MERGES) and a.disk == disk_name for a in plan.actions[:index])


HELD = ("paused", "postmigrate", "finish-migrate")

SETTINGS = settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(cases())
def test_every_plan_is_a_legal_move_to_a_valid_record(
    case: tuple[SessionRecord, Observation],
) -> None:
    rec, obs = case
    plan = reconcile(rec, obs)
    after = status_of(plan.record)  # the record is valid and describes a status
    assert not plan.record.paused_by_forgeqmp  # recover resumes what forgeqmp paused
    if plan.event is None:
        assert rec.state in TERMINAL or rec.rolled_back
        assert plan.actions in ((), (ResumeGuest(),))
        return
    assert next_state(rec.state, plan.event) is plan.record.state
    status_of(rec).apply(plan.event, after.failure)  # the full guard, with merged disks
    assert plan.record.state not in (State.CREATING, State.COMMITTING, State.DISCARDING)
    assert plan.record.session_id == rec.session_id


@SETTINGS
@given(cases())
def test_no_file_outside_the_record_and_no_unmerged_overlay_is_deleted(
    case: tuple[SessionRecord, Observation],
) -> None:
    rec, obs = case
    plan = reconcile(rec, obs)
    mine = recorded_files(rec)
    for index, action in enumerate(plan.actions):
        if not isinstance(action, DeleteFile):
            continue
        assert action.path in mine
        assert action.path in obs.files  # only what exists
        if rec.memory is not None and action.path == rec.memory.path:
            # The memory file goes only when no discard can need it any more.
            assert plan.record.state is not State.ACTIVE
            assert (
                plan.record.state in TERMINAL
                or plan.record.failure_phase is State.CREATING  # an enable that never finished
                or any(d.merged for d in plan.record.disks)
            )
            continue
        d = next(d for d in rec.disks if d.overlay_file == action.path)
        where = where_is(d, obs.qemu)
        safe = (
            plan.record.state is State.DISCARDED  # a discard abandons the overlays by design
            or merged_before(plan, d.name, index)  # merged into the original first
            or (
                d.merged
                and (d.overlay_node is None or where is Where.BASE or where is Where.UNKNOWN)
            )
            or (
                rec.state in (State.CREATING, State.FAILED)
                and (rec.failure_phase in (None, State.CREATING))
                and (
                    rec.step not in ENABLE_STEPS_AFTER_SNAPSHOT  # never written into
                    or d.overlay_node is None  # the undo already moved it back
                    or where is Where.BASE
                )
                and where is not Where.OVERLAY
            )
        )
        assert safe, (action, rec.state, rec.step, where, d)
    assert plan.record.state is not State.ACTIVE or not (deleted(plan) & recorded_files(rec))


def simulate(
    rec: SessionRecord, obs: Observation, plan: RecoveryPlan
) -> tuple[SessionRecord, Observation]:
    """What the driver and QEMU make of the plan: the record it saves and what is then true."""
    files = dict(obs.files)
    qemu = obs.qemu
    new = plan.record
    for action in plan.actions:
        if isinstance(action, DeleteFile):
            files.pop(action.path, None)
        if isinstance(action, HashMemory) and new.memory is not None:
            size = files.get(action.path, 0)
            new = new.evolve(memory=attrs.evolve(new.memory, sha256=SHA, size=size))
        if isinstance(action, FinishDiscard):
            for path in recorded_files(rec):
                files.pop(path, None)
            new = new.evolve(memory_restored=True)
            qemu = qemu_on(rec, Where.BASE, pid=PID + 5, migration="completed")
        if qemu is None:
            continue
        devices = dict(qemu.devices)
        jobs = list(qemu.jobs)
        nodes = set(qemu.nodes)
        changes: dict[str, Any] = {}
        if isinstance(action, CancelMigration):
            changes["migration"] = "cancelled"
        elif isinstance(action, FinishJob | CommitBack):
            d = rec.disk(action.disk)
            devices[d.qdev] = DeviceView(d.device_node, d.base_file)
            jobs = [
                j for j in jobs if not (isinstance(action, FinishJob) and j.id == action.job_id)
            ]
        elif isinstance(action, DropJob):
            jobs = [j for j in jobs if j.id != action.job_id]
        elif isinstance(action, RemoveNode):
            nodes.discard(action.node)
        elif isinstance(action, ResumeGuest):
            changes["runstate"] = "running"
        elif isinstance(action, ResetMigration):
            caps = dict(qemu.capabilities)
            caps.update({c: False for c in action.capabilities})
            params = dict(qemu.parameters)
            params.update(action.parameters)
            changes.update(capabilities=caps, parameters=params)
        elif isinstance(action, RemoveFdset):
            changes["fdsets"] = tuple(f for f in qemu.fdsets if f != action.fdset_id)
        qemu = attrs.evolve(
            qemu, devices=devices, jobs=tuple(jobs), nodes=frozenset(nodes), **changes
        )
    return new, Observation(qemu, files)


@SETTINGS
@given(cases())
def test_recover_is_idempotent(case: tuple[SessionRecord, Observation]) -> None:
    rec, obs = case
    plan = reconcile(rec, obs)
    new, after = simulate(rec, obs, plan)
    again = reconcile(new, after)
    assert again.actions == (), (plan.describe(), again.describe())
    assert again.record == new, (plan.describe(), again.describe())


@SETTINGS
@given(cases())
def test_resume_and_finish_discard_only_for_our_own_operations(
    case: tuple[SessionRecord, Observation],
) -> None:
    rec, obs = case
    plan = reconcile(rec, obs)
    phase = rec.failure_phase if rec.state is State.FAILED else rec.state
    if FinishDiscard() in plan.actions:
        assert rec.state is State.DISCARDING
        assert plan.actions[-1] == FinishDiscard()
    qemu = obs.qemu
    held = qemu is not None and qemu.pid == rec.qemu.pid and qemu.runstate in HELD
    ours = held and (rec.paused_by_forgeqmp or rec.step.startswith("pivoting"))
    if ours:  # a guest forgeqmp paused runs again, whatever the state and step
        assert ResumeGuest() in plan.actions or FinishDiscard() in plan.actions
    if ResumeGuest() in plan.actions:
        assert qemu is not None
        assert qemu.pid == rec.qemu.pid
        # a guest paused by someone else is left so (a save of ours still running: let go)
        assert ours or (
            phase is State.CREATING and qemu.migration in MIGRATION_RUNNING and not rec.rolled_back
        ), (plan.describe(), qemu.runstate)


def test_every_action_says_what_it_does() -> None:
    actions: list[Action] = [
        CancelMigration(),
        FinishJob("j", "d0"),
        DropJob("j"),
        CommitBack("d0", "t", "b", "j"),
        CommitOffline("d0", "/o"),
        RemoveNode("n"),
        ResumeGuest(),
        ResetMigration(),
        RemoveFdset(1),
        DeleteFile("/o", "why"),
        HashMemory("/m"),
        FinishDiscard(),
    ]
    for action in actions:
        assert action.describe()
