"""The recover driver and the CLI without QEMU: the lock probe, ``status`` flagging an interrupted
operation as stale, ``recover`` on a stopped QEMU (an interrupted enable undone, files outside the
record untouched). The crash points are tested in test_crashpoints.py."""

from __future__ import annotations

import io
import json
import subprocess
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forgeqmp import cli
from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.core.record import DiskRecord, MemoryRecord, QemuRecord, SessionRecord
from forgeqmp.core.states import State
from forgeqmp.ops.recover import lock_held

SID = "3f2a9c1e-4b7d-4e8a-9c3b-2d1e0f9a8b7c"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def make_record(tmp_path: Path, state: State, step: str) -> SessionRecord:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    disks = []
    for i in range(2):
        base = images / f"d{i}.qcow2"
        base.write_bytes(b"original")
        disks.append(
            DiskRecord(
                name=f"d{i}",
                qdev=f"/machine/peripheral/d{i}/virtio-backend",
                device_node=f"d{i}-fmt",
                base_file=str(base),
                base_format="qcow2",
                virtual_size=1 << 20,
                overlay_file=str(images / f"d{i}.qcow2.forge-3f2a9c1e.qcow2"),
                overlay_node=f"fq3f2a9c1e-{i}-fmt",
                overlay_file_node=f"fq3f2a9c1e-{i}-file",
            )
        )
    return SessionRecord(
        session_id=SID,
        state=state,
        step=step,
        strategy="precopy",
        created_at=T0,
        updated_at=T0,
        disks=tuple(disks),
        memory=MemoryRecord(
            path=str(tmp_path / "state" / f"memory-{SID}.bin"), transport="fdset-file"
        ),
        qemu=QemuRecord(
            pid=dead_pid(),
            argv=("/usr/bin/qemu-system-x86_64", "-m", "256", *blockdevs(disks)),
            cwd=str(tmp_path),
            env={"PATH": "/usr/bin"},
            version="10.0.2",
            machine="q35",
            qmp_socket=str(tmp_path / "qmp.sock"),
        ),
    )


def blockdevs(disks: list[DiskRecord]) -> list[str]:
    argv: list[str] = []
    for d in disks:
        argv += ["-blockdev", f"driver=file,filename={d.base_file},node-name={d.name}-file"]
        argv += ["-blockdev", f"driver=qcow2,file={d.name}-file,node-name={d.device_node}"]
        argv += ["-device", f"virtio-blk-pci,id={d.name},drive={d.device_node}"]
    return argv


def save(tmp_path: Path, record: SessionRecord) -> StateDir:
    state = StateDir(tmp_path / "state")
    state.ensure()
    RecordStore(state).save(record)
    return state


def run_cli(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(
            [
                "--qmp",
                str(tmp_path / "qmp.sock"),
                "--state-dir",
                str(tmp_path / "state"),
                "--json",
                *args,
            ]
        )
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    return code, lines[-1]


def test_lock_held_reads_the_lock_without_taking_it(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    assert lock_held(state) is False  # no state dir, no lock file
    with InstanceLock(state, "test") as lock:
        assert lock_held(state) is True
        assert lock_held(state) is True  # probing does not disturb the holder
        assert lock.held
    assert lock_held(state) is False


def test_status_calls_an_interrupted_operation_stale(tmp_path: Path) -> None:
    save(tmp_path, make_record(tmp_path, State.COMMITTING, "committing"))
    code, status = run_cli(tmp_path, "status")
    assert code == 0
    assert status["state"] == "committing"
    assert status["stale"] is True
    assert "forgeqmp recover" in status["next_step"]
    assert "QEMU is not running" in status["next_step"]

    with InstanceLock(StateDir(tmp_path / "state"), "a commit at work"):
        code, status = run_cli(tmp_path, "status")
    assert status["stale"] is False


def test_status_of_an_active_session_is_not_stale(tmp_path: Path) -> None:
    record = make_record(tmp_path, State.ACTIVE, "active")
    save(tmp_path, record)
    code, status = run_cli(tmp_path, "status")
    assert code == 0
    assert status["stale"] is False
    assert status["start_argv"][0] == "/usr/bin/qemu-system-x86_64"
    assert "virtio-blk-pci,id=d0,drive=fq3f2a9c1e-0-fmt" in status["start_argv"]


def test_recover_without_a_session_does_nothing(tmp_path: Path) -> None:
    code, status = run_cli(tmp_path, "recover")
    assert code == 0
    assert status["state"] == "none"


def test_recover_undoes_an_enable_interrupted_before_the_snapshot_with_qemu_stopped(
    tmp_path: Path,
) -> None:
    record = make_record(tmp_path, State.CREATING, "overlays-created")
    state = save(tmp_path, record)
    for d in record.disks:
        assert d.overlay_file is not None
        Path(d.overlay_file).write_bytes(b"")
    assert record.memory is not None
    Path(record.memory.path).write_bytes(b"partial")
    bystander = tmp_path / "images" / "d0.qcow2.forge-3f2a9c1e.qcow2.bak"
    bystander.write_bytes(b"not ours")

    code, status = run_cli(tmp_path, "recover")
    assert code == 0, status
    assert status["state"] == "failed"
    assert status["rolled_back"] is True
    assert "start it with its original command line" in status["next_step"]
    for d in record.disks:
        assert d.overlay_file is not None
        assert not Path(d.overlay_file).exists()
        assert Path(d.base_file).read_bytes() == b"original"
    assert not Path(record.memory.path).exists()
    assert bystander.read_bytes() == b"not ours"
    # Idempotent: a second recover finds nothing to do.
    again_code, again = run_cli(tmp_path, "recover")
    assert again_code == 0
    assert again["state"] == "failed"
    assert again["rolled_back"] is True
    saved = RecordStore(state).load()
    assert saved is not None
    assert saved.rolled_back


def test_recover_of_a_commit_with_qemu_stopped_leaves_the_disks_to_commit(tmp_path: Path) -> None:
    record = make_record(tmp_path, State.COMMITTING, "committing")
    record = record.evolve_disk("d0", merged=True)
    save(tmp_path, record)
    for d in record.disks:
        assert d.overlay_file is not None
        Path(d.overlay_file).write_bytes(b"overlay")
    code, status = run_cli(tmp_path, "recover")
    # The session is left failed (half merged) until a commit runs: exit 4, never 0.
    assert (code, status["exit_code"], status["error_kind"]) == (4, 4, "forge-failed"), status
    assert status["state"] == "failed"
    assert status["failure_phase"] == "committing"
    assert "offline" in status["next_step"]
    for d in record.disks:
        assert d.overlay_file is not None
        assert Path(d.overlay_file).read_bytes() == b"overlay"  # pending: kept


def test_recover_waits_for_no_one_while_another_controller_works(tmp_path: Path) -> None:
    save(tmp_path, make_record(tmp_path, State.COMMITTING, "committing"))
    with InstanceLock(StateDir(tmp_path / "state"), "forgeqmp commit"):
        code, status = run_cli(tmp_path, "recover")
    assert code == 3  # refused: nothing changed
    assert "another forgeqmp process" in status["error"]
    assert status["state"] == "committing"


def test_recover_without_a_session_changes_nothing(tmp_path: Path) -> None:
    code, status = run_cli(tmp_path, "recover")
    assert code == 0
    assert status["state"] == "none"
    assert not (tmp_path / "state").exists()  # neither the state dir nor its lock was created
