"""What recovery sees: :func:`forgeqmp.ops.recover.observe` turns QEMU's QMP answers into an
:class:`~forgeqmp.core.reconcile.Observation`, and :func:`~forgeqmp.core.reconcile.reconcile` acts on it. Every
migration status QEMU's schema defines (read from the recorded schemas of every supported build,
not written down here) must be observed as it is and classified: still running (recover cancels
it) or ended."""

from __future__ import annotations

import types
from typing import Any

import anyio
import pytest
from fakeqmp import FakeQMP  # tests/unit is on sys.path
from qemu_schema import migration_statuses  # tests/unit is on sys.path (rootdir-relative)
from test_recover import PID, SID, files_of, qemu_on, record

from forgeqmp.core.names import fdset_opaque
from forgeqmp.core.reconcile import (
    MIGRATION_RUNNING,
    CancelMigration,
    DeviceView,
    JobView,
    Observation,
    ResumeGuest,
    reconcile,
)
from forgeqmp.core.states import Event, State
from forgeqmp.ops.recover import observe

STATUSES = migration_statuses()
#: The statuses of a migration that is over (or never was).
ENDED = frozenset({"none", "completed", "failed", "cancelled"})


def replies(migrate: dict[str, Any], *, runstate: str = "running") -> dict[str, Any]:
    rec = record()
    blocks: list[dict[str, Any]] = [
        {"qdev": d.qdev, "inserted": {"node-name": d.overlay_node, "file": d.overlay_file}}
        for d in rec.disks
    ]
    blocks += [
        {"qdev": "/machine/peripheral/cd/device", "inserted": {"node-name": "cd", "file": "/x"}},
        {"qdev": "", "removable": True},
    ]
    return {
        "query-status": {"status": runstate, "running": runstate == "running"},
        "query-block": blocks,
        "query-named-block-nodes": [
            {"node-name": n} for d in rec.disks for n in (d.overlay_node, d.device_node)
        ]
        + [{"node-name": ""}],
        "query-jobs": [
            {"id": "j1", "type": "commit", "status": "ready", "error": None},
            {"id": "j2", "type": "mirror", "status": "concluded", "error": "No space left"},
        ],
        "query-migrate": migrate,
        "query-fdsets": [
            {"fdset-id": 3, "fds": [{"fd": 30, "opaque": fdset_opaque(SID)}]},
            {"fdset-id": 4, "fds": [{"fd": 31, "opaque": "someone else's"}]},
        ],
        "query-migrate-capabilities": [
            {"capability": "events", "state": True},
            {"capability": "pause-before-switchover", "state": False},
        ],
        "query-migrate-parameters": {"downtime-limit": 20, "max-bandwidth": 1 << 30, "tls": ""},
    }


def observed(answers: dict[str, Any]) -> Observation:
    # Connected already: a reconnect is a command the fake was not scripted for.
    conn = FakeQMP(answers, pid=PID, socket_path="/run/vm/qmp.sock")
    instance = types.SimpleNamespace(conn=conn)
    obs: Observation = anyio.run(observe, instance, record(), backend="asyncio")  # type: ignore[arg-type]
    conn.check()
    return obs


def test_the_schemas_define_the_fifteen_statuses_we_know() -> None:
    # Derived from the schemas: a new QEMU build with new statuses makes this list grow, and the
    # classification test below then fails until recover knows them.
    assert len(STATUSES) >= 15
    assert {"none", "setup", "active", "pre-switchover", "completed", "failed"} <= set(STATUSES)


@pytest.mark.parametrize("status", STATUSES)
def test_every_migration_status_is_classified(status: str) -> None:
    assert (status in MIGRATION_RUNNING) != (status in ENDED), status


def test_no_status_recover_knows_is_invented() -> None:
    assert set(MIGRATION_RUNNING) <= set(STATUSES)


@pytest.mark.parametrize("status", STATUSES)
def test_observe_reports_the_migration_status_as_qemu_gives_it(status: str) -> None:
    obs = observed(replies({"status": status}))
    assert obs.qemu is not None
    assert obs.qemu.migration == status


def test_a_qemu_that_never_migrated_has_migration_none() -> None:
    obs = observed(replies({}))  # query-migrate answers {} before any migration
    assert obs.qemu is not None
    assert obs.qemu.migration == "none"


def test_observe_keeps_only_what_belongs_to_the_session() -> None:
    obs = observed(replies({"status": "active"}, runstate="finish-migrate"))
    qemu = obs.qemu
    assert qemu is not None
    rec = record()
    assert qemu.pid == PID
    assert qemu.runstate == "finish-migrate"
    assert dict(qemu.devices) == {
        d.qdev: DeviceView(str(d.overlay_node), str(d.overlay_file)) for d in rec.disks
    }  # the CD-ROM and the empty drive are not the session's
    assert "" not in qemu.nodes
    assert {str(d.overlay_node) for d in rec.disks} <= qemu.nodes
    assert qemu.jobs == (
        JobView("j1", "commit", "ready", None),
        JobView("j2", "mirror", "concluded", "No space left"),
    )
    assert qemu.fdsets == (3,)  # only the fdset whose opaque names this session
    assert dict(qemu.capabilities) == {"events": True, "pause-before-switchover": False}
    assert dict(qemu.parameters) == {"downtime-limit": 20, "max-bandwidth": 1 << 30}
    assert obs.files == {}  # none of the recorded files exists here


@pytest.mark.parametrize("status", STATUSES)
def test_an_interrupted_enable_cancels_a_running_migration_and_only_that(status: str) -> None:
    # Enable records that it may pause the guest (paused_by_forgeqmp) with migration-started.
    rec = record(State.CREATING, step="migration-started", paused_by_forgeqmp=True)
    qemu = qemu_on(rec, {d.name: _base() for d in rec.disks}, migration=status, runstate="paused")
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    assert plan.event is Event.RECOVERED_FAILED
    assert plan.record.rolled_back
    assert (CancelMigration() in plan.actions) is (status in MIGRATION_RUNNING), plan.actions
    assert ResumeGuest() in plan.actions  # a guest forgeqmp paused never stays paused
    # Paused without forgeqmp saying it would pause it, and no save of ours running (that one
    # recover cancels, and lets the guest go): someone else paused it; left so, and said.
    rec = record(State.CREATING, step="migration-started", paused_by_forgeqmp=False)
    plan = reconcile(rec, Observation(qemu, files_of(rec)))
    if status not in MIGRATION_RUNNING:
        assert ResumeGuest() not in plan.actions
        assert any("paused by someone else" in w for w in plan.record.warnings), plan.record
    else:
        assert ResumeGuest() in plan.actions


def _base() -> Any:
    from forgeqmp.core.reconcile import Where

    return Where.BASE
