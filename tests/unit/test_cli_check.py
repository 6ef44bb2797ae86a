"""``forgeqmp check OPERATION`` (shared/design/cli-contract.md): exit 0 allowed, 3 blocked with the
reason on stderr, 2 unknown operation; from the session record alone, QEMU never contacted. And
the human side of ``status``: the coloured state, activation time and forged disks."""

from __future__ import annotations

import json
import logging
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from forgeqmp.adapters.statedir import StateDir, default_state_dir
from forgeqmp.cli import main
from forgeqmp.core.guard import missing_overlays
from forgeqmp.core.record import DiskRecord, MemoryRecord, QemuRecord, RecordStore, SessionRecord
from forgeqmp.core.states import State

SID = "5b1d0c2e-8f3a-4c6d-9e7b-1a2b3c4d5e6f"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
BLOCKED = [
    "reinstall",
    "resize",
    "migrate",
    "suspend",
    "unsuspend",
    "disk-add",
    "disk-remove",
    "disk-resize",
    "backup",
    "iso-mount",
    "iso-unmount",
    "image-create",
    "public-interface",
    "destroy",
]
ALLOWED = ["start", "stop", "restart", "kill", "console"]
STATUS_KEYS = {"state", "activated_at", "disks", "memory_file", "memory_restored", "error"}


#: A step each state's record may have been left at (the record's step is typed, not free text).
STEP_OF = {
    State.CREATING: "planned",
    State.ACTIVE: "active",
    State.COMMITTING: "committing",
    State.DISCARDING: "stopping-qemu",
    State.COMMITTED: "committed",
    State.DISCARDED: "discarded",
    State.FAILED: "committing",
}


def make_record(state: State, **changes: Any) -> SessionRecord:
    values: dict[str, Any] = {
        "session_id": SID,
        "state": state,
        "step": STEP_OF[state],
        "strategy": "precopy",
        "created_at": T0,
        "activated_at": T0 + timedelta(seconds=1),
        "updated_at": T0 + timedelta(seconds=2),
        "disks": (
            DiskRecord(
                name="disk0",
                qdev="/machine/peripheral/disk0/virtio-backend",
                device_node="disk0-fmt",
                base_file="/vm/disk0.qcow2",
                base_format="qcow2",
                virtual_size=64 << 20,
                overlay_file="/vm/disk0.fq.qcow2",
                overlay_node="fq-0-fmt",
                overlay_file_node="fq-0-file",
            ),
        ),
        "memory": MemoryRecord(path="/state/memory.bin", transport="fd"),
        "qemu": QemuRecord(
            pid=4242,
            argv=("qemu-system-x86_64",),
            cwd="/vm",
            env={},
            version="10.0.2",
            machine="pc-q35-10.0",
            qmp_socket="/vm/qmp.sock",
        ),
    }
    values.update(changes)
    return SessionRecord(**values)


RECORDS: dict[str, tuple[SessionRecord | None, bool]] = {
    "none": (None, False),
    "creating": (make_record(State.CREATING, activated_at=None), True),
    "active": (make_record(State.ACTIVE), True),
    "committing": (make_record(State.COMMITTING), True),
    "discarding": (make_record(State.DISCARDING), True),
    "committed": (make_record(State.COMMITTED), False),
    "discarded": (make_record(State.DISCARDED), False),
    "failed": (
        make_record(
            State.FAILED,
            failure_phase=State.DISCARDING,
            error="discard could not start the VM",
            next_step="start it with: qemu-system-x86_64, then run 'forgeqmp recover'",
        ),
        True,
    ),
    "failed-rolled-back": (
        make_record(
            State.FAILED,
            failure_phase=State.CREATING,
            rolled_back=True,
            error="enable failed",
            next_step="nothing to do: everything was undone",
        ),
        False,
    ),
}


def state_dir_with(tmp_path: Path, record: SessionRecord | None) -> Path:
    path = tmp_path / "state"
    state = StateDir(path)
    state.ensure()
    if record is not None:
        RecordStore(state).save(record)
    return path


def check(
    capsys: pytest.CaptureFixture[str], state: Path | None, operation: str, *extra: str
) -> tuple[int, str, str]:
    # No QEMU listens on this socket: check must never need one.
    argv = ["--qmp", str(state.parent / "qmp.sock") if state else "/nonexistent/qmp.sock"]
    if state is not None:
        argv += ["--state-dir", str(state)]
    code = main([*argv, *extra, "check", operation])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("subject", list(RECORDS))
def test_exit_codes_for_every_operation_in_every_state(
    subject: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record, unfinished = RECORDS[subject]
    state = state_dir_with(tmp_path, record)
    for operation in BLOCKED + ALLOWED:
        code, out, err = check(capsys, state, operation)
        if unfinished and operation in BLOCKED:
            assert code == 3, (operation, out, err)
            assert out == ""
            assert err.startswith(f"forgeqmp: {operation} is blocked: forge session {SID} is ")
            assert ("recover" in err) or ("'forgeqmp commit'" in err)
        elif operation in STOPS_QEMU and record is not None and missing_overlays(record):
            # The records' overlay files do not exist: QEMU's open file would be the only copy.
            assert code == 3, (operation, out, err)
            assert err.startswith(f"forgeqmp: {operation} is blocked: the overlay file of ")
        else:
            assert (code, err) == (0, ""), (operation, err)
            assert out.startswith(f"{operation} is allowed: ")


STOPS_QEMU = ("stop", "restart", "kill")


@pytest.mark.parametrize("subject", ["active", "committing"])
def test_stopping_qemu_is_blocked_once_an_overlay_is_deleted(
    subject: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While the overlay exists, stop/restart/kill are allowed (start_argv restarts on it); once
    it is deleted, the running QEMU's open file is the only copy of the guest's writes: refused
    (3), and the JSON says what to do. Nothing is changed either way."""
    record, _ = RECORDS[subject]
    assert record is not None
    overlay = tmp_path / "disk0.fq.qcow2"
    overlay.write_bytes(b"overlay")
    record = record.evolve(disks=(attrs.evolve(record.disks[0], overlay_file=str(overlay)),))
    state = state_dir_with(tmp_path, record)
    saved = (state / "session.json").read_bytes()
    for operation in STOPS_QEMU:
        assert check(capsys, state, operation)[0] == 0, operation
    overlay.unlink()
    for operation in STOPS_QEMU:
        code, out, err = check(capsys, state, operation, "--json")
        assert code == 3, (operation, err)
        assert str(overlay) in err
        obj = json.loads(out.splitlines()[-1])
        assert (obj["state"], obj["allowed"], obj["exit_code"], obj["error_kind"]) == (
            subject,
            False,
            3,
            "operation-blocked",
        )
        assert "'forgeqmp commit'" in obj["next_step"]
    assert check(capsys, state, "console")[0] == 0
    assert check(capsys, state, "start")[0] == 0
    assert (state / "session.json").read_bytes() == saved


def test_the_blocked_message_says_why_and_how_to_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_dir_with(tmp_path, RECORDS["active"][0])
    code, _, err = check(capsys, state, "backup")
    assert code == 3
    assert "is active, and a backup now copies a trial state" in err
    assert "'forgeqmp commit' keeps what changed since enable" in err
    assert "'forgeqmp discard' throws it away" in err
    state = state_dir_with(tmp_path / "f", RECORDS["failed"][0])
    code, _, err = check(capsys, state, "destroy")
    assert code == 3
    assert "is failed" in err
    assert "then run 'forgeqmp recover'" in err


@pytest.mark.parametrize("operation", ["snapshot", "", "reboot", "disk add"])
def test_an_unknown_operation_is_exit_2(
    operation: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_dir_with(tmp_path, RECORDS["active"][0])
    code, out, err = check(capsys, state, operation)
    assert code == 2
    assert out == ""
    assert "unknown operation" in err
    assert all(name in err for name in BLOCKED + ALLOWED)


def test_a_missing_operation_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--qmp", str(tmp_path / "qmp.sock"), "check"])
    assert info.value.code == 2
    assert "OPERATION" in capsys.readouterr().err


def test_an_unreadable_record_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = state_dir_with(tmp_path, None)
    (state / "session.json").write_text('{"format": 1}')
    code, _, err = check(capsys, state, "reinstall")
    assert code == 3
    assert "record cannot be read" in err
    assert check(capsys, state, "console")[0] == 0


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = state_dir_with(tmp_path, RECORDS["active"][0])
    code, out, err = check(capsys, state, "migrate", "--json")
    assert code == 3
    assert err.startswith("forgeqmp: migrate is blocked")
    obj = json.loads(out.splitlines()[-1])
    assert set(obj) >= STATUS_KEYS
    assert (obj["state"], obj["operation"], obj["allowed"], obj["exit_code"]) == (
        "active",
        "migrate",
        False,
        3,
    )
    assert obj["error"] == err.removeprefix("forgeqmp: ").strip()
    code, out, _ = check(capsys, state, "console", "--json")
    obj = json.loads(out)
    assert (code, obj["state"], obj["operation"], obj["allowed"]) == (0, "active", "console", True)


def test_the_state_dir_derives_from_the_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGEQMP_STATE_HOME", str(tmp_path / "home"))
    socket = tmp_path / "vm1" / "qmp.sock"  # nothing listens there: QEMU is not running
    state = StateDir(default_state_dir(socket))
    state.ensure()
    RecordStore(state).save(RECORDS["committing"][0])  # type: ignore[arg-type]
    assert main(["--qmp", str(socket), "check", "disk-remove"]) == 3
    assert "is committing" in capsys.readouterr().err
    monkeypatch.setenv("FORGEQMP_QMP", str(socket))
    assert main(["check", "console"]) == 0
    other = tmp_path / "vm2" / "qmp.sock"
    assert main(["--qmp", str(other), "check", "disk-remove"]) == 0  # another instance


# --- status, for people --------------------------------------------------------------------------


def test_status_text_shows_state_activation_and_disks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_dir_with(tmp_path, RECORDS["active"][0])
    assert main(["--qmp", str(tmp_path / "qmp.sock"), "--state-dir", str(state), "status"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"forge session {SID}: Active"
    assert "\x1b[" not in out  # not a terminal: no colour codes
    assert "  activated: 2024-05-01T12:00:01+00:00 (active for " in out
    assert "    disk0: base /vm/disk0.qcow2" in lines
    assert "           overlay /vm/disk0.fq.qcow2" in lines


def test_status_without_a_session_or_a_qemu_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped socket path must not read as "no session here" (exit 0): exit 5, as the contract.
    state = state_dir_with(tmp_path, None)
    assert main(["--qmp", str(tmp_path / "qmp.sock"), "--state-dir", str(state), "status"]) == 5
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "has no session" in captured.err


def test_error_messages_say_what_to_do_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Exit 5 (unreachable) already says what to check; a usage error says to see --help.
    code = main(["--qmp", str(tmp_path / "nothing.sock"), "--state-dir", str(tmp_path), "enable"])
    err = capsys.readouterr().err
    assert code == 5
    assert "check that QEMU is running" in err
    state = state_dir_with(tmp_path / "x", None)
    code = main(["--qmp", str(tmp_path / "qmp.sock"), "--state-dir", str(state), "commit"])
    err = capsys.readouterr().err
    # The record is read first; with no session to act on offline, an unreachable QEMU is exit 5
    # (as for a socket that does not speak QMP), and the message says both.
    assert code == 5
    assert "check that QEMU is running" in err
    assert f"the state dir {state} holds no session commit could act on" in err


def test_check_start_during_a_session_prints_the_command_line_that_keeps_the_forge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from forgeqmp.ops.power import start_argv

    record = make_record(
        State.ACTIVE,
        qemu=attrs.evolve(
            make_record(State.ACTIVE).qemu,
            argv=(
                "qemu-system-x86_64",
                "-blockdev",
                "driver=file,filename=/vm/disk0.qcow2,node-name=disk0-file",
                "-blockdev",
                "driver=qcow2,file=disk0-file,node-name=disk0-fmt",
                "-device",
                "virtio-blk-pci,id=disk0,drive=disk0-fmt",
            ),
        ),
    )
    overlay = tmp_path / "disk0.qcow2.forge.qcow2"
    overlay.write_bytes(b"")  # present: a deleted overlay blocks restart (see above)
    record = attrs.evolve(record, disks=(attrs.evolve(record.disks[0], overlay_file=str(overlay)),))
    state = state_dir_with(tmp_path, record)
    for operation in ("start", "restart"):
        code = main(
            ["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "check", operation]
        )
        out = capsys.readouterr().out
        assert code == 0
        expected = shlex.join(start_argv(record))
        assert str(overlay) in expected  # the overlay, not the base
        assert out.splitlines()[-1] == f"  {expected}"


def test_quiet_prints_no_report_and_keeps_the_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_dir_with(tmp_path, make_record(State.ACTIVE))
    qmp = str(tmp_path / "q.sock")
    assert main(["-q", "--qmp", qmp, "--state-dir", str(state), "check", "console"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["-q", "--qmp", qmp, "--state-dir", str(state), "check", "destroy"]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "destroy is blocked" in captured.err
    # --json -q: the final object only.
    assert main(["-q", "--json", "--qmp", qmp, "--state-dir", str(state), "check", "console"]) == 0
    assert json.loads(capsys.readouterr().out)["allowed"] is True


@pytest.mark.parametrize(
    ("flag", "forgeqmp_level", "qmp_level"),
    [
        (None, logging.WARNING, logging.CRITICAL + 1),
        ("-v", logging.INFO, logging.CRITICAL + 1),
        ("--verbose", logging.INFO, logging.CRITICAL + 1),
        ("--debug", logging.DEBUG, logging.DEBUG),
    ],
)
def test_verbosity_flags_set_the_documented_loggers(
    tmp_path: Path, flag: str | None, forgeqmp_level: int, qmp_level: int
) -> None:
    state = state_dir_with(tmp_path, None)
    argv = ["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "check", "console"]
    assert main([flag, *argv] if flag else argv) == 0
    assert logging.getLogger("forgeqmp").level == forgeqmp_level
    assert logging.getLogger("qemu.qmp").level == qmp_level


def test_verbose_debug_and_quiet_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["-v", "-q", "--qmp", str(tmp_path / "q.sock"), "status"])
    assert info.value.code == 2
