"""The CLI against real QEMU, as a hosting agent calls it: the contract's commands, exit codes and
JSON shapes (shared/design/cli-contract.md), one forge cycle of each kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.qemu

STATUS_KEYS = {"state", "activated_at", "disks", "memory_file", "memory_restored", "error"}


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]], str]:
    """Run ``forgeqmp ARGS``; (exit code, JSON lines of stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "forgeqmp", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines, proc.stderr


def final(lines: list[dict[str, Any]]) -> dict[str, Any]:
    assert lines, "no JSON on stdout"
    last = lines[-1]
    assert set(last) >= STATUS_KEYS, last
    return last


def test_cli_forge_cycles_and_exit_codes(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=256)
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(tmp_path / "state"), "--json"]

    code, lines, _ = cli(*base, "status")
    assert code == 0
    assert final(lines)["state"] == "none"

    # Invalid arguments: exit 2, nothing changed.
    assert cli(*base, "enable", "--disk", "nope")[0] == 2
    assert cli(*base, "commit", "--timeout", "-1")[0] == 2
    assert cli(*base, "frobnicate")[0] == 2
    # Refused by a prerequisite: exit 3.
    assert cli(*base, "commit")[0] == 3
    assert cli(*base, "discard")[0] == 3
    assert final(cli(*base, "status")[1])["state"] == "none"

    # enable → active; a second enable is refused.
    code, lines, err = cli(*base, "enable")
    assert code == 0, err
    status = final(lines)
    assert status["state"] == "active"
    assert status["activated_at"]
    assert [d["name"] for d in status["disks"]] == ["disk0"]
    disk = status["disks"][0]
    assert os.path.exists(disk["base"])
    assert os.path.exists(disk["overlay"])
    assert os.path.exists(status["memory_file"])
    assert status["memory_restored"] is None
    assert status["error"] is None
    assert cli(*base, "enable")[0] == 3
    # FORGEQMP_QMP stands in for --qmp.
    code, lines, _ = cli(
        "--state-dir",
        str(tmp_path / "state"),
        "--json",
        "status",
        env={"FORGEQMP_QMP": vm.qmp_socket},
    )
    assert (code, final(lines)["state"]) == (0, "active")

    # discard → discarded, memory restored.
    code, lines, err = cli(*base, "discard")
    assert code == 0, err
    status = final(lines)
    assert (status["state"], status["memory_restored"]) == ("discarded", True)
    assert not os.path.exists(disk["overlay"])

    # enable again, commit with progress lines → committed.
    assert cli(*base, "enable", "--all-disks")[0] == 0
    kept = vm.write_disk("disk0", 8, seed="kept")
    code, lines, err = cli(*base, "commit", "--timeout", "600")
    assert code == 0, err
    assert final(lines)["state"] == "committed"
    progress = [line for line in lines[:-1] if line.get("event") == "progress"]
    assert progress
    assert {line["operation"] for line in progress} == {"commit"}
    assert vm.disk_md5("disk0", 8) == kept
    assert final(cli(*base, "status")[1])["disks"][0]["base"] == disk["base"]


def test_cli_unreachable_qemu_is_exit_5(tmp_path: Path) -> None:
    missing = str(tmp_path / "no.sock")
    code, lines, err = cli("--qmp", missing, "--state-dir", str(tmp_path / "s"), "--json", "enable")
    assert code == 5
    assert "no.sock" in err
    assert final(lines)["state"] == "none"
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    assert cli("--qmp", str(not_a_socket), "--state-dir", str(tmp_path / "s"), "enable")[0] == 5


def test_verbose_logs_every_step_and_debug_the_qmp_traffic(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """-v: one INFO line per saved step, the pause, the disk and file, the relaunched QEMU's pid;
    --debug: the QMP traffic too. All on stderr (stdout keeps the JSON)."""
    vm = qemu_factory(memory_mib=256)
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(tmp_path / "state"), "--json"]
    code, lines, err = cli("-v", *base, "enable")
    assert code == 0, err
    record = final(lines)
    sid = record["session_id"]
    for step in ("planned", "overlays-created", "snapshot-done", "active"):
        assert f"forgeqmp.driver_base INFO: session {sid}: " in err, err
        assert f", step {step}" in err, (step, err)
    overlay = record["disks"][0]["overlay"]
    assert f"disk0 ({overlay}) on their overlays" in err
    assert "guest paused" in err
    assert "QMP" not in err  # traffic only with --debug

    code, lines, err = cli("--debug", *base, "discard")
    assert code == 0, err
    assert final(lines)["memory_restored"] is True
    pid = vm.pid  # the relaunched QEMU
    assert f"QEMU relaunched waiting for the memory state, pid {pid}" in err
    assert "VM running from the memory state" in err
    assert "forgeqmp.qmp DEBUG: QMP " in err
    assert "-> migrate-incoming" in err
    assert "QMP event MIGRATION" in err
