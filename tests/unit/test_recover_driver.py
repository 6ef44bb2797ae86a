"""The recover driver and the CLI without QEMU: the lock probe, ``status`` flagging an interrupted
operation as stale, ``recover`` on a stopped QEMU (an interrupted enable undone, files outside the
record untouched). The crash points are tested in test_crashpoints.py."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from records import make_disk, make_memory, make_qemu, make_record  # tests/unit is on sys.path

from forgeqmp import cli
from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.core.record import DiskRecord, SessionRecord
from forgeqmp.core.states import State
from forgeqmp.ops.recover import lock_held


def make_session(tmp_path: Path, state: State, step: str) -> SessionRecord:
    """A session of two disks whose images exist in ``tmp_path``, and whose QEMU is not running
    (its command line runs the images)."""
    disks = [make_disk(i, root=tmp_path) for i in range(2)]
    for d in disks:
        Path(d.base_file).write_bytes(b"original")
    argv = ("/usr/bin/qemu-system-x86_64", "-m", "256", *blockdevs(disks))
    return make_record(
        state,
        step=step,
        root=tmp_path,
        disks=disks,
        memory=make_memory(root=tmp_path, saved=False),
        qemu=make_qemu(root=tmp_path, argv=argv, env={"PATH": "/usr/bin"}),
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
    save(tmp_path, make_session(tmp_path, State.COMMITTING, "committing"))
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
    record = make_session(tmp_path, State.ACTIVE, "active")
    save(tmp_path, record)
    code, status = run_cli(tmp_path, "status")
    assert code == 0
    assert status["stale"] is False
    assert status["start_argv"][0] == "/usr/bin/qemu-system-x86_64"
    assert "virtio-blk-pci,id=disk0,drive=fq3f2a9c1e-0-fmt" in status["start_argv"]


def test_recover_without_a_session_does_nothing(tmp_path: Path) -> None:
    code, status = run_cli(tmp_path, "recover")
    assert code == 0
    assert status["state"] == "none"


def test_recover_undoes_an_enable_interrupted_before_the_snapshot_with_qemu_stopped(
    tmp_path: Path,
) -> None:
    record = make_session(tmp_path, State.CREATING, "overlays-created")
    state = save(tmp_path, record)
    for d in record.disks:
        assert d.overlay_file is not None
        Path(d.overlay_file).write_bytes(b"")
    assert record.memory is not None
    Path(record.memory.path).write_bytes(b"partial")
    bystander = Path(f"{record.disks[0].overlay_file}.bak")
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
    record = make_session(tmp_path, State.COMMITTING, "committing")
    record = record.evolve_disk("disk0", merged=True)
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
    save(tmp_path, make_session(tmp_path, State.COMMITTING, "committing"))
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


def test_recover_removes_the_temporary_file_of_a_first_record_write_that_was_killed(
    tmp_path: Path,
) -> None:
    """An enable killed while writing its session's first record leaves no record, only the
    atomic write's temporary file: recover removes it (and nothing else) and finds no session."""
    state = StateDir(tmp_path / "state")
    state.ensure()
    killed = state.path / ".session.json.0123456789ab.tmp"
    killed.write_text('{"half": ')
    others = [
        state.path / name for name in (".session.json.tmp", "notes.txt", ".x.0123456789ab.tmp")
    ]
    for other in others:
        other.write_text("the user's")
    code, status = run_cli(tmp_path, "recover")
    assert code == 0
    assert status["state"] == "none"
    assert not killed.exists()
    assert all(other.read_text() == "the user's" for other in others)
