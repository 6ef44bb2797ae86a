"""The preflight's and status's pure decisions: room needed and where, migration blockers from
QEMU's reply (and that both recorded schemas report them), the advice on an io-error pause."""

from __future__ import annotations

import gzip
import json
import os
import socket
from pathlib import Path
from typing import Any

import attrs
import pytest
from records import make_record  # tests/unit is on sys.path

from forgeqmp.adapters.livestatus import LiveStatus, OverlayUsage, advice, observe
from forgeqmp.core.disks import Selection, disks_from_query, select_disks
from forgeqmp.core.features import Features, features_from_introspection
from forgeqmp.core.plans.enable import plan_enable
from forgeqmp.core.preflight import (
    MEMORY_MARGIN,
    OVERLAY_MINIMUM,
    FreeSpace,
    SpaceNeed,
    check_migratable,
    check_space,
    guest_ram_bytes,
    migration_blockers,
    space_needs,
)
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import State
from forgeqmp.errors import InsufficientSpace, MigrationBlocked, PrerequisiteError

MiB = 1 << 20
DATA = Path(__file__).parent.parent / "data"
SID = "0123abcd-0000-4000-8000-000000000000"


def load(name: str) -> dict[str, Any]:
    with gzip.open(DATA / name, "rt") as f:
        result: dict[str, Any] = json.load(f)
    return result


def features(version: str) -> Features:
    d = load(f"qemu-{version}.json.gz")
    return features_from_introspection(d["version"], d["schema"], d["migrate_capabilities"])


def selection(version: str, **kw: Any) -> Selection:
    data = load(f"qemu-{version}-blockinfo.json.gz")
    return select_disks(disks_from_query(data["query-block"]), **kw)


def test_refusals_are_prerequisite_errors_with_exit_3() -> None:
    assert issubclass(InsufficientSpace, PrerequisiteError)
    assert issubclass(MigrationBlocked, PrerequisiteError)
    assert InsufficientSpace.exit_code == MigrationBlocked.exit_code == 3


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_needs_are_the_memory_file_and_each_overlay_where_they_go(
    version: str, tmp_path: Path
) -> None:
    plan = plan_enable(
        session_id=SID,
        selection=selection(version, all_disks=True),
        features=features(version),
        memory_file=str(tmp_path / "state" / "mem"),
        overlay_dir=str(tmp_path / "overlays"),
    )
    needs = space_needs(plan, 512 * MiB)
    assert [(n.directory, n.size) for n in needs] == [
        (str(tmp_path / "state"), 512 * MiB + MEMORY_MARGIN),
        (str(tmp_path / "overlays"), OVERLAY_MINIMUM),
        (str(tmp_path / "overlays"), OVERLAY_MINIMUM),
    ]
    assert "512 MiB of guest RAM" in needs[0].what
    assert [n.what.split(" (")[0] for n in needs[1:]] == [
        "the overlay of disk d0",
        "the overlay of disk d1",
    ]


def test_guest_ram_counts_hotplugged_memory() -> None:
    assert guest_ram_bytes({"base-memory": 256 * MiB, "plugged-memory": 0}) == 256 * MiB
    assert guest_ram_bytes({"base-memory": 256 * MiB, "plugged-memory": 128 * MiB}) == 384 * MiB


def _measure(free: dict[str, tuple[int, int]]) -> Any:
    def measure(directory: str) -> FreeSpace:
        device, available = free[directory]
        return FreeSpace(device, available)

    return measure


MEMORY = SpaceNeed("/state", "the memory file (...)", 300 * MiB)
OVERLAY = SpaceNeed("/images", "the overlay of disk d0 (...)", 64 * MiB)


def test_needs_on_separate_file_systems_are_checked_apart() -> None:
    check_space([MEMORY, OVERLAY], _measure({"/state": (1, 300 * MiB), "/images": (2, 64 * MiB)}))


def test_needs_on_one_file_system_add_up() -> None:
    with pytest.raises(InsufficientSpace) as refused:
        check_space(
            [MEMORY, OVERLAY], _measure({"/state": (1, 350 * MiB), "/images": (1, 350 * MiB)})
        )
    message = str(refused.value)
    assert "/images, /state" in message
    assert "needs 364 MiB" in message
    assert "has 350 MiB free" in message
    assert "--state-dir" in message
    assert "--overlay-dir" in message
    assert "Nothing was changed" in message
    check_space([MEMORY, OVERLAY], _measure({"/state": (1, 364 * MiB), "/images": (1, 0)}))


def test_a_short_overlay_file_system_names_only_the_overlay_remedy() -> None:
    with pytest.raises(InsufficientSpace) as refused:
        check_space(
            [MEMORY, OVERLAY], _measure({"/state": (1, 1 << 40), "/images": (2, 64 * MiB - 1)})
        )
    message = str(refused.value)
    assert "the overlay of disk d0" in message
    assert "--overlay-dir" in message
    assert "--state-dir" not in message


def test_migration_blockers_are_qemus_own_words() -> None:
    reply = {"blocked-reasons": ["Migration is disabled when using feature 'peer mode'"]}
    assert migration_blockers(reply) == ("Migration is disabled when using feature 'peer mode'",)
    with pytest.raises(MigrationBlocked) as refused:
        check_migratable(reply)
    assert refused.value.reasons == migration_blockers(reply)
    assert "peer mode" in str(refused.value)
    assert "Nothing was changed" in str(refused.value)
    for unblocked in ({}, {"status": "completed"}, {"blocked-reasons": []}):
        assert migration_blockers(unblocked) == ()
        check_migratable(unblocked)


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_both_recorded_qemus_report_blocked_reasons(version: str) -> None:
    """Feature detection, not versions: query-migrate's reply type has ``blocked-reasons``."""
    entries = {e["name"]: e for e in load(f"qemu-{version}.json.gz")["schema"]}
    info = entries[entries["query-migrate"]["ret-type"]]
    assert "blocked-reasons" in {m["name"] for m in info["members"]}


# --- status --------------------------------------------------------------------------------------


def _active(tmp_path: Path) -> SessionRecord:
    """An Active session of one disk whose files are in ``tmp_path``."""
    return make_record(State.ACTIVE, root=tmp_path)


def test_io_error_on_a_full_overlay_says_discard_or_free_space_and_cont(tmp_path: Path) -> None:
    record = _active(tmp_path)
    disk = record.disks[0]
    text = advice(record, "io-error", {disk.qdev: "nospace"}, {disk.name: OverlayUsage(5, 0)})
    assert text is not None
    assert "io-error" in text
    assert "forgeqmp discard" in text
    assert "'cont'" in text
    assert os.path.dirname(disk.overlay_file) in text


def test_io_error_is_blamed_on_the_overlay_only_when_it_is_full(tmp_path: Path) -> None:
    record = _active(tmp_path)
    disk = record.disks[0]
    roomy = {disk.name: OverlayUsage(5, 1 << 30)}
    text = advice(record, "io-error", {disk.qdev: "failed"}, roomy)
    assert text is not None
    assert "forgeqmp discard" not in text
    assert "'cont'" in text
    assert advice(None, "io-error", {}, {}) == text


def test_running_guest_gets_a_warning_when_overlay_space_runs_low(tmp_path: Path) -> None:
    record = _active(tmp_path)
    name = record.disks[0].name
    low = advice(record, "running", {}, {name: OverlayUsage(5, OVERLAY_MINIMUM - 1)})
    assert low is not None
    assert "io-error" in low
    assert advice(record, "running", {}, {name: OverlayUsage(5, OVERLAY_MINIMUM)}) is None
    finished = attrs.evolve(record, state=State.DISCARDED)
    assert advice(finished, "running", {}, {name: OverlayUsage(5, 0)}) is None
    assert advice(record, "paused", {}, {name: OverlayUsage(5, 1 << 30)}) is None


def test_status_gets_the_live_keys_per_disk(tmp_path: Path) -> None:
    record = _active(tmp_path)
    disk = record.disks[0]
    status = record.status_dict()
    live = LiveStatus("io-error", {disk.qdev: "nospace"}, {disk.name: OverlayUsage(3 * MiB, 0)})
    text = live.update(status, record)
    assert status["qemu"] == "io-error"
    assert status["qemu_advice"] == live.advice(record)
    assert status["disks"][0]["overlay_bytes"] == 3 * MiB
    assert status["disks"][0]["overlay_free_bytes"] == 0
    assert status["disks"][0]["io_status"] == "nospace"
    assert "qemu: io-error" in text
    assert "overlay of disk0: 3.0 MiB on disk, 0.0 MiB free" in text
    assert "attention: QEMU paused the guest" in text


def test_status_never_asks_qemu_while_another_forgeqmp_works(tmp_path: Path) -> None:
    """QEMU serves one QMP client: while the lock is held, status says busy without connecting
    to the socket at all."""
    record = _active(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "silent.sock")
    listener.bind(path)
    listener.listen()
    try:
        assert observe(path, record, busy=True).qemu == "busy"
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
        assert observe(str(tmp_path / "missing.sock"), record, busy=False).qemu == "unreachable"
    finally:
        listener.close()
