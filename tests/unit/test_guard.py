"""The guard (sans-IO): every platform operation in every state, the QMP mapping command by
command, HMP and transactions, the record-only check, and the docs page generated from the data."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import pytest
from fakeqmp import FakeQMP  # tests/unit is on sys.path
from hypothesis import given
from hypothesis import strategies as st
from records import SID, make_record  # tests/unit is on sys.path

from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.core import guard
from forgeqmp.core.guard import (
    Operation,
    check_operation,
    check_qmp_command,
    check_recorded,
    may_refuse,
    parse_operation,
    render_markdown,
)
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import Failure, SessionStatus, State
from forgeqmp.errors import InstanceLocked, InvalidArgument, OperationBlocked, RecordError
from forgeqmp.forge import Instance

ROOT = Path(__file__).resolve().parents[2]

# The contract (shared/design/cli-contract.md), written out independently of the code.
CONTRACT_BLOCKED = [
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
CONTRACT_ALLOWED = ["start", "stop", "restart", "kill", "console"]


def failed(*, rolled_back: bool, phase: State = State.CREATING) -> SessionRecord:
    return make_record(
        State.FAILED,
        failure_phase=phase,
        rolled_back=rolled_back,
        error="enable failed at step migration-started: boom",
        next_step="nothing to do: everything was undone"
        if rolled_back
        else "run 'forgeqmp commit' again to finish the disks still on overlays",
    )


#: Every kind of session the guard can face, and whether it is unfinished (written out by hand).
SUBJECTS: dict[str, tuple[SessionRecord | None, bool]] = {
    "no-session": (None, False),
    "creating": (make_record(State.CREATING, step="planned", activated_at=None), True),
    "active": (make_record(State.ACTIVE), True),
    "committing": (make_record(State.COMMITTING, step="committing"), True),
    "discarding": (make_record(State.DISCARDING, step="stopping-qemu"), True),
    "committed": (make_record(State.COMMITTED, step="committed"), False),
    "discarded": (make_record(State.DISCARDED, step="discarded"), False),
    "failed": (failed(rolled_back=False, phase=State.COMMITTING), True),
    "failed-rolled-back": (failed(rolled_back=True), False),
}


# --- platform operations -------------------------------------------------------------------------


def test_operations_are_exactly_the_contracts() -> None:
    assert [op.value for op in Operation] == CONTRACT_BLOCKED + CONTRACT_ALLOWED
    assert [op.value for op in guard.BLOCKED_OPERATIONS] == CONTRACT_BLOCKED
    assert [op.value for op in guard.ALWAYS_ALLOWED] == CONTRACT_ALLOWED
    for op in Operation:
        assert op.blocked_during_session is (op.value in CONTRACT_BLOCKED)
        assert op.why


@pytest.mark.parametrize("subject", list(SUBJECTS))
@pytest.mark.parametrize("operation", CONTRACT_BLOCKED + CONTRACT_ALLOWED)
def test_every_operation_in_every_state(subject: str, operation: str) -> None:
    record, unfinished = SUBJECTS[subject]
    expect_blocked = unfinished and operation in CONTRACT_BLOCKED
    for given_as in (operation, parse_operation(operation)):
        if expect_blocked:
            with pytest.raises(OperationBlocked) as info:
                check_operation(record, given_as)
            assert info.value.exit_code == 3
        else:
            check_operation(record, given_as)
    # The status alone gives the same answer as the record.
    if record is not None:
        from forgeqmp.core.lifecycle import status_of

        if expect_blocked:
            with pytest.raises(OperationBlocked):
                check_operation(status_of(record), operation)
        else:
            check_operation(status_of(record), operation)


@pytest.mark.parametrize(
    ("subject", "hint"),
    [
        ("active", "'forgeqmp commit' keeps"),
        ("creating", "enable is under way"),
        ("committing", "commit is under way"),
        ("discarding", "discard is under way"),
        ("failed", "run 'forgeqmp commit' again"),
    ],
)
def test_the_refusal_names_the_session_its_state_and_how_to_finish(subject: str, hint: str) -> None:
    record, _ = SUBJECTS[subject]
    assert record is not None
    with pytest.raises(OperationBlocked) as info:
        check_operation(record, "disk-resize")
    error = info.value
    message = str(error)
    assert message.startswith("disk-resize is blocked: ")
    assert SID in message
    assert f"is {record.state.value}" in message
    assert hint in message
    assert "discard refuses a disk whose size changed" in message  # why
    assert (error.operation, error.session_id, error.state) == (
        "disk-resize",
        SID,
        record.state.value,
    )
    assert error.next_step is not None
    assert hint in error.next_step
    assert "recover" in error.next_step or subject == "active"


def test_a_bare_status_is_named_the_forge_session() -> None:
    with pytest.raises(OperationBlocked, match="the forge session is active") as info:
        check_operation(SessionStatus(State.ACTIVE), Operation.BACKUP)
    assert info.value.session_id is None


@pytest.mark.parametrize("text", ["backup", "BACKUP", " Disk-Add ", "disk_add", "iso_mount"])
def test_parse_operation_is_lenient_about_case_and_separators(text: str) -> None:
    assert parse_operation(text).value == text.strip().lower().replace("_", "-")


@pytest.mark.parametrize("text", ["", "snapshot", "disk add", "reboot", None, 3])
def test_an_unknown_operation_is_exit_2_and_lists_the_valid_names(text: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_operation(text)
    assert info.value.exit_code == 2
    for name in CONTRACT_BLOCKED + CONTRACT_ALLOWED:
        assert name in str(info.value)
    with pytest.raises(InvalidArgument):
        check_operation(None, text)


phases = st.sampled_from([State.CREATING, State.ACTIVE, State.COMMITTING, State.DISCARDING])


@st.composite
def statuses(draw: st.DrawFn) -> SessionStatus:
    state = draw(st.sampled_from(State))
    if state is not State.FAILED:
        return SessionStatus(state)
    rolled_back = draw(st.booleans())
    phase = draw(phases)
    merged = (
        () if rolled_back or phase is not State.COMMITTING else draw(st.sampled_from([(), ("d0",)]))
    )
    failure = Failure(
        phase=phase,
        reason="it broke",
        next_step="do this",
        rolled_back=rolled_back,
        merged_disks=merged,
    )
    return SessionStatus(State.FAILED, failure)


@given(statuses(), st.sampled_from(Operation))
def test_blocked_exactly_when_unfinished_and_blockable(
    status: SessionStatus, op: Operation
) -> None:
    if status.finished or op.value in CONTRACT_ALLOWED:
        check_operation(status, op)
    else:
        with pytest.raises(OperationBlocked, match=f"is {status.state.value}, and"):
            check_operation(status, op)


def _there(_path: str) -> bool:
    return True


def test_check_recorded_reads_through_the_loader() -> None:
    record, _ = SUBJECTS["active"]
    assert check_recorded(lambda: None, "destroy", exists=_there) is None
    assert check_recorded(lambda: record, "console", exists=_there) is record
    with pytest.raises(OperationBlocked):
        check_recorded(lambda: record, "destroy", exists=_there)


def test_check_recorded_asks_the_caller_whether_the_overlays_are_there() -> None:
    """The guard does no I/O: stopping QEMU is blocked when the caller's ``exists`` says an
    overlay of the session is gone (QEMU's open file is then the only copy of the writes)."""
    record, _ = SUBJECTS["active"]
    asked: list[str] = []

    def gone(path: str) -> bool:
        asked.append(path)
        return False

    assert check_recorded(lambda: record, "stop", exists=_there) is record
    with pytest.raises(OperationBlocked, match="overlay"):
        check_recorded(lambda: record, "stop", exists=gone)
    assert asked == [d.overlay_file for d in record.disks if d.overlay_node is not None]


def test_an_unreadable_record_blocks_what_a_session_could_block() -> None:
    def broken() -> SessionRecord | None:
        raise RecordError("session.json: invalid session record: field x is missing; fix it")

    for name in CONTRACT_ALLOWED:
        assert check_recorded(broken, name, exists=_there) is None
    for name in CONTRACT_BLOCKED:
        with pytest.raises(OperationBlocked, match="cannot be read") as info:
            check_recorded(broken, name, exists=_there)
        assert "field x is missing" in str(info.value)
        assert info.value.state is None
    with pytest.raises(InvalidArgument):  # a bad name is still a usage error
        check_recorded(broken, "nope", exists=_there)


# --- QMP commands --------------------------------------------------------------------------------

UNFINISHED = {"creating", "active", "committing", "discarding", "failed"}
WORKING = {"creating", "committing", "discarding"}
MIGRATING = {"creating", "discarding"}
JOBS = {"creating", "committing"}

#: command → (arguments it is refused with, arguments it is allowed with or None if refused
#: whatever they are, the subjects in which it is refused). Every command of the mapping is here.
EXAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any] | None, set[str]]] = {
    "block_resize": (
        {"node-name": "fq3f2a9c1e-0-fmt", "size": 1},
        {"node-name": "other", "size": 1},
        UNFINISHED,
    ),
    "block-resize": ({"device": "disk0", "size": 1}, {"device": "other", "size": 1}, UNFINISHED),
    "blockdev-del": ({"node-name": "fq3f2a9c1e-0-file"}, {"node-name": "scratch-fmt"}, UNFINISHED),
    "device_del": ({"id": "disk0"}, {"id": "nic0"}, UNFINISHED),
    "device_add": (
        {"driver": "virtio-blk-pci", "drive": "new-fmt", "id": "d9"},
        {"driver": "virtio-net-pci", "id": "nic1"},
        UNFINISHED,
    ),
    "blockdev-add": (
        {"driver": "raw", "node-name": "peek", "file": "disk0-fmt"},
        {"driver": "file", "node-name": "iso", "filename": "/iso/boot.iso"},
        UNFINISHED,
    ),
    "blockdev-reopen": (
        {"options": [{"driver": "qcow2", "node-name": "fq3f2a9c1e-0-fmt", "backing": None}]},
        {"options": [{"driver": "qcow2", "node-name": "other"}]},
        UNFINISHED,
    ),
    "x-blockdev-reopen": ({"driver": "qcow2", "node-name": "x"}, {"node-name": "x"}, set()),
    "x-blockdev-change": (
        {"parent": "disk0-fmt", "node": "n"},
        {"parent": "q0", "node": "n"},
        UNFINISHED,
    ),
    "blockdev-create": (
        {"job-id": "j", "options": {"driver": "qcow2", "file": "fq3f2a9c1e-0-file", "size": 1}},
        {"job-id": "j", "options": {"driver": "qcow2", "file": "new-file", "size": 1}},
        UNFINISHED,
    ),
    "x-blockdev-create": (
        {"job-id": "j", "options": {"driver": "file", "filename": "/vm/disk0.qcow2", "size": 1}},
        {"job-id": "j", "options": {"driver": "file", "filename": "/vm/new.img", "size": 1}},
        UNFINISHED,
    ),
    "blockdev-amend": (
        {"job-id": "j", "node-name": "disk0-fmt", "options": {}},
        {"job-id": "j", "node-name": "x", "options": {}},
        UNFINISHED,
    ),
    "x-blockdev-amend": (
        {"job-id": "j", "node-name": "fq3f2a9c1e-0-fmt", "options": {}},
        {"job-id": "j", "node-name": "x", "options": {}},
        UNFINISHED,
    ),
    "blockdev-snapshot-sync": (
        {"device": "disk0", "snapshot-file": "/vm/s.qcow2"},
        {"device": "scratch", "snapshot-file": "/vm/s.qcow2"},
        UNFINISHED,
    ),
    "blockdev-snapshot": (
        {"node": "fq3f2a9c1e-0-fmt", "overlay": "new"},
        {"node": "scratch-fmt", "overlay": "new"},
        UNFINISHED,
    ),
    "blockdev-snapshot-internal-sync": (
        {"device": "disk0", "name": "s"},
        {"device": "scratch", "name": "s"},
        UNFINISHED,
    ),
    "blockdev-snapshot-delete-internal-sync": (
        {"device": "disk0", "name": "s"},
        {"device": "scratch", "name": "s"},
        UNFINISHED,
    ),
    "drive-backup": (
        {"device": "scratch", "target": "disk0.qcow2", "sync": "full"},  # relative to QEMU's cwd
        {"device": "scratch", "target": "/backup/scratch.qcow2", "sync": "full"},
        UNFINISHED,
    ),
    "blockdev-backup": (
        {"device": "disk0-fmt", "target": "b", "sync": "full"},
        {"device": "scratch-fmt", "target": "b", "sync": "full"},
        UNFINISHED,
    ),
    "drive-mirror": (
        {"device": "disk0", "target": "/m.qcow2", "sync": "full"},
        {"device": "scratch", "target": "/m.qcow2", "sync": "full"},
        UNFINISHED,
    ),
    "blockdev-mirror": (
        {"device": "x", "target": "t", "replaces": "fq3f2a9c1e-0-fmt", "sync": "full"},
        {"device": "x", "target": "t", "sync": "full"},
        UNFINISHED,
    ),
    "block-stream": ({"device": "fq3f2a9c1e-0-fmt"}, {"device": "scratch-fmt"}, UNFINISHED),
    "block-commit": (
        {"device": "x", "top-node": "fq3f2a9c1e-0-fmt", "base-node": "disk0-fmt"},
        {"device": "scratch-fmt"},
        UNFINISHED,
    ),
    "block-export-add": (
        {"type": "nbd", "id": "e", "node-name": "disk0-fmt"},
        {"type": "nbd", "id": "e", "node-name": "iso"},
        UNFINISHED,
    ),
    "nbd-server-add": ({"device": "disk0"}, {"device": "cd0"}, UNFINISHED),
    **{
        command: ({"id": "fq3f2a9c1e-0-commit"}, {"id": "backup-job"}, JOBS)
        for command in ("job-cancel", "job-complete", "job-finalize", "job-dismiss", "job-pause")
    },
    **{
        command: ({"device": "fq3f2a9c1e-0-create"}, {"device": "backup-job"}, JOBS)
        for command in (
            "block-job-cancel",
            "block-job-complete",
            "block-job-finalize",
            "block-job-dismiss",
            "block-job-pause",
        )
    },
    **{
        command: ({"id": "cd0"}, None, UNFINISHED)
        for command in (
            "blockdev-change-medium",
            "change",
            "blockdev-insert-medium",
            "blockdev-close-tray",
            "eject",
            "blockdev-open-tray",
            "blockdev-remove-medium",
        )
    },
    "migrate": ({"uri": "tcp:10.0.0.2:4444"}, None, UNFINISHED),
    "migrate-incoming": ({"uri": "defer"}, None, UNFINISHED),
    **{
        command: ({}, None, MIGRATING)
        for command in (
            "migrate_cancel",
            "migrate-continue",
            "migrate-pause",
            "migrate-recover",
            "migrate-start-postcopy",
            "migrate-set-capabilities",
            "migrate-set-parameters",
            "migrate_set_speed",
            "migrate_set_downtime",
            "migrate-set-cache-size",
        )
    },
    "snapshot-save": (
        {"job-id": "s", "tag": "t", "vmstate": "disk0-fmt", "devices": []},
        None,
        UNFINISHED,
    ),
    "snapshot-load": ({"job-id": "s", "tag": "t", "vmstate": "x", "devices": []}, None, UNFINISHED),
    "snapshot-delete": ({"job-id": "s", "tag": "t", "devices": []}, None, UNFINISHED),
    "set_link": ({"name": "nic0", "up": False}, None, UNFINISHED),
    "quit": ({}, None, WORKING),
    "system_powerdown": ({}, None, WORKING),
    "qemu-io": (
        {"device": "disk0", "command": "write 0 4k"},
        {"device": "scratch", "command": "write 0 4k"},
        UNFINISHED,
    ),
}
# x-blockdev-reopen takes the options at the top level in QEMU 6.0-; the rule looks at "options".
EXAMPLES["x-blockdev-reopen"] = (
    {"options": [{"node-name": "disk0-fmt", "read-only": False}]},
    {"options": [{"node-name": "scratch-fmt"}]},
    UNFINISHED,
)


def test_every_mapped_command_has_an_example() -> None:
    mapped = {command for rule in guard.QMP_RULES for command in rule.commands}
    assert mapped == set(EXAMPLES)


@pytest.mark.parametrize("command", sorted(EXAMPLES))
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_each_mapped_command_in_each_state(command: str, subject: str) -> None:
    refused_with, allowed_with, refused_in = EXAMPLES[command]
    record, _ = SUBJECTS[subject]
    assert may_refuse(command, refused_with)
    if subject in refused_in:
        with pytest.raises(OperationBlocked) as info:
            check_qmp_command(record, command, refused_with)
        assert info.value.exit_code == 3
        assert command in str(info.value)
        assert info.value.operation == command
        if record is not None:
            assert SID in str(info.value)
    else:
        check_qmp_command(record, command, refused_with)
    if allowed_with is not None:
        check_qmp_command(record, command, allowed_with)


@pytest.mark.parametrize(
    ("command", "arguments", "named"),
    [
        (
            "block_resize",
            {"node-name": "fq3f2a9c1e-0-fmt", "size": 1},
            "disk 'disk0''s overlay node",
        ),
        ("block_resize", {"node-name": "disk0-fmt", "size": 1}, "original node 'disk0-fmt'"),
        ("blockdev-del", {"node-name": "fq3f2a9c1e-0-file"}, "overlay file node"),
        ("device_del", {"id": "disk0"}, "disk 'disk0''s device"),
        ("device_del", {"id": "/machine/peripheral/disk0"}, "device /machine/peripheral/disk0"),
        (
            "drive-backup",
            {"device": "x", "target": "/vm/disk0.qcow2.forge-3f2a9c1e.qcow2"},
            "overlay /vm/",
        ),
        ("drive-mirror", {"device": "x", "target": "file:/vm/./disk0.qcow2"}, "original image"),
        ("blockdev-add", {"driver": "file", "filename": f"/state/memory-{SID}.bin"}, "memory file"),
        ("job-cancel", {"id": "fq3f2a9c1e-0-commit"}, "forgeqmp's job for disk 'disk0'"),
    ],
)
def test_the_refusal_says_what_was_named(
    command: str, arguments: dict[str, Any], named: str
) -> None:
    with pytest.raises(OperationBlocked) as info:
        check_qmp_command(SUBJECTS["committing"][0], command, arguments)
    assert named in str(info.value)
    assert "wait for it to finish" in str(info.value)


def test_device_paths_match_the_device_not_its_parents() -> None:
    record = SUBJECTS["active"][0]
    for harmless in ("/machine", "/machine/peripheral", "/machine/peripheral/disk1", "disk"):
        check_qmp_command(record, "device_del", {"id": harmless})
    check_qmp_command(record, "blockdev-del", {"node-name": "json:{}"})


def test_nodes_the_record_does_not_name_are_found_by_their_file() -> None:
    record = SUBJECTS["active"][0]
    resize = {"node-name": "disk0-file", "size": 64 << 20}
    check_qmp_command(record, "block_resize", resize)  # unknown without the graph
    graph = [
        {"node-name": "disk0-file", "file": "/vm/disk0.qcow2", "drv": "file"},
        {"node-name": "#block123", "file": "/vm//disk0.qcow2.forge-3f2a9c1e.qcow2", "drv": "file"},
        {"node-name": "scratch-file", "file": "/vm/scratch.raw", "drv": "file"},
    ]
    with pytest.raises(OperationBlocked, match="node 'disk0-file' of disk 'disk0''s original"):
        check_qmp_command(record, "block_resize", resize, block_nodes=graph)
    with pytest.raises(OperationBlocked, match="overlay"):
        check_qmp_command(record, "blockdev-del", {"node-name": "#block123"}, block_nodes=graph)
    check_qmp_command(record, "blockdev-del", {"node-name": "scratch-file"}, block_nodes=graph)


@pytest.mark.parametrize(
    "command",
    ["stop", "cont", "system_reset", "system_wakeup", "send-key", "query-block", "screendump"],
)
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_power_console_and_queries_are_never_refused(command: str, subject: str) -> None:
    assert not may_refuse(command, {})
    check_qmp_command(SUBJECTS[subject][0], command, {"device": "disk0", "id": "disk0"})


def test_a_transaction_is_checked_action_by_action() -> None:
    record = SUBJECTS["active"][0]
    safe = {"type": "block-dirty-bitmap-add", "data": {"node": "disk0-fmt", "name": "b"}}
    other = {"type": "blockdev-snapshot-sync", "data": {"device": "scratch", "snapshot-file": "/s"}}
    bad = {"type": "blockdev-snapshot", "data": {"node": "fq3f2a9c1e-0-fmt", "overlay": "o"}}
    assert not may_refuse("transaction", {"actions": [safe]})
    assert may_refuse("transaction", {"actions": [safe, other]})
    check_qmp_command(record, "transaction", {"actions": [safe, other]})
    with pytest.raises(OperationBlocked, match="blockdev-snapshot"):
        check_qmp_command(record, "transaction", {"actions": [safe, other, bad]})
    check_qmp_command(record, "transaction", {"actions": ["junk", {"type": 3}, {}]})
    check_qmp_command(record, "transaction", {})


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        ("savevm before-upgrade", True),
        ("loadvm x", True),
        ("migrate -d tcp:10.0.0.2:4444", True),
        ("block_resize disk0 20G", True),
        ("block_resize scratch 20G", False),
        ("drive_del fq3f2a9c1e-0-fmt", True),
        ("commit all", True),
        ("commit disk0", True),
        ("commit scratch", False),
        ("device_add virtio-blk-pci,drive=new-fmt,id=d9", True),
        ("device_add e1000,id=nic1", False),
        ("eject -f cd0", True),
        ("set_link nic0 off", True),
        ("qemu-io disk0 'write -P 0xaa 0 4k'", True),
        ("qemu-io scratch 'write 0 4k'", False),
        ("quit", False),  # active: allowed
        ("info block", False),
        ("", False),
        ("savevm 'unbalanced", True),
    ],
)
def test_hmp_lines_are_checked_as_their_qmp_equivalent(line: str, refused: bool) -> None:
    record = SUBJECTS["active"][0]
    arguments = {"command-line": line}
    assert may_refuse("human-monitor-command", arguments) is (
        line.split(" ")[0] in guard.HMP_EQUIVALENTS
    )
    if refused:
        with pytest.raises(OperationBlocked, match="HMP"):
            check_qmp_command(record, "human-monitor-command", arguments)
    else:
        check_qmp_command(record, "human-monitor-command", arguments)


def test_hmp_quit_is_refused_while_working() -> None:
    with pytest.raises(OperationBlocked, match="HMP 'q'"):
        check_qmp_command(SUBJECTS["committing"][0], "human-monitor-command", {"command-line": "q"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
unmapped = st.text(min_size=1, max_size=30).filter(
    lambda c: not guard.may_refuse(c, {}) and c not in ("transaction", "human-monitor-command")
)


@given(unmapped, st.dictionaries(st.text(max_size=10), json_values, max_size=4))
def test_commands_not_in_the_mapping_are_never_refused(
    command: str, arguments: dict[str, Any]
) -> None:
    for record, _ in SUBJECTS.values():
        check_qmp_command(record, command, arguments)


@given(
    st.sampled_from(sorted(EXAMPLES)),
    st.sampled_from(["committed", "discarded", "failed-rolled-back", "no-session"]),
)
def test_a_finished_session_refuses_nothing(command: str, subject: str) -> None:
    check_qmp_command(SUBJECTS[subject][0], command, EXAMPLES[command][0])


@given(
    st.sampled_from(sorted(EXAMPLES)),
    st.dictionaries(st.text(max_size=10), json_values, max_size=4),
)
def test_any_arguments_are_checked_without_crashing(
    command: str, arguments: dict[str, Any]
) -> None:
    # Refused or not, never another error: arguments come from callers, not from forgeqmp.
    with contextlib.suppress(OperationBlocked):
        check_qmp_command(SUBJECTS["active"][0], command, arguments)


# --- the Instance methods, on a stand-in QMP connection ------------------------------------------


def fake_conn(graph: list[dict[str, Any]] | None = None) -> FakeQMP:
    """QEMU answering query-named-block-nodes with the graph, anything else with {}."""
    graph = graph or [{"node-name": "disk0-file", "file": "/vm/disk0.qcow2"}]
    return FakeQMP({"query-named-block-nodes": graph}, strict=False)


def sent(conn: FakeQMP) -> list[tuple[str, dict[str, Any] | None]]:
    return [(s.command, s.arguments) for s in conn.log]


def instance(tmp_path: Path, record: SessionRecord | None) -> tuple[Instance, FakeQMP]:
    state = StateDir(tmp_path / "state")
    state.ensure()
    if record is not None:
        RecordStore(state).save(record)
    conn = fake_conn()
    return Instance(conn.as_connection(), state), conn


def test_instance_check_reads_the_record(tmp_path: Path) -> None:
    vm, conn = instance(tmp_path, SUBJECTS["active"][0])
    assert vm.check("console") is not None
    with pytest.raises(OperationBlocked, match=SID):
        vm.check(Operation.DESTROY)
    with pytest.raises(InvalidArgument):
        vm.check("explode")
    assert sent(conn) == []  # QEMU is never asked


def test_execute_guarded_refuses_before_sending(tmp_path: Path) -> None:
    vm, conn = instance(tmp_path, SUBJECTS["active"][0])

    async def main() -> None:
        with pytest.raises(OperationBlocked, match="disk0-file"):
            await vm.execute_guarded("block_resize", {"node-name": "disk0-file", "size": 1})
        assert await vm.execute_guarded("query-status") == {}
        await vm.execute_guarded("block_resize", {"node-name": "scratch-fmt", "size": 1})

    anyio.run(main, backend="asyncio")
    assert [c for c, _ in sent(conn)] == [
        "query-named-block-nodes",
        "query-status",
        "query-named-block-nodes",
        "block_resize",
    ]


def test_execute_guarded_without_a_session_sends_everything(tmp_path: Path) -> None:
    vm, conn = instance(tmp_path, None)
    anyio.run(vm.execute_guarded, "device_del", {"id": "disk0"}, backend="asyncio")
    # The block graph is asked whether a session of another state dir is active.
    assert sent(conn) == [("query-named-block-nodes", None), ("device_del", {"id": "disk0"})]


def test_execute_guarded_refuses_for_a_session_only_qemu_shows(tmp_path: Path) -> None:
    vm, _ = instance(tmp_path, None)
    conn = fake_conn([
        {"node-name": "disk0-fmt", "file": "/vm/disk0.qcow2"},
        {"node-name": "fq0123abcd-0-fmt", "file": "/vm/disk0.qcow2.forge-0123abcd.qcow2"},
    ])  # fmt: skip
    vm = Instance(conn.as_connection(), vm.state_dir)
    with pytest.raises(OperationBlocked, match="0123abcd"):
        anyio.run(vm.execute_guarded, "device_del", {"id": "disk0"}, backend="asyncio")
    with pytest.raises(OperationBlocked, match="0123abcd"):
        anyio.run(vm.check_with_qemu, "backup", backend="asyncio")
    assert anyio.run(vm.check_with_qemu, "restart", backend="asyncio") is None
    assert [c for c, _ in sent(conn)] == ["query-named-block-nodes"] * 2


def test_execute_guarded_while_a_forge_operation_holds_the_lock(tmp_path: Path) -> None:
    vm, conn = instance(tmp_path, SUBJECTS["committing"][0])

    async def main() -> None:
        with InstanceLock(vm.state_dir, "forgeqmp commit"):
            with pytest.raises(OperationBlocked):  # the record says it would hurt the commit
                await vm.execute_guarded("quit")
            with pytest.raises(InstanceLocked):  # allowed by the rules, but wait for the commit
                await vm.execute_guarded("migrate-set-parameters", {"downtime-limit": 300})
            assert await vm.execute_guarded("cont") == {}  # not guarded: no lock needed
        await vm.execute_guarded("migrate-set-parameters", {"downtime-limit": 300})

    anyio.run(main, backend="asyncio")
    assert [c for c, _ in sent(conn) if not c.startswith("query")] == [
        "cont",
        "migrate-set-parameters",
    ]


def test_execute_guarded_with_an_unreadable_record(tmp_path: Path) -> None:
    vm, conn = instance(tmp_path, None)
    vm.store.path.write_text("{not json")

    async def main() -> None:
        with pytest.raises(OperationBlocked, match="cannot be read"):
            await vm.execute_guarded("set_link", {"name": "nic0", "up": True})
        await vm.execute_guarded("system_reset")

    anyio.run(main, backend="asyncio")
    assert [c for c, _ in sent(conn)] == ["system_reset"]


# --- the docs ------------------------------------------------------------------------------------


def test_docs_guard_page_holds_the_generated_tables() -> None:
    page = (ROOT / "docs" / "guard.md").read_text()
    assert render_markdown() in page, (
        "docs/guard.md is out of date: paste the output of forgeqmp.core.guard.render_markdown() "
        "between its 'generated' markers"
    )


def test_the_tables_list_every_operation_and_command() -> None:
    text = render_markdown()
    for op in Operation:
        assert f"| `{op.value}` |" in text
    for command in EXAMPLES:
        assert f"`{command}`" in text
    assert "| creating, committing, discarding |" in text  # quit's states, in words
