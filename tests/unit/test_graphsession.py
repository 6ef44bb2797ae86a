"""Forge sessions found in QEMU's block graph and their records (pure logic and files)."""

from __future__ import annotations

from pathlib import Path

from forgeqmp.adapters.recordstore import RECORD_FILE, find_records
from forgeqmp.core.graphsession import sessions_in_graph


def test_sessions_are_found_by_node_names_and_overlay_files() -> None:
    nodes = [
        {"node-name": "disk0-fmt", "file": "/v/disk0.qcow2"},
        {"node-name": "fq0123abcd-0-fmt", "file": "/v/disk0.qcow2.forge-0123abcd.qcow2"},
        {"node-name": "fq0123abcd-0-file", "file": "/v/disk0.qcow2.forge-0123abcd.qcow2"},
        {"node-name": "#block9", "file": "/v/d1.raw.forge-deadbeef.qcow2"},  # renamed nodes
        {"node-name": "fqnothex00-0-fmt", "file": "/v/x"},
    ]
    (first, second) = sessions_in_graph(nodes)
    assert first.tag == "0123abcd"
    assert first.nodes == ("fq0123abcd-0-file", "fq0123abcd-0-fmt")
    assert first.files == ("/v/disk0.qcow2.forge-0123abcd.qcow2",)
    assert second.tag == "deadbeef"
    assert "record was not found" in second.describe()
    assert sessions_in_graph([{"node-name": "disk0-fmt", "file": "/v/disk0.qcow2"}]) == ()


def test_records_are_searched_in_the_state_dir_and_under_the_default_base(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base"
    (base / "vm-a").mkdir(parents=True)
    (base / "vm-b").mkdir()
    (base / "vm-b" / RECORD_FILE).write_text("not json")  # unreadable: skipped
    assert find_records("0123abcd", [tmp_path / "nowhere"], base) == ()
    assert find_records("0123abcd", [], tmp_path / "missing") == ()
