"""Disks are named by what the platform gave them, never by QEMU's throwaway node-names (issue 12
item 6), on real QEMU (every installed build).

A writable UEFI vars store the way Proxmox gives it (``-drive if=pflash,unit=1,id=drive-efidisk0,
format=raw,file=...``) has no qdev id and only generated node-names (``#block123``, another in
every QEMU process): forgeqmp names it by its drive id in the record, ``status``, errors and
``--disk``. It is forgeable and forged with ``--all-disks``: its contents are part of the VM's
state (boot entries, secure-boot keys), so discard must take it back with the memory.
SeaBIOS stands in for the firmware code on pflash unit 0 (the test guest boots a kernel).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.errors import UnknownDisk
from forgeqmp.testing import DiskSpec

from .helpers import commit, discard, enable, qmp, run, sha256_of
from .test_cli import cli, final

pytestmark = pytest.mark.qemu

SEABIOS = "/usr/share/seabios/bios-256k.bin"
VARS_SIZE = 128 * 1024


def _pflash_args(vars_file: Path) -> list[str]:
    vars_file.write_bytes(bytes(range(256)) * (VARS_SIZE // 256))
    return [
        "-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={SEABIOS}",
        "-drive", f"if=pflash,unit=1,id=drive-efidisk0,format=raw,file={vars_file}",
    ]  # fmt: skip


def _write_vars(socket: str, byte: int) -> None:
    """Write the vars store's first 4 KiB through its BlockBackend (HMP qemu-io)."""
    line = f'qemu-io drive-efidisk0 "write -P {byte} 0 4k"'
    reply = run(qmp, socket, "human-monitor-command", {"command-line": line})
    assert reply.strip() == "", reply  # qemu-io under HMP prints only its errors


def test_pflash_vars_store_is_named_by_its_drive_id(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not Path(SEABIOS).exists():
        pytest.skip(f"{SEABIOS} is not installed")
    vars_file = tmp_path / "efivars.raw"
    vm = qemu_factory(disks=[DiskSpec("disk0")], extra_args=_pflash_args(vars_file))
    blocks = run(qmp, vm.qmp_socket, "query-block")
    (flash,) = [b for b in blocks if b["device"] == "drive-efidisk0"]
    generated = flash["inserted"]["node-name"]
    assert generated.startswith("#")  # what the test is about: QEMU named its node itself
    state = tmp_path / "state"
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]

    # Errors list stable names only.
    with pytest.raises(UnknownDisk) as info:
        run(enable, vm.qmp_socket, state, disks=["nosuchdisk"])
    assert "drive-efidisk0" in str(info.value)
    assert "#block" not in str(info.value)

    # The primary disk is the user's disk, the vars store is left out and named by its drive id.
    record = run(enable, vm.qmp_socket, state)
    assert [d.name for d in record.disks] == ["disk0"]
    assert record.unforged_disks == ("drive-efidisk0",)
    assert "#block" not in " ".join(record.warnings)
    run(discard, vm.qmp_socket, state)

    # --disk selects it by its drive id; the record, status and the CLI say that name.
    code, lines, err = cli(*base, "enable", "--disk", "drive-efidisk0", "--disk", "disk0")
    assert code == 0, err
    code, lines, err = cli(*base, "status")
    assert code == 0, err
    status = final(lines)
    assert sorted(d["name"] for d in status["disks"]) == ["disk0", "drive-efidisk0"]
    assert "#block" not in str(status)
    before = sha256_of(vars_file)
    # The vars store's base is read-only during the session: a write goes to its overlay.
    saved = RecordStore(StateDir(state)).load()
    assert saved is not None
    (rec,) = [d for d in saved.disks if d.name == "drive-efidisk0"]
    assert rec.base_file == str(vars_file)
    assert rec.overlay_file is not None
    _write_vars(vm.qmp_socket, 0xAB)  # what firmware storing a variable would do
    assert sha256_of(vars_file) == before  # the write went to the overlay
    code, lines, err = cli(*base, "discard")
    assert code == 0, err
    assert final(lines)["memory_restored"] is True
    assert sha256_of(vars_file) == before

    # --all-disks forges it; commit merges it back; the names hold after the relaunch.
    record = run(enable, vm.qmp_socket, state, all_disks=True)
    assert sorted(d.name for d in record.disks) == ["disk0", "drive-efidisk0"]
    _write_vars(vm.qmp_socket, 0xCD)
    record = run(commit, vm.qmp_socket, state)
    assert sorted(d.name for d in record.disks) == ["disk0", "drive-efidisk0"]
    assert vars_file.read_bytes()[:4096] == b"\xcd" * 4096  # merged into the vars store
    blocks = run(qmp, vm.qmp_socket, "query-block")
    (flash,) = [b for b in blocks if b["device"] == "drive-efidisk0"]
    assert flash["inserted"]["file"] == str(vars_file)
    assert flash["inserted"].get("backing_file_depth", 0) == 0
