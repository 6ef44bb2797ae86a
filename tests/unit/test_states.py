"""Unit tests of the Forge state machine: the table, the errors, and the session values.

The expected table below is written out again, on purpose, from the product rules rather than
imported: a change to ``TRANSITIONS`` must be made twice, once here, to pass.
"""

from __future__ import annotations

import itertools
import re

import attrs
import pytest

from forgeqmp.core.states import (
    RECOVER_EVENTS,
    TERMINAL,
    TRANSITIONS,
    UNFINISHED,
    Event,
    Failure,
    SessionStatus,
    State,
    allowed_events,
    may_start_new_session,
    next_state,
    render_dot,
    render_mermaid,
    start_session,
)
from forgeqmp.errors import (
    ForgeError,
    IllegalTransition,
    InvalidArgument,
    PrerequisiteError,
    SessionActive,
)

S = State
E = Event

RECOVER_OUTCOMES = {
    E.RECOVERED_ACTIVE: S.ACTIVE,
    E.RECOVERED_COMMITTED: S.COMMITTED,
    E.RECOVERED_DISCARDED: S.DISCARDED,
    E.RECOVERED_FAILED: S.FAILED,
}

EXPECTED: dict[tuple[State | None, Event], State] = {
    # enable
    (None, E.ENABLE): S.CREATING,
    (S.CREATING, E.ENABLED): S.ACTIVE,
    (S.CREATING, E.ENABLE_FAILED): S.FAILED,
    # commit, and finishing a failed commit
    (S.ACTIVE, E.COMMIT): S.COMMITTING,
    (S.COMMITTING, E.COMMITTED): S.COMMITTED,
    (S.COMMITTING, E.COMMIT_FAILED): S.FAILED,
    (S.FAILED, E.COMMIT): S.COMMITTING,
    # discard, and retrying a failed discard
    (S.ACTIVE, E.DISCARD): S.DISCARDING,
    (S.DISCARDING, E.DISCARDED): S.DISCARDED,
    (S.DISCARDING, E.DISCARD_FAILED): S.FAILED,
    (S.FAILED, E.DISCARD): S.DISCARDING,
    # recover: any true state from an interrupted or failed session ...
    **{
        (source, event): target
        for source in (S.CREATING, S.COMMITTING, S.DISCARDING, S.FAILED)
        for event, target in RECOVER_OUTCOMES.items()
    },
    # ... and from ACTIVE only "still active" or "broken"
    (S.ACTIVE, E.RECOVERED_ACTIVE): S.ACTIVE,
    (S.ACTIVE, E.RECOVERED_FAILED): S.FAILED,
}

SOURCES: list[State | None] = [None, *State]
LEGAL = sorted(EXPECTED.items(), key=repr)
ILLEGAL = [(s, e) for s, e in itertools.product(SOURCES, Event) if (s, e) not in EXPECTED]


def _id(value: object) -> str:
    if isinstance(value, tuple):
        return "-".join(_id(v) for v in value)
    return "none" if value is None else str(getattr(value, "value", value))


def failure(phase: State = S.COMMITTING, **kwargs: object) -> Failure:
    args: dict[str, object] = {"reason": "it broke", "next_step": "run forgeqmp recover"}
    args.update(kwargs)
    return Failure(phase, **args)  # type: ignore[arg-type]


# --- the table --------------------------------------------------------------------------------


def test_table_is_exactly_the_product_rules() -> None:
    assert dict(TRANSITIONS) == EXPECTED


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(S.COMMITTED, E.COMMIT)] = S.COMMITTING  # type: ignore[index]


@pytest.mark.parametrize(("move", "target"), LEGAL, ids=[_id(m) for m, _ in LEGAL])
def test_every_legal_transition(move: tuple[State | None, Event], target: State) -> None:
    source, event = move
    assert next_state(source, event) is target


@pytest.mark.parametrize(("source", "event"), ILLEGAL, ids=[_id(m) for m in ILLEGAL])
def test_every_other_pair_is_illegal(source: State | None, event: Event) -> None:
    with pytest.raises(IllegalTransition) as caught:
        next_state(source, event)
    message = str(caught.value)
    assert f"'{event.value}'" in message
    assert ("no session" in message) if source is None else (f"'{source.value}'" in message)
    allowed = [e for (s, e) in EXPECTED if s is source]
    if allowed:
        listed = message.split("allowed from there: ", 1)[1].split(", ")
        assert sorted(listed) == sorted(e.value for e in allowed)
    else:
        assert "terminal" in message


def test_illegal_transition_is_a_forge_error() -> None:
    assert issubclass(IllegalTransition, ForgeError)


def test_a_non_event_is_illegal_too() -> None:
    with pytest.raises(IllegalTransition, match="'commit'"):
        next_state(S.ACTIVE, "commit")  # type: ignore[arg-type]


def test_illegal_pairs_cover_the_rest() -> None:
    # 8 sources x 13 events: nothing escapes both lists.
    assert len(LEGAL) + len(ILLEGAL) == len(SOURCES) * len(Event) == 104
    assert len(LEGAL) == 29


def test_enable_is_legal_only_without_a_session() -> None:
    assert [s for (s, e) in TRANSITIONS if e is E.ENABLE] == [None]
    assert all(s is not None for (s, e) in TRANSITIONS if e is not E.ENABLE)


def test_terminal_states_have_no_way_out() -> None:
    assert frozenset({S.COMMITTED, S.DISCARDED}) == TERMINAL
    for state in TERMINAL:
        assert allowed_events(state) == ()
        for event in Event:
            with pytest.raises(IllegalTransition, match="terminal"):
                next_state(state, event)


def test_unfinished_states_are_exactly_where_recover_acts() -> None:
    assert frozenset(State) - TERMINAL == UNFINISHED
    assert frozenset(RECOVER_OUTCOMES) == RECOVER_EVENTS
    for state in State:
        recoverable = any(e in RECOVER_EVENTS for e in allowed_events(state))
        assert recoverable == (state in UNFINISHED)
        if state in UNFINISHED:
            assert next_state(state, E.RECOVERED_FAILED) is S.FAILED


def test_recover_always_lands_on_a_true_state() -> None:
    for (source, event), target in TRANSITIONS.items():
        if event in RECOVER_EVENTS:
            assert source in UNFINISHED
            assert target is RECOVER_OUTCOMES[event]


def test_every_state_is_reachable_and_every_unfinished_one_can_end() -> None:
    reachable: set[State | None] = {None}
    frontier: list[State | None] = [None]
    while frontier:
        here = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is here and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == {None, *State}
    for state in UNFINISHED:
        seen, todo = {state}, [state]
        while todo:
            here = todo.pop()
            for (source, _), target in TRANSITIONS.items():
                if source is here and target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert seen & TERMINAL == TERMINAL, state


def test_allowed_events_follow_table_order() -> None:
    assert allowed_events(None) == (E.ENABLE,)
    assert allowed_events(S.CREATING) == (
        E.ENABLED,
        E.ENABLE_FAILED,
        E.RECOVERED_ACTIVE,
        E.RECOVERED_COMMITTED,
        E.RECOVERED_DISCARDED,
        E.RECOVERED_FAILED,
    )
    assert allowed_events(S.ACTIVE) == (
        E.COMMIT,
        E.DISCARD,
        E.RECOVERED_ACTIVE,
        E.RECOVERED_FAILED,
    )


def test_enum_values_are_the_lowercase_names() -> None:
    for member in [*State, *Event]:
        assert member.value == member.name.lower()


# --- Failure ------------------------------------------------------------------------------------


def test_failure_keeps_what_it_was_given() -> None:
    f = Failure(
        S.COMMITTING,
        "job-complete timed out",
        "run forgeqmp commit again",
        merged_disks=["vda"],
        pending_disks=("vdb", "vdc"),
    )
    assert f.phase is S.COMMITTING
    assert f.merged_disks == ("vda",)
    assert f.pending_disks == ("vdb", "vdc")
    assert f.rolled_back is False
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        f.reason = "other"  # type: ignore[misc]


@pytest.mark.parametrize("phase", [S.CREATING, S.ACTIVE, S.COMMITTING, S.DISCARDING])
def test_failure_phases(phase: State) -> None:
    assert failure(phase).phase is phase


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"reason": ""}, id="empty-reason"),
        pytest.param({"reason": "  \n"}, id="blank-reason"),
        pytest.param({"next_step": ""}, id="empty-next-step"),
        pytest.param({"next_step": "\t"}, id="blank-next-step"),
        pytest.param({"reason": None}, id="reason-not-str"),
        pytest.param({"phase": S.COMMITTED}, id="phase-committed"),
        pytest.param({"phase": S.DISCARDED}, id="phase-discarded"),
        pytest.param({"phase": S.FAILED}, id="phase-failed"),
        pytest.param({"phase": "committing"}, id="phase-not-a-state"),
        pytest.param({"rolled_back": 1}, id="rolled-back-not-bool"),
        pytest.param({"merged_disks": "vda"}, id="disks-as-a-string"),
        pytest.param({"merged_disks": ("vda", "")}, id="empty-disk-name"),
        pytest.param({"pending_disks": ("vda", "vda")}, id="duplicate-disk"),
        pytest.param(
            {"merged_disks": ("vda",), "pending_disks": ("vda",)}, id="merged-and-pending"
        ),
        pytest.param({"rolled_back": True, "pending_disks": ("vda",)}, id="rolled-back-pending"),
        pytest.param({"phase": S.CREATING, "merged_disks": ("vda",)}, id="merged-outside-commit"),
        pytest.param({"phase": S.DISCARDING, "merged_disks": ("vda",)}, id="merged-in-discard"),
    ],
)
def test_failure_rejects(kwargs: dict[str, object]) -> None:
    given = dict(kwargs)
    phase = given.pop("phase", S.COMMITTING)
    with pytest.raises(InvalidArgument):
        failure(phase, **given)  # type: ignore[arg-type]


def test_invalid_argument_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="reason"):
        failure(reason="")


# --- SessionStatus: construction ---------------------------------------------------------------


def test_failed_needs_a_failure_and_others_forbid_one() -> None:
    with pytest.raises(InvalidArgument, match="needs a Failure"):
        SessionStatus(S.FAILED)
    for state in set(State) - {S.FAILED}:
        assert SessionStatus(state).failure is None
        with pytest.raises(InvalidArgument, match="cannot carry a Failure"):
            SessionStatus(state, failure())


def test_merged_disks_default_to_the_failures_and_must_agree() -> None:
    f = failure(merged_disks=("vda",), pending_disks=("vdb",))
    assert SessionStatus(S.FAILED, f).merged_disks == ("vda",)
    with pytest.raises(InvalidArgument, match="disagree"):
        SessionStatus(S.FAILED, f, ())


@pytest.mark.parametrize("state", [S.CREATING, S.ACTIVE, S.DISCARDING, S.DISCARDED])
def test_no_merged_disks_outside_a_commit(state: State) -> None:
    with pytest.raises(InvalidArgument):
        SessionStatus(state, None, ("vda",))


def test_status_rejects_a_non_state() -> None:
    with pytest.raises(InvalidArgument):
        SessionStatus("active")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        SessionStatus(S.FAILED, "broken")  # type: ignore[arg-type]


# --- SessionStatus: properties -----------------------------------------------------------------

ENABLE_ROLLED_BACK = failure(S.CREATING, rolled_back=True)
ENABLE_LEFT_OVERLAYS = failure(S.CREATING, pending_disks=("vda",))
COMMIT_PARTIAL = failure(S.COMMITTING, merged_disks=("vda",), pending_disks=("vdb",))
COMMIT_NOTHING_MERGED = failure(S.COMMITTING, pending_disks=("vda", "vdb"))
COMMIT_ALL_MERGED = failure(S.COMMITTING, merged_disks=("vda", "vdb"))
DISCARD_BROKE = failure(S.DISCARDING, pending_disks=("vda",))
RECOVER_FOUND_ACTIVE_BROKEN = failure(S.ACTIVE, pending_disks=("vda",))

#: (status, finished, terminal, can_commit, can_discard)
PROPERTY_CASES = [
    (SessionStatus(S.CREATING), False, False, False, False),
    (SessionStatus(S.ACTIVE), False, False, True, True),
    (SessionStatus(S.COMMITTING), False, False, False, False),
    (SessionStatus(S.COMMITTING, None, ("vda",)), False, False, False, False),
    (SessionStatus(S.DISCARDING), False, False, False, False),
    (SessionStatus(S.COMMITTED), True, True, False, False),
    (SessionStatus(S.DISCARDED), True, True, False, False),
    (SessionStatus(S.FAILED, ENABLE_ROLLED_BACK), True, False, False, False),
    (SessionStatus(S.FAILED, ENABLE_LEFT_OVERLAYS), False, False, False, True),
    (SessionStatus(S.FAILED, COMMIT_PARTIAL), False, False, True, False),
    (SessionStatus(S.FAILED, COMMIT_NOTHING_MERGED), False, False, True, True),
    (SessionStatus(S.FAILED, COMMIT_ALL_MERGED), False, False, False, False),
    (SessionStatus(S.FAILED, DISCARD_BROKE), False, False, False, True),
    (SessionStatus(S.FAILED, RECOVER_FOUND_ACTIVE_BROKEN), False, False, False, True),
]


@pytest.mark.parametrize(
    ("status", "finished", "terminal", "can_commit", "can_discard"),
    PROPERTY_CASES,
    ids=[
        f"{c[0].state.value}-{c[0].failure.phase.value if c[0].failure else 'ok'}-{i}"
        for i, c in enumerate(PROPERTY_CASES)
    ],
)
def test_status_properties(
    status: SessionStatus, finished: bool, terminal: bool, can_commit: bool, can_discard: bool
) -> None:
    assert status.finished is finished
    assert status.terminal is terminal
    assert status.can_commit is can_commit
    assert status.can_discard is can_discard
    assert may_start_new_session(status) is finished


def test_may_start_without_any_session() -> None:
    assert may_start_new_session(None) is True


# --- SessionStatus.apply --------------------------------------------------------------------------


def test_a_whole_committed_session() -> None:
    status = start_session(None)
    assert status == SessionStatus(S.CREATING)
    status = status.apply(E.ENABLED)
    assert status.state is S.ACTIVE
    status = status.apply(E.COMMIT).apply(E.COMMITTED)
    assert status == SessionStatus(S.COMMITTED)
    assert start_session(status) == SessionStatus(S.CREATING)


def test_apply_returns_a_new_value_and_leaves_the_old() -> None:
    active = SessionStatus(S.ACTIVE)
    committing = active.apply(E.COMMIT)
    assert active == SessionStatus(S.ACTIVE)
    assert committing is not active


def test_apply_refuses_what_the_table_refuses() -> None:
    for state in State:
        if state is S.FAILED:
            continue
        status = SessionStatus(state)
        for event in Event:
            if (state, event) not in EXPECTED:
                with pytest.raises(IllegalTransition):
                    status.apply(event)


def test_failed_outcome_needs_a_failure() -> None:
    with pytest.raises(InvalidArgument, match="pass the Failure"):
        SessionStatus(S.COMMITTING).apply(E.COMMIT_FAILED)


def test_other_outcomes_refuse_a_failure() -> None:
    with pytest.raises(InvalidArgument, match="carries no Failure"):
        SessionStatus(S.COMMITTING).apply(E.COMMITTED, failure())


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.CREATING, E.ENABLE_FAILED),
        (S.COMMITTING, E.COMMIT_FAILED),
        (S.DISCARDING, E.DISCARD_FAILED),
        (S.ACTIVE, E.RECOVERED_FAILED),
        (S.CREATING, E.RECOVERED_FAILED),
    ],
)
def test_failure_phase_must_be_the_state_it_failed_in(state: State, event: Event) -> None:
    status = SessionStatus(state)
    ok = status.apply(event, failure(state))
    assert ok.state is S.FAILED
    assert ok.failure is not None
    assert ok.failure.phase is state
    other = S.CREATING if state is not S.CREATING else S.DISCARDING
    with pytest.raises(InvalidArgument, match="phase must be"):
        status.apply(event, failure(other))


def test_enable_failed_rolled_back_frees_the_instance() -> None:
    status = start_session(None).apply(E.ENABLE_FAILED, failure(S.CREATING, rolled_back=True))
    assert status.finished
    assert not status.can_commit
    assert not status.can_discard
    assert start_session(status).state is S.CREATING


def test_enable_failed_not_rolled_back_blocks_a_new_session() -> None:
    status = start_session(None).apply(
        E.ENABLE_FAILED,
        failure(S.CREATING, pending_disks=("vda",), next_step="remove the overlay of vda"),
    )
    with pytest.raises(SessionActive, match="remove the overlay of vda"):
        start_session(status)


@pytest.mark.parametrize(
    "status", [SessionStatus(s) for s in (S.CREATING, S.ACTIVE, S.COMMITTING, S.DISCARDING)]
)
def test_unfinished_sessions_block_a_new_one(status: SessionStatus) -> None:
    assert not may_start_new_session(status)
    with pytest.raises(SessionActive, match=status.state.value):
        start_session(status)


def test_retry_after_a_partial_commit_keeps_the_merged_disks() -> None:
    failed = SessionStatus(S.COMMITTING).apply(E.COMMIT_FAILED, COMMIT_PARTIAL)
    retry = failed.apply(E.COMMIT)
    assert retry == SessionStatus(S.COMMITTING, None, ("vda",))
    assert not retry.can_discard
    with pytest.raises(InvalidArgument, match="forgets disks already merged"):
        retry.apply(E.COMMIT_FAILED, failure(pending_disks=("vdb",)))
    again = retry.apply(E.COMMIT_FAILED, failure(merged_disks=("vda",), pending_disks=("vdb",)))
    assert again.failure is not None
    assert again.failure.merged_disks == ("vda",)
    assert not again.can_discard
    assert retry.apply(E.COMMITTED).state is S.COMMITTED


def test_discard_is_refused_once_a_disk_was_merged() -> None:
    failed = SessionStatus(S.FAILED, COMMIT_PARTIAL)
    with pytest.raises(PrerequisiteError, match=r"vda.*point of no return") as caught:
        failed.apply(E.DISCARD)
    assert not isinstance(caught.value, IllegalTransition)
    assert failed == SessionStatus(S.FAILED, COMMIT_PARTIAL)


def test_discard_is_allowed_after_a_commit_that_merged_nothing() -> None:
    failed = SessionStatus(S.FAILED, COMMIT_NOTHING_MERGED)
    assert failed.apply(E.DISCARD) == SessionStatus(S.DISCARDING)


@pytest.mark.parametrize(
    ("failure_", "operation", "words"),
    [
        (ENABLE_ROLLED_BACK, E.COMMIT, "rolled back"),
        (ENABLE_ROLLED_BACK, E.DISCARD, "rolled back"),
        (ENABLE_LEFT_OVERLAYS, E.COMMIT, "not during a commit"),
        (DISCARD_BROKE, E.COMMIT, "not during a commit"),
        (COMMIT_ALL_MERGED, E.COMMIT, "no disk is left"),
        (COMMIT_ALL_MERGED, E.DISCARD, "point of no return"),
    ],
)
def test_guards_refuse_with_a_reason(failure_: Failure, operation: Event, words: str) -> None:
    status = SessionStatus(S.FAILED, failure_)
    with pytest.raises(PrerequisiteError, match=words):
        status.apply(operation)


@pytest.mark.parametrize("event", [E.RECOVERED_ACTIVE, E.RECOVERED_DISCARDED])
@pytest.mark.parametrize(
    "status",
    [SessionStatus(S.FAILED, COMMIT_PARTIAL), SessionStatus(S.COMMITTING, None, ("vda",))],
    ids=["failed", "committing"],
)
def test_recover_cannot_undo_a_merge(status: SessionStatus, event: Event) -> None:
    with pytest.raises(IllegalTransition, match="already merged"):
        status.apply(event)


def test_recover_after_a_merge_finds_committed_or_failed() -> None:
    status = SessionStatus(S.COMMITTING, None, ("vda",))
    assert status.apply(E.RECOVERED_COMMITTED).state is S.COMMITTED
    found = status.apply(E.RECOVERED_FAILED, COMMIT_PARTIAL)
    assert found.merged_disks == ("vda",)


def test_recover_on_failed_may_keep_the_original_phase() -> None:
    status = SessionStatus(S.FAILED, DISCARD_BROKE)
    again = status.apply(E.RECOVERED_FAILED, DISCARD_BROKE)
    assert again == status
    assert status.apply(E.RECOVERED_ACTIVE) == SessionStatus(S.ACTIVE)


def test_discarded_whether_or_not_memory_was_restored() -> None:
    # One event: the memory outcome is the record's business, not the state machine's.
    assert SessionStatus(S.DISCARDING).apply(E.DISCARDED) == SessionStatus(S.DISCARDED)


# --- Mermaid ------------------------------------------------------------------------------------


def test_mermaid_has_every_transition_once() -> None:
    text = render_mermaid()
    lines = text.splitlines()
    assert lines[0] == "stateDiagram-v2"
    edges = [line.strip() for line in lines[1:]]
    for (source, event), target in EXPECTED.items():
        start = "[*]" if source is None else source.value
        assert edges.count(f"{start} --> {target.value} : {event.value}") == 1
    assert sorted(e for e in edges if e.endswith("--> [*]")) == [
        "committed --> [*]",
        "discarded --> [*]",
    ]
    assert len(edges) == len(EXPECTED) + 2
    assert text.endswith("\n")


def test_mermaid_edges_are_well_formed() -> None:
    edge = re.compile(r"^    (\[\*\]|[a-z]+) --> ([a-z]+|\[\*\])( : [a-z_]+)?$")
    names = {s.value for s in State} | {"[*]"}
    for line in render_mermaid().splitlines()[1:]:
        match = edge.match(line)
        assert match, line
        assert match.group(1) in names
        assert match.group(2) in names


def test_mermaid_renders_the_table_it_is_given() -> None:
    table = {(None, E.ENABLE): S.CREATING, (S.CREATING, E.ENABLED): S.ACTIVE}
    assert render_mermaid(table) == (
        "stateDiagram-v2\n"
        "    [*] --> creating : enable\n"
        "    creating --> active : enabled\n"
        "    active --> [*]\n"
    )


# --- Graphviz (the docs' SVG) ----------------------------------------------------------------------


def test_dot_has_every_transition_once() -> None:
    lines = render_dot().splitlines()
    assert lines[0] == "digraph forge_states {"
    assert lines[-1] == "}"
    for (source, event), target in EXPECTED.items():
        start = "start" if source is None else f'"{source.value}"'
        assert lines.count(f'    {start} -> "{target.value}" [label="{event.value}"];') == 1
    assert sorted(line for line in lines if line.endswith("-> end;")) == [
        '    "committed" -> end;',
        '    "discarded" -> end;',
    ]
    assert len([line for line in lines if " -> " in line]) == len(EXPECTED) + 2


def test_dot_renders_the_table_it_is_given() -> None:
    table = {(None, E.ENABLE): S.CREATING, (S.CREATING, E.ENABLED): S.ACTIVE}
    edges = [line for line in render_dot(table).splitlines() if " -> " in line]
    assert edges == [
        '    start -> "creating" [label="enable"];',
        '    "creating" -> "active" [label="enabled"];',
        '    "active" -> end;',
    ]


# --- a bypassed forge: discard refused for good -------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [
        SessionStatus(State.ACTIVE, originals_written=True),
        SessionStatus(
            State.FAILED,
            Failure(phase=State.ACTIVE, reason="bypassed", next_step="do not discard"),
            originals_written=True,
        ),
    ],
    ids=["active", "failed"],
)
def test_discard_is_refused_once_the_originals_were_written(status: SessionStatus) -> None:
    assert not status.can_discard
    with pytest.raises(PrerequisiteError, match="bypassed") as info:
        status.apply(Event.DISCARD)
    assert info.value.exit_code == 3
    # The mark is kept by every move the session can still make.
    kept = []
    for event in allowed_events(status.state):
        if event is Event.DISCARD:
            continue
        failure = None
        if next_state(status.state, event) is State.FAILED:
            phase = status.state if status.state is not State.FAILED else State.ACTIVE
            failure = Failure(phase=phase, reason="r", next_step="s")
        try:
            after = status.apply(event, failure)
        except (PrerequisiteError, IllegalTransition, InvalidArgument):
            continue
        assert after.originals_written, event
        kept.append(event)
    assert kept  # at least one move was checked (commit, or a recover outcome)


def test_without_the_mark_an_active_session_may_discard() -> None:
    assert SessionStatus(State.ACTIVE).can_discard
    assert not SessionStatus(State.ACTIVE).originals_written


# --- the one writer: an event applied to a record (forgeqmp.core.lifecycle) ----------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_record import make_record  # noqa: E402  (tests/unit is on sys.path)

from forgeqmp.core.lifecycle import GUARDED_EVENTS, advance, begin, status_of  # noqa: E402
from forgeqmp.core.record import SessionRecord  # noqa: E402


def _record_in(state: State, *, failed_in: State | None, rolled_back: bool) -> SessionRecord:
    """A record in ``state``: test data, so made with attrs.evolve (the code never does)."""
    failed = state is S.FAILED
    return attrs.evolve(
        make_record(),
        state=state,
        failure_phase=(failed_in or S.ACTIVE) if failed else None,
        rolled_back=rolled_back and failed,
        error="it failed" if failed else None,
    )


_PHASES = [S.CREATING, S.ACTIVE, S.COMMITTING, S.DISCARDING]


@given(
    state=st.sampled_from(State),
    event=st.sampled_from(Event),
    failed_in=st.sampled_from(_PHASES),
    rolled_back=st.booleans(),
)
def test_advance_makes_exactly_the_tables_moves(
    state: State, event: Event, failed_in: State, rolled_back: bool
) -> None:
    record = _record_in(state, failed_in=failed_in, rolled_back=rolled_back)
    before = record.to_json()
    if (state, event) not in TRANSITIONS:
        with pytest.raises(IllegalTransition):
            advance(record, event)
        assert record.to_json() == before
        return
    target = TRANSITIONS[(state, event)]
    if event in GUARDED_EVENTS:
        try:
            status_of(record).apply(event)
        except PrerequisiteError:
            with pytest.raises(PrerequisiteError):
                advance(record, event)
            assert record.to_json() == before
            return
    moved = advance(record, event)
    assert moved.state is target
    assert attrs.evolve(moved, state=state) == record  # nothing else changed
    assert record.to_json() == before  # and the record given is as it was


@given(state=st.sampled_from(State), event=st.sampled_from(Event))
def test_advance_applies_the_other_changes_with_the_move(state: State, event: Event) -> None:
    record = _record_in(state, failed_in=S.COMMITTING, rolled_back=False)
    if (state, event) not in TRANSITIONS or event in GUARDED_EVENTS:
        return
    moved = advance(record, event, error="why", pause_ms=1.5)
    assert (moved.state, moved.error, moved.pause_ms) == (TRANSITIONS[(state, event)], "why", 1.5)


def test_no_state_is_set_by_hand() -> None:
    record = make_record()
    for change in ({"state": S.FAILED}, {"state": S.ACTIVE}):
        with pytest.raises(InvalidArgument, match="apply an Event"):
            record.evolve(**change)
        with pytest.raises(InvalidArgument, match="apply an Event"):
            advance(record, E.RECOVERED_FAILED, **change)
        with pytest.raises(InvalidArgument, match="apply an Event"):
            begin(None, **change)
    assert record.state is S.ACTIVE


def test_begin_is_the_enable_request_of_the_table() -> None:
    fields = {
        f.name: getattr(make_record(), f.name)
        for f in attrs.fields(SessionRecord)
        if f.name != "state"
    }
    assert begin(None, **fields).state is next_state(None, E.ENABLE) is S.CREATING
    done = _record_in(S.COMMITTED, failed_in=None, rolled_back=False)
    assert begin(done, **fields).state is S.CREATING
    undone = _record_in(S.FAILED, failed_in=S.CREATING, rolled_back=True)
    assert begin(undone, **fields).state is S.CREATING
    for state in UNFINISHED:
        previous = _record_in(state, failed_in=S.COMMITTING, rolled_back=False)
        with pytest.raises(SessionActive):
            begin(previous, **fields)
