"""The enable plan is pure data: which QMP commands, with which arguments, for each strategy and
each QEMU (recorded introspection of 7.2 and 10.0)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from forgeqmp.core.argv import cold_argv, incoming_argv
from forgeqmp.core.disks import disks_from_query, select_disks
from forgeqmp.core.features import Features, features_from_introspection
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.enable import (
    CONVERGENCE_STEPS,
    DOWNTIME_LIMIT_MS,
    ConvergenceStep,
    Strategy,
    Transport,
    choose_strategy,
    default_strategy,
    overlays_attached,
    plan_enable,
    save_capabilities,
)
from forgeqmp.errors import FeatureMissing

DATA = Path(__file__).parent.parent / "data"
SID = "0123abcd-0000-4000-8000-000000000000"


def load(name: str) -> dict[str, Any]:
    with gzip.open(DATA / name, "rt") as f:
        result: dict[str, Any] = json.load(f)
    return result


def features(version: str) -> Features:
    d = load(f"qemu-{version}.json.gz")
    return features_from_introspection(d["version"], d["schema"], d["migrate_capabilities"])


def selection(version: str, **kw: Any):  # type: ignore[no-untyped-def]
    data = load(f"qemu-{version}-blockinfo.json.gz")
    return select_disks(disks_from_query(data["query-block"]), **kw)


def test_default_strategy_is_mapped_ram_with_the_file_transport_on_10() -> None:
    assert default_strategy(features("10.0")) is Strategy.MAPPED_RAM
    assert choose_strategy(features("10.0")) == (Strategy.MAPPED_RAM, Transport.FDSET_FILE)


@pytest.mark.parametrize(
    "without",
    [
        {"capabilities": {"mapped-ram"}},
        {"capabilities": {"multifd"}},
        {"capabilities": {"pause-before-switchover"}},
        {"statuses": {"pre-switchover"}},
        {"commands": {"migrate-continue"}},
        {"transports": {"file"}},
        {"commands": {"add-fd"}},
        {"commands": {"remove-fd"}},
    ],
    ids=lambda w: "-".join(f"{k}:{','.join(sorted(v))}" for k, v in w.items()),
)
def test_default_strategy_is_precopy_without_any_of_what_mapped_ram_needs(
    without: dict[str, set[str]],
) -> None:
    f = features("10.0")
    lacking = Features(
        version=f.version,
        commands=f.commands - without.get("commands", set()),
        migration_capabilities=f.migration_capabilities - without.get("capabilities", set()),
        migration_transports=f.migration_transports - without.get("transports", set()),
        migration_parameters=f.migration_parameters,
        migration_statuses=f.migration_statuses - without.get("statuses", set()),
        transaction_actions=f.transaction_actions,
    )
    assert default_strategy(lacking) is Strategy.PRECOPY


def test_default_strategy_is_precopy_with_the_fd_transport_on_72() -> None:
    assert default_strategy(features("7.2")) is Strategy.PRECOPY
    assert choose_strategy(features("7.2")) == (Strategy.PRECOPY, Transport.FD)


def test_mapped_ram_needs_the_file_transport() -> None:
    assert choose_strategy(features("10.0"), Strategy.MAPPED_RAM)[0] is Strategy.MAPPED_RAM
    with pytest.raises(FeatureMissing, match="mapped-ram"):
        choose_strategy(features("7.2"), Strategy.MAPPED_RAM)


def test_background_snapshot_is_offered_on_both() -> None:
    for version in ("7.2", "10.0"):
        strategy, _ = choose_strategy(features(version), Strategy.BACKGROUND_SNAPSHOT)
        assert strategy is Strategy.BACKGROUND_SNAPSHOT


def test_missing_pause_before_switchover_is_refused_with_what_is_missing() -> None:
    f = features("10.0")
    lacking = Features(
        version=f.version,
        commands=f.commands,
        migration_capabilities=f.migration_capabilities - {"pause-before-switchover"},
        migration_transports=f.migration_transports,
        migration_parameters=f.migration_parameters,
        migration_statuses=f.migration_statuses,
        transaction_actions=f.transaction_actions,
    )
    with pytest.raises(FeatureMissing, match="pause-before-switchover") as info:
        choose_strategy(lacking)
    assert info.value.exit_code == 3


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_plan_for_two_disks(version: str, tmp_path: Path) -> None:
    plan = plan_enable(
        session_id=SID,
        selection=selection(version, all_disks=True),
        features=features(version),
        memory_file=str(tmp_path / "mem"),
    )
    assert [o.disk.name for o in plan.overlays] == ["d0", "d1"]
    d0, d1 = plan.overlays
    assert d0.overlay_file == "/tmp/fq2/d0.qcow2.forge-0123abcd.qcow2"
    assert d0.format_node == "fq0123abcd-0-fmt"
    assert len(d0.format_node) <= 31
    assert len(d0.create_job) <= 31
    assert d0.add_file_node().arguments == {
        "driver": "file",
        "node-name": "fq0123abcd-0-file",
        "filename": d0.overlay_file,
    }
    create = d1.create_image().arguments["options"]
    assert create["backing-file"] == "/tmp/fq2/d1.raw"
    assert create["backing-fmt"] == "raw"
    assert create["size"] == 32 * 1024 * 1024
    assert d0.add_format_node().arguments["backing"] is None
    txn = plan.transaction()
    assert txn.name == "transaction"
    assert txn.arguments["actions"] == [
        {"type": "blockdev-snapshot", "data": {"node": "d0-fmt", "overlay": "fq0123abcd-0-fmt"}},
        {"type": "blockdev-snapshot", "data": {"node": "d1-fmt", "overlay": "fq0123abcd-1-fmt"}},
    ]
    on = {name for name, state in plan.capabilities.items() if state}
    default = {"10.0": {"multifd", "mapped-ram"}, "7.2": set()}[version]
    assert on == {"events", "pause-before-switchover", *default}
    # Every other capability QEMU knows is turned off for the save (see save_capabilities).
    assert set(plan.capabilities) == set(features(version).migration_capabilities)
    assert plan.parameters["downtime-limit"] == DOWNTIME_LIMIT_MS
    assert [c.name for c in d0.remove_nodes()] == ["blockdev-del", "blockdev-del"]


def test_migration_uri_per_transport(tmp_path: Path) -> None:
    new = plan_enable(
        session_id=SID,
        selection=selection("10.0"),
        features=features("10.0"),
        memory_file=str(tmp_path / "m"),
    )
    assert new.migrate(7).arguments == {"uri": "file:/dev/fdset/7"}
    with pytest.raises(ValueError, match="fdset"):
        new.migrate(None)
    old = plan_enable(
        session_id=SID,
        selection=selection("7.2"),
        features=features("7.2"),
        memory_file=str(tmp_path / "m"),
    )
    assert old.migrate(None).arguments == {"uri": "fd:fq0123abcd-memory"}


def test_settings_are_restored_to_what_they_were(tmp_path: Path) -> None:
    plan = plan_enable(
        session_id=SID,
        selection=selection("10.0"),
        features=features("10.0"),
        memory_file=str(tmp_path / "m"),
        strategy=Strategy.MAPPED_RAM,
    )
    previous_caps = {"events": False, "multifd": True}
    restored = {
        c["capability"]: c["state"]
        for c in plan.restore_capabilities(previous_caps).arguments["capabilities"]
    }
    assert restored == {name: previous_caps.get(name, False) for name in plan.capabilities}
    assert restored["multifd"] is True
    assert restored["events"] is False
    params = plan.restore_parameters({"max-bandwidth": 134217728, "downtime-limit": 300, "x": 1})
    assert params.arguments == {"max-bandwidth": 134217728, "downtime-limit": 300}


@pytest.mark.parametrize("strategy", list(Strategy))
def test_only_strategies_that_wait_for_convergence_get_the_steps(
    strategy: Strategy, tmp_path: Path
) -> None:
    plan = plan_enable(
        session_id=SID,
        selection=selection("10.0"),
        features=features("10.0"),
        memory_file=str(tmp_path / "m"),
        strategy=strategy,
    )
    expected = () if strategy is Strategy.BACKGROUND_SNAPSHOT else CONVERGENCE_STEPS
    assert plan.convergence == expected
    assert plan.pauses_before_switchover == bool(expected)


def test_convergence_steps_escalate_and_end_by_pausing_the_guest() -> None:
    times = [s.after_s for s in CONVERGENCE_STEPS]
    assert times == sorted(times)
    assert len(set(times)) == len(times)
    assert times[0] > 0
    limits = [s.downtime_limit_ms for s in CONVERGENCE_STEPS]
    assert limits[-1] is None  # the last step always ends the save
    raised = [limit for limit in limits[:-1] if limit is not None]
    assert raised == limits[:-1]
    assert raised == sorted(raised)
    assert raised[0] > DOWNTIME_LIMIT_MS
    assert ConvergenceStep(1.0, 50).command().name == "migrate-set-parameters"
    assert ConvergenceStep(1.0, 50).command().arguments == {"downtime-limit": 50}
    assert ConvergenceStep(6.0, None).command() == Command("stop")
    assert not ConvergenceStep(1.0, 50).pauses_guest
    assert ConvergenceStep(6.0, None).pauses_guest
    assert ConvergenceStep(1.0, 50).progress_detail() == {
        "downtime_limit_ms": 50,
        "after_seconds": 1.0,
    }
    assert ConvergenceStep(6.0, None).progress_detail() == {
        "guest_paused": True,
        "after_seconds": 6.0,
    }


def test_overlay_dir_is_honoured(tmp_path: Path) -> None:
    plan = plan_enable(
        session_id=SID,
        selection=selection("10.0"),
        features=features("10.0"),
        memory_file=str(tmp_path / "m"),
        overlay_dir=str(tmp_path),
    )
    assert plan.overlays[0].overlay_file == str(tmp_path / "d0.qcow2.forge-0123abcd.qcow2")


def test_overlays_attached_reads_query_block(tmp_path: Path) -> None:
    plan = plan_enable(
        session_id=SID,
        selection=selection("10.0", all_disks=True),
        features=features("10.0"),
        memory_file=str(tmp_path / "m"),
    )
    blocks = load("qemu-10.0-blockinfo.json.gz")["query-block"]
    assert overlays_attached(plan.overlays, blocks) == {
        "fq0123abcd-0-fmt": False,
        "fq0123abcd-1-fmt": False,
    }
    blocks[0]["inserted"]["node-name"] = "fq0123abcd-0-fmt"
    assert overlays_attached(plan.overlays, blocks)["fq0123abcd-0-fmt"] is True


@pytest.mark.parametrize(
    ("argv", "incoming", "cold"),
    [
        (["q", "-m", "1G"], ["q", "-m", "1G", "-incoming", "defer", "-S"], ["q", "-m", "1G"]),
        (
            ["q", "-S", "-incoming", "tcp:0:4444", "-m", "1G"],
            ["q", "-m", "1G", "-incoming", "defer", "-S"],
            ["q", "-m", "1G"],
        ),
        (
            ["q", "-loadvm", "snap1", "-daemonize"],
            ["q", "-daemonize", "-incoming", "defer", "-S"],
            ["q", "-daemonize"],
        ),
        (["q", "--incoming=defer"], ["q", "-incoming", "defer", "-S"], ["q"]),
    ],
)
def test_relaunch_argv(argv: list[str], incoming: list[str], cold: list[str]) -> None:
    assert list(incoming_argv(argv)) == incoming
    assert list(cold_argv(argv)) == cold


@pytest.mark.parametrize("strategy", list(Strategy))
def test_save_turns_off_what_an_earlier_restore_left_on(strategy: Strategy) -> None:
    """After a discard of a mapped-ram session the relaunched QEMU may still have multifd and
    mapped-ram on; a background snapshot refuses multifd, and a precopy save must not write
    mapped-ram. The save sets every known capability, on exactly for what the strategy needs."""
    known = features("10.0").migration_capabilities
    caps = save_capabilities(strategy, known)
    assert set(caps) == set(known)
    needed = {
        Strategy.PRECOPY: {"events", "pause-before-switchover"},
        Strategy.MAPPED_RAM: {"events", "pause-before-switchover", "multifd", "mapped-ram"},
        Strategy.BACKGROUND_SNAPSHOT: {"events", "background-snapshot"},
    }[strategy]
    assert {name for name, on in caps.items() if on} == needed
    assert caps["x-ignore-shared"] is False
