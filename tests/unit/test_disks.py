"""Disk naming and selection on the query-block replies QEMU 7.2 and 10.0 really gave for a VM with
a qcow2 boot disk (d0, bootindex 1), a raw disk (d1), a read-only disk (ro) and a CD-ROM (cd0)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from forgeqmp.core.disks import Disk, disks_from_query, qom_path_of, select_disks
from forgeqmp.errors import DiskNotForgeable, NoDiskSelected, UnknownDisk

DATA = Path(__file__).parent.parent / "data"


def recorded(version: str) -> dict[str, Any]:
    with gzip.open(DATA / f"qemu-{version}-blockinfo.json.gz", "rt") as f:
        result: dict[str, Any] = json.load(f)
    return result


@pytest.fixture(params=["7.2", "10.0"])
def disks(request: pytest.FixtureRequest) -> tuple[Disk, ...]:
    data = recorded(request.param)
    boot = {f"/machine/peripheral/{k}/virtio-backend": v for k, v in data["bootindex"].items()}
    return disks_from_query(data["query-block"], boot)


def test_disks_are_named_by_qdev_id(disks: tuple[Disk, ...]) -> None:
    assert [d.name for d in disks] == ["d0", "d1", "ro", "cd0"]
    d0 = disks[0]
    assert d0.node == "d0-fmt"
    assert d0.format == "qcow2"
    assert d0.virtual_size == 64 * 1024 * 1024
    assert d0.bootindex == 1
    assert disks[1].bootindex is None
    assert d0.names() == {"d0", "/machine/peripheral/d0/virtio-backend", "d0-fmt"}


def test_unforgeable_disks_say_why(disks: tuple[Disk, ...]) -> None:
    reasons = {d.name: d.unforgeable_reason for d in disks}
    assert reasons["d0"] is None
    assert reasons["d1"] is None
    assert "read-only" in (reasons["ro"] or "")
    assert "removable" in (reasons["cd0"] or "")


def test_default_is_the_lowest_bootindex(disks: tuple[Disk, ...]) -> None:
    selection = select_disks(disks)
    assert [d.name for d in selection.forged] == ["d0"]
    assert [d.name for d in selection.unforged] == ["d1"]
    assert selection.warnings
    assert "d1" in selection.warnings[0]


def test_default_without_bootindex_is_the_first_disk(disks: tuple[Disk, ...]) -> None:
    plain = [attrs.evolve(d, bootindex=None) for d in disks]
    assert [d.name for d in select_disks([plain[1], plain[0]]).forged] == ["d1"]


@pytest.mark.parametrize("name", ["d1", "/machine/peripheral/d1/virtio-backend", "d1-fmt"])
def test_select_by_any_known_name(disks: tuple[Disk, ...], name: str) -> None:
    assert [d.name for d in select_disks(disks, [name]).forged] == ["d1"]


def test_select_all_leaves_out_cdrom_and_read_only(disks: tuple[Disk, ...]) -> None:
    selection = select_disks(disks, all_disks=True)
    assert [d.name for d in selection.forged] == ["d0", "d1"]
    assert selection.unforged == ()
    assert selection.warnings == ()


def test_duplicate_names_select_once(disks: tuple[Disk, ...]) -> None:
    assert [d.name for d in select_disks(disks, ["d0", "d0-fmt"]).forged] == ["d0"]


def test_unknown_disk_lists_the_known_ones(disks: tuple[Disk, ...]) -> None:
    with pytest.raises(UnknownDisk) as info:
        select_disks(disks, ["nope"])
    assert info.value.exit_code == 2
    assert "d0" in str(info.value)


@pytest.mark.parametrize("name", ["ro", "cd0"])
def test_unforgeable_disk_is_refused(disks: tuple[Disk, ...], name: str) -> None:
    with pytest.raises(DiskNotForgeable) as info:
        select_disks(disks, [name])
    assert info.value.exit_code == 3


def test_empty_selection_is_refused(disks: tuple[Disk, ...]) -> None:
    with pytest.raises(NoDiskSelected):
        select_disks(disks, [])
    with pytest.raises(NoDiskSelected):
        select_disks([d for d in disks if d.unforgeable_reason], all_disks=True)


def test_primary_read_only_disk_is_refused(disks: tuple[Disk, ...]) -> None:
    with pytest.raises(DiskNotForgeable, match="primary"):
        select_disks([d for d in disks if d.name in ("ro", "cd0")])


@pytest.mark.parametrize(
    ("qdev", "path"),
    [
        ("/machine/peripheral/d0/virtio-backend", "/machine/peripheral/d0"),
        ("cd0", "/machine/peripheral/cd0"),
        ("/machine/peripheral-anon/device[1]", "/machine/peripheral-anon/device[1]"),
    ],
)
def test_qom_path(qdev: str, path: str) -> None:
    assert qom_path_of(qdev) == path


def _legacy(device: str, qdev: str, node: str, file: str) -> dict[str, Any]:
    return {
        "device": device,
        "qdev": qdev,
        "removable": False,
        "inserted": {"node-name": node, "file": file, "drv": "raw", "ro": False},
    }


def test_legacy_drives_and_pflash_are_named_by_drive_id_never_a_generated_node() -> None:
    blocks = [
        _legacy("drive-efidisk0", "/machine/system.flash1", "#block333", "/v/vars.raw"),
        _legacy("drive-virtio0", "/machine/peripheral/virtio0/virtio-backend", "#block12", "/v/a"),
        _legacy("", "/machine/peripheral/d1/virtio-backend", "d1-fmt", "/v/b"),
        _legacy("", "/machine/peripheral-anon/device[3]/virtio-backend", "#block9", "/v/c"),
    ]
    disks = disks_from_query(blocks)
    assert [d.name for d in disks] == [
        "drive-efidisk0",
        "virtio0",
        "d1",
        "/machine/peripheral-anon/device[3]/virtio-backend",
    ]
    assert all(not d.name.startswith("#") for d in disks)
    assert select_disks(disks, ["drive-efidisk0"]).forged == (disks[0],)
    assert select_disks(disks, ["drive-virtio0"]).forged == (disks[1],)
    # Without a bootindex the primary disk is the first disk device the user added, not the
    # board's pflash that QEMU lists first.
    assert select_disks(disks).forged == (disks[1],)
    with pytest.raises(UnknownDisk) as info:
        select_disks(disks, ["nope"])
    assert "#block" not in str(info.value)
