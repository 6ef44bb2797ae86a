"""The CLI's error truth, without QEMU: stable error kinds (pinned and documented), task-group
errors opened down to their causes, the end state an operation returns mapped to its exit code,
and unexpected exceptions turned into exit 4 with the record updated."""

from __future__ import annotations

import errno
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from records import make_record  # tests/unit is on sys.path (no package)

import forgeqmp.errors as errors
from forgeqmp import cli
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.core.record import RecordStore
from forgeqmp.core.states import State
from forgeqmp.errors import (
    INTERNAL_ERROR_KIND,
    ForgeError,
    ForgeFailed,
    QMPDisconnected,
    describe_cause,
    error_kind,
    leaf_errors,
)
from forgeqmp.ops.commit import _job_never_created, _JobsSent

DOCS = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"

#: Every error class and its kind: renaming a class must not change what scripts see.
KINDS = {
    "DiskNotForgeable": "disk-not-forgeable",
    "FeatureMissing": "feature-missing",
    "ForgeError": "forge-error",
    "ForgeFailed": "forge-failed",
    "IllegalTransition": "illegal-transition",
    "InstanceLocked": "instance-locked",
    "InsufficientSpace": "insufficient-space",
    "InvalidArgument": "invalid-argument",
    "MigrationBlocked": "migration-blocked",
    "NoDiskSelected": "no-disk-selected",
    "NoSession": "no-session",
    "NotQMP": "not-qmp",
    "NotRelaunchable": "not-relaunchable",
    "OperationBlocked": "operation-blocked",
    "PrerequisiteError": "prerequisite-error",
    "QEMUUnreachable": "qemu-unreachable",
    "QMPCommandError": "qmp-command-error",
    "QMPDisconnected": "qmp-disconnected",
    "QMPError": "qmp-error",
    "QMPTimeout": "qmp-timeout",
    "RecordError": "record-error",
    "RecordUnreadable": "record-unreadable",
    "SessionActive": "session-active",
    "TaskRunning": "task-running",
    "UnknownDisk": "unknown-disk",
    "UnsafeStateDir": "unsafe-state-dir",
    "VMNotRunning": "vm-not-running",
}


def error_classes() -> dict[str, type[ForgeError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, ForgeError)
    }


def test_every_error_class_has_its_pinned_kind() -> None:
    assert {name: cls.error_kind for name, cls in error_classes().items()} == KINDS


def test_the_troubleshooting_page_lists_every_kind_with_its_exit_code() -> None:
    text = DOCS.read_text()
    for name, cls in error_classes().items():
        row = f"| `{cls.error_kind}` | {cls.exit_code} | {{py:class}}`~forgeqmp.errors.{name}` |"
        assert row in text, row
    assert f"| `{INTERNAL_ERROR_KIND}` | 4 |" in text


def test_refusals_of_records_and_state_dirs_are_exit_3_and_still_record_errors() -> None:
    assert issubclass(errors.RecordUnreadable, errors.RecordError)
    assert issubclass(errors.UnsafeStateDir, errors.RecordError)
    assert errors.RecordUnreadable.exit_code == errors.UnsafeStateDir.exit_code == 3
    assert errors.RecordError.exit_code == 4


def test_task_group_errors_are_opened_to_their_causes() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    group = BaseExceptionGroup(
        "unhandled errors in a TaskGroup",
        [ExceptionGroup("inner", [ForgeFailed("committing disk d0 failed: boom")]), full],
    )
    assert leaf_errors(group)[1] is full
    text = describe_cause(group)
    assert text == ("committing disk d0 failed: boom; OSError: [Errno 28] No space left on device")
    assert "TaskGroup" not in text
    assert error_kind(group) == "forge-failed"
    assert error_kind(KeyError("x")) == INTERNAL_ERROR_KIND
    assert describe_cause(TimeoutError()) == "a deadline passed"
    # The same cause from several tasks is said once.
    twice = ExceptionGroup("g", [QMPDisconnected("gone"), QMPDisconnected("gone")])
    assert describe_cause(twice) == "gone"


def test_a_job_counts_as_never_created_only_when_that_is_certain() -> None:
    record = make_record(State.COMMITTING)
    disk = record.disks[0]
    assert disk.overlay_node is not None
    job = f"{disk.overlay_node.removesuffix('-fmt')}-commit"
    assert _job_never_created(disk, _JobsSent(), existing=None)  # never sent
    sent = _JobsSent(sent={disk.name})
    assert not _job_never_created(disk, sent, existing=None)  # QEMU did not say: assume written
    assert _job_never_created(disk, sent, existing=set())  # sent, and QEMU has no such job
    assert not _job_never_created(disk, sent, existing={job})
    accepted = _JobsSent(sent={disk.name}, accepted={disk.name})
    assert not _job_never_created(disk, accepted, existing=set())  # it ran (and was dismissed)


@pytest.mark.parametrize(
    ("command", "state", "rolled_back", "failed"),
    [
        ("enable", State.ACTIVE, False, False),
        ("enable", State.FAILED, True, True),
        ("commit", State.COMMITTED, False, False),
        ("commit", State.FAILED, False, True),
        ("discard", State.DISCARDED, False, False),
        ("discard", State.FAILED, False, True),  # it returned instead of raising: still 4
        ("recover", State.ACTIVE, False, False),
        ("recover", State.COMMITTED, False, False),
        ("recover", State.FAILED, True, False),  # rolled back: nothing left to do
        ("recover", State.FAILED, False, True),
    ],
)
def test_the_returned_end_state_decides_the_exit_code(
    command: str, state: State, rolled_back: bool, failed: bool
) -> None:
    changes: dict[str, Any] = {}
    if state is State.FAILED:
        changes = {
            "failure_phase": State.DISCARDING if not rolled_back else State.CREATING,
            "rolled_back": rolled_back,
            "error": "it broke",
            "next_step": "do this",
        }
    record = make_record(state, **changes)
    why = cli._end_state_failure(command, record)
    assert (why is not None) == failed, why
    if why is not None:
        assert "it broke" in why
        assert "do this" in why
    assert cli._end_state_failure("recover", None) is None


def test_an_unexpected_error_is_exit_4_with_its_cause_and_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug inside an operation (here: a KeyError raised in a task group while committing): no
    traceback, exit 4, the cause in the JSON and in the record, which says FAILED in the phase it
    was in, so that status tells the truth and recover finishes it."""
    state = tmp_path / "state"
    StateDir(state).ensure()
    RecordStore(StateDir(state)).save(make_record(State.COMMITTING))

    def broken(*_args: Any) -> None:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [KeyError("current-progress")])

    monkeypatch.setattr(cli.anyio, "run", broken)
    code = cli.main(["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "--json",
                     "commit"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 4
    assert "Traceback" not in err
    assert "KeyError: 'current-progress'" in err
    final = json.loads(out.splitlines()[-1])
    assert (final["state"], final["exit_code"], final["error_kind"]) == (
        "failed",
        4,
        INTERNAL_ERROR_KIND,
    )
    assert "recover" in final["next_step"]
    record = RecordStore(StateDir(state)).load()
    assert record is not None
    assert (record.state, record.failure_phase) == (State.FAILED, State.COMMITTING)
    assert "KeyError: 'current-progress'" in (record.error or "")
    assert "TaskGroup" not in (record.error or "")


def test_an_interrupt_stays_an_interrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    StateDir(state).ensure()
    RecordStore(StateDir(state)).save(make_record(State.COMMITTING))
    saved = (state / "session.json").read_bytes()

    def interrupted(*_args: Any) -> None:
        raise BaseExceptionGroup("g", [KeyboardInterrupt()])

    monkeypatch.setattr(cli.anyio, "run", interrupted)
    code = cli.main(["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "commit"])
    assert code == 130  # as shells report SIGINT
    err = capsys.readouterr().err
    assert "interrupted; the session was left committing at step committing" in err
    assert "'forgeqmp recover' finishes it" in err
    assert (state / "session.json").read_bytes() == saved  # recover judges what it left


@pytest.mark.parametrize(
    ("record", "advice"),
    [
        (None, "nothing was left changed; nothing to recover"),
        (
            make_record(State.FAILED, rolled_back=True),
            "nothing was left changed; nothing to recover",
        ),
        (make_record(State.ACTIVE), "the session is active, as before; nothing is left to recover"),
    ],
    ids=["no-session", "rolled-back", "active"],
)
def test_an_interrupt_with_nothing_left_does_not_send_the_user_to_recover(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    record: Any,
    advice: str,
) -> None:
    state = tmp_path / "state"
    StateDir(state).ensure()
    if record is not None:
        RecordStore(StateDir(state)).save(record)

    def interrupted(*_args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.anyio, "run", interrupted)
    code = cli.main(["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "enable"])
    err = capsys.readouterr().err
    assert code == 130
    assert err == f"forgeqmp: interrupted; {advice}\n"


def test_a_refusal_that_changed_the_record_is_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    StateDir(state).ensure()
    store = RecordStore(StateDir(state))
    store.save(make_record(State.ACTIVE))

    def refuses_late(*_args: Any) -> None:
        store.save(make_record(State.COMMITTING))  # something happened before the "refusal"
        raise errors.TaskRunning("a block job runs")

    monkeypatch.setattr(cli.anyio, "run", refuses_late)
    code = cli.main(["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "commit"])
    assert code == 4
    assert "the session record changed meanwhile" in capsys.readouterr().err


def _json_final(out: str) -> dict[str, Any]:
    final = json.loads(out.splitlines()[-1])
    assert isinstance(final, dict)
    return final


def test_a_refused_command_says_it_changed_nothing_and_keeps_the_old_sessions_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enable refused (unknown disk) after an older, discarded session: the object's `state` is
    that session's own, and `command`/`changed` say the refusal did nothing to it."""
    state = tmp_path / "state"
    StateDir(state).ensure()
    RecordStore(StateDir(state)).save(make_record(State.DISCARDED))
    saved = (state / "session.json").read_bytes()

    def refuses(*_args: Any) -> None:
        raise errors.UnknownDisk("vdz", ["vda"])

    monkeypatch.setattr(cli.anyio, "run", refuses)
    code = cli.main(["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "--json",
                     "enable", "--disk", "vdz"])  # fmt: skip
    final = _json_final(capsys.readouterr().out)
    assert code == 2
    assert (final["state"], final["command"], final["changed"]) == ("discarded", "enable", False)
    assert (final["error_kind"], final["exit_code"]) == ("unknown-disk", 2)
    assert (state / "session.json").read_bytes() == saved


def test_a_failure_that_changed_the_record_says_so_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    StateDir(state).ensure()
    store = RecordStore(StateDir(state))
    store.save(make_record(State.ACTIVE))

    def fails(*_args: Any) -> None:
        store.save(make_record(State.FAILED))
        raise errors.ForgeFailed("commit stopped")

    monkeypatch.setattr(cli.anyio, "run", fails)
    code = cli.main(["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "--json",
                     "commit"])  # fmt: skip
    final = _json_final(capsys.readouterr().out)
    assert code == 4
    assert (final["state"], final["command"], final["changed"]) == ("failed", "commit", True)
    assert final["error_kind"] == "forge-failed"


def test_an_interrupt_with_json_ends_with_a_final_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    StateDir(state).ensure()
    RecordStore(StateDir(state)).save(make_record(State.COMMITTING))

    def interrupted(*_args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.anyio, "run", interrupted)
    code = cli.main(["--qmp", str(tmp_path / "q.sock"), "--state-dir", str(state), "--json",
                     "commit"])  # fmt: skip
    final = _json_final(capsys.readouterr().out)
    assert code == 130
    assert (final["error_kind"], final["exit_code"], final["command"]) == (
        "interrupted",
        130,
        "commit",
    )
    assert final["state"] == "committing"
    assert final["changed"] is False
    assert "'forgeqmp recover' finishes it" in final["next_step"]
