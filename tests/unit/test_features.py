"""The feature probe, on the introspection QEMU 7.2 and 10.0 really returned (recorded by
``tests/data``), and on hand-made schemas for the edge cases."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from forgeqmp.core.features import Schema, features_from_introspection

DATA = Path(__file__).parent.parent / "data"


def recorded(version: str) -> dict[str, Any]:
    with gzip.open(DATA / f"qemu-{version}.json.gz", "rt") as f:
        result: dict[str, Any] = json.load(f)
    return result


def features_of(version: str):  # type: ignore[no-untyped-def]
    d = recorded(version)
    return features_from_introspection(d["version"], d["schema"], d["migrate_capabilities"])


def test_qemu_10_offers_file_transport_and_mapped_ram() -> None:
    f = features_of("10.0")
    assert (f.version.major, f.version.minor) == (10, 0)
    assert f.file_transport
    assert f.fd_transport
    assert f.fdset
    assert f.mapped_ram
    assert f.multifd
    assert f.blockdev_set_active
    assert f.pause_before_switchover
    assert f.background_snapshot
    assert f.blockdev_snapshot_transaction
    assert f.block_commit
    assert "direct-io" in f.migration_parameters


def test_qemu_72_has_fd_transport_but_no_file_or_mapped_ram() -> None:
    f = features_of("7.2")
    assert (f.version.major, f.version.minor) == (7, 2)
    assert f.fd_transport
    assert not f.file_transport
    assert not f.mapped_ram
    assert not f.blockdev_set_active
    assert f.pause_before_switchover
    assert f.blockdev_snapshot_transaction
    assert "downtime-limit" in f.migration_parameters
    assert "direct-io" not in f.migration_parameters


def test_mapped_ram_capability_without_file_transport_is_not_usable() -> None:
    d = recorded("7.2")
    caps = [*d["migrate_capabilities"], {"capability": "mapped-ram", "state": False}]
    f = features_from_introspection(d["version"], d["schema"], caps)
    assert "mapped-ram" in f.migration_capabilities
    assert not f.mapped_ram


def test_pause_before_switchover_needs_the_status_too() -> None:
    d = recorded("10.0")
    schema = [dict(e) for e in d["schema"]]
    for e in schema:
        if e["meta-type"] == "enum" and "pre-switchover" in e["values"]:
            e["values"] = [v for v in e["values"] if v != "pre-switchover"]
    f = features_from_introspection(d["version"], schema, d["migrate_capabilities"])
    assert not f.pause_before_switchover


@pytest.mark.parametrize(
    ("path", "expected"),
    [(("channels", "addr", "transport"), {"socket", "exec", "rdma", "file"}), (("nope",), set())],
)
def test_schema_follows_member_paths(path: tuple[str, ...], expected: set[str]) -> None:
    view = Schema(recorded("10.0")["schema"])
    assert view.enum_values(view.type_at("migrate", path)) == expected


def test_schema_of_unknown_command_is_empty() -> None:
    view = Schema(recorded("10.0")["schema"])
    assert view.command_arguments("no-such-command") == frozenset()
    assert view.type_at("no-such-command", ("x",)) is None
    assert "blockdev-add" in view.commands
    assert "MIGRATION" in view.events


def test_features_dict_is_json_able() -> None:
    as_dict = features_of("10.0").as_dict()
    assert as_dict
    assert json.loads(json.dumps(as_dict)) == as_dict
