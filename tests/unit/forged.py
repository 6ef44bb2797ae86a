"""Session records as enable writes them, built from the enable plan of each recorded QEMU build
(tests/data/qemu-*.json.gz), and a check that a planned command is one the build's QMP schema
accepts: the plans of commit, discard and recover are read against what QEMU really takes."""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forgeqmp.core.disks import disks_from_query, select_disks
from forgeqmp.core.features import Features, features_from_introspection
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.enable import EnablePlan, Strategy, plan_enable
from forgeqmp.core.record import MemoryRecord, QemuRecord, SessionRecord
from forgeqmp.core.states import State

DATA = Path(__file__).resolve().parents[1] / "data"
SID = "0123abcd-0000-4000-8000-000000000000"
TAG = "fq0123abcd"
VERSIONS = ("7.2", "10.0")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@functools.cache
def load(name: str) -> dict[str, Any]:
    with gzip.open(DATA / name, "rt") as f:
        result: dict[str, Any] = json.load(f)
    return result


def features(version: str) -> Features:
    d = load(f"qemu-{version}.json.gz")
    return features_from_introspection(d["version"], d["schema"], d["migrate_capabilities"])


def query_block(version: str) -> list[dict[str, Any]]:
    """The build's recorded ``query-block`` (disks d0, d1 on -blockdev, ro, cd0)."""
    return [dict(b) for b in load(f"qemu-{version}-blockinfo.json.gz")["query-block"]]


def legacy_drive(qdev: str, node: str, file: str, size: int = 32 << 20) -> dict[str, Any]:
    """A ``query-block`` entry of a ``-drive`` disk: QEMU named its node (``#block<n>``)."""
    return {
        "device": f"drive-{qdev.split('/')[3]}",
        "qdev": qdev,
        "removable": False,
        "inserted": {
            "node-name": node,
            "file": file,
            "drv": "raw",
            "ro": False,
            "image": {"filename": file, "format": "raw", "virtual-size": size},
        },
    }


def forge(
    version: str,
    *,
    blocks: Sequence[Mapping[str, Any]] | None = None,
    strategy: Strategy | None = None,
    memory_file: str = "/state/memory.bin",
) -> tuple[EnablePlan, SessionRecord]:
    """The enable plan of every forgeable disk and the Active record enable writes from it."""
    disks = disks_from_query(list(blocks) if blocks is not None else query_block(version))
    plan = plan_enable(
        session_id=SID,
        selection=select_disks(disks, all_disks=True),
        features=features(version),
        memory_file=memory_file,
        strategy=strategy,
    )
    disk_records = [o.disk_record() for o in plan.overlays]
    record = SessionRecord(
        session_id=SID,
        state=State.ACTIVE,
        step="active",
        strategy=plan.strategy.value,
        created_at=T0,
        activated_at=T0,
        updated_at=T0,
        disks=tuple(disk_records),
        memory=MemoryRecord(
            path=plan.memory_file,
            size=1 << 20,
            sha256="ab" * 32,
            transport=plan.transport.value,
            capabilities=tuple(k for k, v in plan.capabilities.items() if v),
        ),
        qemu=QemuRecord(
            pid=4242,
            argv=("/usr/bin/qemu-system-x86_64", "-machine", "q35"),
            cwd="/run/vm",
            env={"PATH": "/usr/bin"},
            version=version,
            machine="q35",
            qmp_socket="/run/vm/qmp.sock",
        ),
    )
    return plan, record


def on_overlays(record: SessionRecord, blocks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``blocks`` as QEMU shows them once enable snapshotted the record's disks."""
    overlay = {d.qdev: d for d in record.disks}
    shown = []
    for b in blocks:
        disk = overlay.get(str(b.get("qdev")))
        if disk is not None and b.get("inserted"):
            b = {**b, "inserted": {**b["inserted"], "node-name": disk.overlay_node}}
        shown.append(dict(b))
    return shown


def _arguments_type(version: str, command: str) -> dict[str, Any]:
    by_name = {e["name"]: e for e in load(f"qemu-{version}.json.gz")["schema"]}
    entity = by_name[command]
    assert entity["meta-type"] == "command", entity
    args: dict[str, Any] = by_name[entity["arg-type"]] if "arg-type" in entity else {}
    return args


def accepted(version: str, command: Command) -> bool:
    """Whether the build's schema has ``command`` with every argument it is given, and every
    mandatory argument given (member names only; the values are QEMU's to check)."""
    schema = {e["name"] for e in load(f"qemu-{version}.json.gz")["schema"]}
    if command.name not in schema:
        return False
    members = _arguments_type(version, command.name).get("members", [])
    known = {m["name"] for m in members}
    required = {m["name"] for m in members if "default" not in m}
    given = set(command.arguments)
    return given <= known and required <= given
