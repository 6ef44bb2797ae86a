"""Recovery's plan as data: the QMP each tidying action sends (node removal, migration settings
reset, fdset and fd release), checked against each recorded QEMU build's schema, and the one place
that orders and runs the actions: each action type's ``order`` and ``tidying``, and the driver's
one runner per type."""

from __future__ import annotations

import typing

import attrs
import pytest
from forged import TAG, VERSIONS, accepted, features, forge

from forgeqmp.core import reconcile as rc
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.commit import disk_commit
from forgeqmp.core.plans.common import (
    MIGRATE_CANCEL,
    QUERY_FDSETS,
    QUERY_MIGRATE_CAPABILITIES,
    QUERY_MIGRATE_PARAMETERS,
    QUERY_NAMED_BLOCK_NODES,
    QUERY_STATUS,
    continue_from_pre_switchover,
    job_resume,
)
from forgeqmp.core.plans.recover import Order, remove_node, reset_migration
from forgeqmp.core.states import State
from forgeqmp.ops import recover as recover_driver

ACTIONS: tuple[type, ...] = typing.get_args(rc.Action)


def interrupted_at_the_pause(version: str) -> rc.RecoveryPlan:
    """An enable killed in its pause on ``version``: every kind of tidying is planned."""
    _, active = forge(version)
    record = attrs.evolve(active, state=State.CREATING, step="migration-started", activated_at=None)
    fdset = version != "7.2"
    qemu = rc.QemuView(
        pid=record.qemu.pid,
        runstate="finish-migrate",
        devices={d.qdev: rc.DeviceView(d.overlay_node, d.overlay_file) for d in record.disks},
        nodes=frozenset(
            n for d in record.disks for n in (d.device_node, d.overlay_node, d.overlay_file_node)
        ),
        migration="pre-switchover",
        fdsets=(3,) if fdset else (),
        capabilities={
            c: c in ("events", "pause-before-switchover")
            for c in features(version).migration_capabilities
        },
        parameters={"downtime-limit": 20, "max-bandwidth": 1 << 40},
    )
    files = {d.overlay_file: 1 << 16 for d in record.disks if d.overlay_file}
    return rc.reconcile(record, rc.Observation(qemu, files))


@pytest.mark.parametrize("version", VERSIONS)
def test_an_interrupted_enable_tidies_qemu_with_commands_the_build_accepts(version: str) -> None:
    plan = interrupted_at_the_pause(version)
    tidying = [a for a in plan.actions if a.tidying]
    sent = [c for a in tidying for c in a.commands()]
    names = [c.name for c in sent]
    assert names.count("blockdev-del") == 4  # both overlays' format and file nodes
    assert "migrate-set-capabilities" in names
    assert "migrate-set-parameters" in names
    assert ("remove-fd" in names) is (version != "7.2")
    assert ("closefd" in names) is (version == "7.2")  # the fd: transport passes it by name
    for command in sent:
        assert accepted(version, command), command
    reset = next(a for a in plan.actions if isinstance(a, rc.ResetMigration))
    assert reset.commands() == (
        Command(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": False}]},
        ),
        Command("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 128 << 20}),
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_the_plan_runs_in_the_order_its_action_types_declare(version: str) -> None:
    plan = interrupted_at_the_pause(version)
    orders = [a.order for a in plan.actions]
    assert orders == sorted(orders)
    kinds = [type(a) for a in plan.actions]
    assert kinds[0] is rc.CancelMigration
    assert kinds.index(rc.CommitBack) < kinds.index(rc.ResumeGuest) < kinds.index(rc.RemoveNode)
    assert kinds[-1] is rc.DeleteFile  # files only once what they held is merged


def test_the_order_of_every_action_type() -> None:
    assert {t: t.order for t in ACTIONS} == {
        rc.CancelMigration: Order.STOP_MIGRATION,
        rc.FinishJob: Order.MERGE,
        rc.DropJob: Order.MERGE,
        rc.CommitBack: Order.MERGE,
        rc.CommitOffline: Order.MERGE,
        rc.ResumeGuest: Order.RESUME,
        rc.RestoreThrottle: Order.RESUME,
        rc.HashMemory: Order.FINGERPRINT,
        rc.RemoveNode: Order.REMOVE_NODES,
        rc.ResetMigration: Order.TIDY_MIGRATION,
        rc.RemoveFdset: Order.TIDY_MIGRATION,
        rc.CloseFd: Order.TIDY_MIGRATION,
        rc.DeleteFile: Order.DELETE_FILES,
        rc.FinishDiscard: Order.FINISH_DISCARD,
    }
    assert max(Order) is Order.FINISH_DISCARD  # "always the last action"


def test_the_tidying_actions_are_exactly_those_that_are_only_qmp() -> None:
    tidying = {t for t in ACTIONS if t.tidying}
    assert tidying == {
        rc.RemoveNode,
        rc.ResetMigration,
        rc.RemoveFdset,
        rc.CloseFd,
        rc.RestoreThrottle,
    }
    assert tidying == {t for t in ACTIONS if hasattr(t, "commands")}


def test_the_driver_has_one_runner_per_action_type() -> None:
    runners = recover_driver._RUNNERS
    # FinishDiscard ends recover and is run by its loop; every other type has its runner.
    assert set(runners) == set(ACTIONS) - {rc.FinishDiscard}
    assert {t for t in ACTIONS if t.tidying} == {
        t for t, run in runners.items() if run is recover_driver._send_commands
    }


def test_each_tidying_action_sends_what_it_says() -> None:
    assert rc.RemoveNode("fq0-1-fmt").commands() == (
        Command("blockdev-del", {"node-name": "fq0-1-fmt"}),
    )
    assert rc.RemoveFdset(4).commands() == (Command("remove-fd", {"fdset-id": 4}),)
    assert rc.CloseFd(f"{TAG}-memory").commands() == (
        Command("closefd", {"fdname": f"{TAG}-memory"}),
    )
    assert remove_node("n") == rc.RemoveNode("n").commands()


def test_a_reset_sends_only_what_it_resets() -> None:
    assert rc.ResetMigration().commands() == ()
    assert [c.name for c in rc.ResetMigration(("multifd",)).commands()] == [
        "migrate-set-capabilities"
    ]
    only_parameters = rc.ResetMigration(parameters={"downtime-limit": 300})
    assert only_parameters.commands() == (
        Command("migrate-set-parameters", {"downtime-limit": 300}),
    )
    assert reset_migration(("mapped-ram", "multifd"), {})[0].arguments == {
        "capabilities": [
            {"capability": "mapped-ram", "state": False},
            {"capability": "multifd", "state": False},
        ]
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_what_recover_observes_and_waits_with_is_accepted_by_the_build(version: str) -> None:
    _, record = forge(version)
    job = disk_commit(record.disk("d0"))
    for command in (
        QUERY_STATUS,
        QUERY_NAMED_BLOCK_NODES,
        QUERY_FDSETS,
        QUERY_MIGRATE_CAPABILITIES,
        QUERY_MIGRATE_PARAMETERS,
        MIGRATE_CANCEL,
        continue_from_pre_switchover(),
        job_resume(job.job_id),
        job.start(),
        job.complete(),
        job.dismiss(),
    ):
        assert accepted(version, command), command
