"""One writer of state, typed steps, names spelled once: the structure issue 13 asks for.

- every state change in forgeqmp's code is an event applied through the transition table: no
  call anywhere in ``src/`` passes ``state=`` except where a record is made from the table's
  answer (:mod:`forgeqmp.core.lifecycle`) or read back from JSON (:mod:`forgeqmp.core.record`);
- every event of the table is raised by some code path;
- the steps of the record, the crash points and recovery are the enums of
  :mod:`forgeqmp.core.steps`, with the names records have always had (old records still load);
- the names QEMU sees are those :mod:`forgeqmp.core.names` makes.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from test_record import make_record  # tests/unit is on sys.path

import forgeqmp
from forgeqmp.adapters import crashpoints
from forgeqmp.core import names
from forgeqmp.core.disks import DISK_CHOICE_RULE, check_disk_choice, select_disks
from forgeqmp.core.graphsession import sessions_in_graph
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import TRANSITIONS, Event
from forgeqmp.core.steps import (
    OPERATION_STEPS,
    CommitStep,
    DiscardStep,
    EnableStep,
    Pivoting,
    RecoverStep,
    parse_step,
)
from forgeqmp.errors import InvalidArgument, RecordError

SRC = Path(forgeqmp.__file__).parent
#: The modules allowed to name a state when making a record: the table's answer, and decoding.
STATE_WRITERS = {"core/lifecycle.py", "core/record.py"}


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(SRC)), ast.parse(path.read_text(), str(path)))
        for path in sorted(SRC.rglob("*.py"))
        if "testing" not in path.relative_to(SRC).parts
    ]


#: Calls that make or update a record.
RECORD_MAKERS = {"evolve", "_save", "updated", "SessionRecord", "advance", "begin", "save"}


def _called(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _names_a_state(value: ast.expr) -> bool:
    return (
        isinstance(value, ast.Attribute)
        and isinstance(value.value, ast.Name)
        and value.value.id == "State"
    )


def test_no_code_sets_a_state_by_hand() -> None:
    found = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and name not in STATE_WRITERS:
                found += [
                    f"{name}:{node.lineno}"
                    for k in node.keywords
                    if k.arg == "state"
                    and (_called(node) in RECORD_MAKERS or _names_a_state(k.value))
                ]
    assert found == [], "a state set by hand instead of by an event: " + ", ".join(found)


def test_every_event_of_the_table_is_raised_by_some_code() -> None:
    raised = set()
    for name, tree in _sources():
        if name == "core/states.py":
            continue  # the table itself, its guards and start_session's own ENABLE
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Event"
            ):
                raised.add(node.attr)
    raised.add(Event.ENABLE.name)  # begin() raises it through start_session
    assert {event.name for (_, event) in TRANSITIONS} <= raised
    assert {e.name for e in Event} == {event.name for (_, event) in TRANSITIONS}


# --- steps ----------------------------------------------------------------------------------------

#: Every crash point as FORGEQMP_TEST_CRASH_AT names it, written out on purpose: renaming one
#: would break the fault tests' (and anyone's) settings.
CRASH_POINTS = {
    "enable": (
        "planned",
        "overlays-created",
        "migration-started",
        "pre-switchover",
        "snapshot-transaction-done",
        "snapshot-done",
        "active",
    ),
    "commit": (
        "committing",
        "disk-marked",
        "job-started",
        "job-ready",
        "pivoting",
        "pivoted",
        "disk-recorded",
        "disk-merged",
        "committed",
    ),
    "discard": (
        "stopping-qemu",
        "qemu-stopped",
        "qemu-launched",
        "memory-loaded",
        "resumed",
        "discarded",
    ),
}

#: Every step a forgeqmp ever wrote to a record (git history), with the member it reads as.
RECORDED = {
    "planned": EnableStep.PLANNED,
    "overlays-created": EnableStep.OVERLAYS_CREATED,
    "migration-started": EnableStep.MIGRATION_STARTED,
    "snapshot-done": EnableStep.SNAPSHOT_DONE,
    "active": EnableStep.ACTIVE,
    "committing": CommitStep.COMMITTING,
    "pivoting:vda": Pivoting("vda"),
    "committed": CommitStep.COMMITTED,
    "stopping-qemu": DiscardStep.STOPPING_QEMU,
    "qemu-stopped": DiscardStep.QEMU_STOPPED,
    "discarded": DiscardStep.DISCARDED,
    "forge-bypassed": RecoverStep.FORGE_BYPASSED,
}


def test_crash_points_are_the_step_enums_with_their_old_names() -> None:
    assert dict(crashpoints.STEPS) == CRASH_POINTS
    for operation, steps in OPERATION_STEPS.items():
        assert tuple(s.value for s in steps) == CRASH_POINTS[operation]


@pytest.mark.parametrize(("text", "step"), list(RECORDED.items()))
def test_an_old_record_loads_with_its_step_typed_and_writes_it_back_the_same(
    text: str, step: object
) -> None:
    raw = json.loads(make_record().to_json())
    raw["step"] = text
    record = SessionRecord.from_json(json.dumps(raw))
    assert record.step == step
    assert type(record.step) is type(step)
    assert json.loads(record.to_json())["step"] == text
    assert record.status_dict()["step"] == text
    assert parse_step(text) == step


@pytest.mark.parametrize("text", ["", "pivoting:", "commit-started", "Active", "0"])
def test_a_record_with_an_unknown_step_is_refused(text: str) -> None:
    raw = json.loads(make_record().to_json())
    raw["step"] = text
    with pytest.raises(RecordError, match="step"):
        SessionRecord.from_json(json.dumps(raw))
    with pytest.raises(InvalidArgument):
        parse_step(text)


def test_a_pivoting_step_is_text_naming_its_disk() -> None:
    step = Pivoting("vdb")
    assert (step, step.value, step.disk) == ("pivoting:vdb", "pivoting:vdb", "vdb")
    assert step == Pivoting("vdb") != Pivoting("vda")
    assert step.startswith("pivoting")  # a record's step is still text for its readers
    with pytest.raises(InvalidArgument):
        Pivoting("")


# --- names ---------------------------------------------------------------------------------------

SID = "3f2a9c1e-4b7d-4e8a-9c3b-2d1e0f9a8b7c"


def test_the_names_qemu_sees() -> None:
    assert names.session_tag(SID) == "fq3f2a9c1e"
    assert names.file_node(SID, 1) == "fq3f2a9c1e-1-file"
    assert names.format_node(SID, 1) == "fq3f2a9c1e-1-fmt"
    assert names.create_job(SID, 0) == "fq3f2a9c1e-0-create"
    assert names.undo_job(names.create_job(SID, 0)) == "fq3f2a9c1e-0-create-undo"
    assert names.commit_job(names.format_node(SID, 2)) == "fq3f2a9c1e-2-commit"
    assert names.memory_fd_name(SID) == "fq3f2a9c1e-memory"
    assert names.fdset_opaque(SID) == f"forgeqmp {SID}"
    assert names.memory_file_name(SID) == f"memory-{SID}.bin"
    assert names.overlay_file("/img/vda.qcow2", SID) == "/img/vda.qcow2.forge-3f2a9c1e.qcow2"
    assert names.overlay_file("/img/vda.raw", SID, "/ov") == "/ov/vda.raw.forge-3f2a9c1e.qcow2"
    for name in (*(names.format_node(SID, i) for i in range(12)), names.undo_job("x" * 8)):
        assert len(name) <= 31  # QEMU's limit for node names


def test_the_graph_scan_knows_the_names_enable_makes() -> None:
    nodes = [
        {"node-name": names.format_node(SID, 0), "file": names.overlay_file("/i/a", SID)},
        {"node-name": names.file_node(SID, 0), "file": names.overlay_file("/i/a", SID)},
    ]
    (found,) = sessions_in_graph(nodes)
    assert found.tag == SID[:8]


# --- the disk choice rule ------------------------------------------------------------------------


def test_naming_disks_and_all_disks_is_one_rule_with_one_message() -> None:
    with pytest.raises(InvalidArgument) as direct:
        check_disk_choice(["vda"], all_disks=True)
    with pytest.raises(InvalidArgument) as selecting:
        select_disks((), ["vda"], all_disks=True)
    assert str(direct.value) == str(selecting.value) == DISK_CHOICE_RULE
    check_disk_choice(None, all_disks=True)
    check_disk_choice(["vda"], all_disks=False)
