"""Enum values of QEMU's QMP schema, read from the recorded ``query-qmp-schema`` answers of every
supported build (tests/data/qemu-*.json.gz), so that tests cover what QEMU can really answer."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "data"


@functools.cache
def schemas() -> dict[str, list[dict[str, Any]]]:
    """Build name → its schema (a list of introspection entities)."""
    found = {}
    for path in sorted(DATA.glob("qemu-*.json.gz")):
        if path.name.endswith("-blockinfo.json.gz"):
            continue
        with gzip.open(path, "rt") as f:
            found[path.name.removeprefix("qemu-").removesuffix(".json.gz")] = json.load(f)["schema"]
    assert found, f"no recorded QMP schema in {DATA}"
    return found


def _returned_member_enum(schema: list[dict[str, Any]], command: str, member: str) -> list[str]:
    by_name = {e["name"]: e for e in schema}
    returned = by_name[by_name[command]["ret-type"]]
    [field] = [m for m in returned["members"] if m["name"] == member]
    enum = by_name[field["type"]]
    assert enum["meta-type"] == "enum", enum
    return [v if isinstance(v, str) else v["name"] for v in enum.get("values", [])] or [
        m["name"] for m in enum["members"]
    ]


def migration_statuses() -> tuple[str, ...]:
    """Every ``MigrationStatus`` (``query-migrate``'s ``status``) of any recorded build."""
    values: dict[str, None] = {}
    for schema in schemas().values():
        values.update(dict.fromkeys(_returned_member_enum(schema, "query-migrate", "status")))
    return tuple(values)
