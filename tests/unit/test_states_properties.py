"""Properties of the Forge state machine, checked by hypothesis over many sessions of one instance.

``ForgeInstance`` plays the driver: it starts sessions and makes enable, commit and discard succeed
or fail (a rolled-back enable, a commit that merged some disks and left others, a broken discard),
retries commits, runs recover with every outcome and throws illegal events. Next to the real
:class:`SessionStatus` it keeps its own model of where the session must be (state, merged and pending
disks, rolled back or not), written from the product rules, and checks the two agree after every
step, along with the safety properties that must hold whatever happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from forgeqmp.core.states import (
    RECOVER_EVENTS,
    TERMINAL,
    TRANSITIONS,
    UNFINISHED,
    Event,
    Failure,
    SessionStatus,
    State,
    may_start_new_session,
    next_state,
    start_session,
)
from forgeqmp.errors import IllegalTransition, InvalidArgument, PrerequisiteError, SessionActive

S = State
E = Event

DISK_NAMES = ("vda", "vdb", "vdc", "vdd")
disk_sets = st.lists(st.sampled_from(DISK_NAMES), min_size=1, max_size=4, unique=True).map(tuple)
texts = st.text(min_size=1, max_size=12).filter(str.strip)

RECOVERED = {
    E.RECOVERED_ACTIVE: S.ACTIVE,
    E.RECOVERED_COMMITTED: S.COMMITTED,
    E.RECOVERED_DISCARDED: S.DISCARDED,
    E.RECOVERED_FAILED: S.FAILED,
}

#: The events each state accepts, from the product rules (independent of forgeqmp.core.states).
MODEL_MOVES: dict[State | None, set[Event]] = {
    None: {E.ENABLE},
    S.CREATING: {E.ENABLED, E.ENABLE_FAILED, *RECOVERED},
    S.ACTIVE: {E.COMMIT, E.DISCARD, E.RECOVERED_ACTIVE, E.RECOVERED_FAILED},
    S.COMMITTING: {E.COMMITTED, E.COMMIT_FAILED, *RECOVERED},
    S.DISCARDING: {E.DISCARDED, E.DISCARD_FAILED, *RECOVERED},
    S.FAILED: {E.COMMIT, E.DISCARD, *RECOVERED},
    S.COMMITTED: set(),
    S.DISCARDED: set(),
}
MODEL_UNFINISHED = {S.CREATING, S.ACTIVE, S.COMMITTING, S.DISCARDING, S.FAILED}


def snapshot(status: SessionStatus) -> dict[str, Any]:
    """A deep, plain copy of a status, to prove later that the value did not change."""
    return attrs.asdict(status)


class ForgeInstance(RuleBasedStateMachine):
    """One instance, many sessions; the real status next to a model of what it must be."""

    def __init__(self) -> None:
        super().__init__()
        self.status: SessionStatus | None = None
        # The model.
        self.state: State | None = None
        self.disks: tuple[str, ...] = ()
        self.merged: set[str] = set()
        self.pending: set[str] = set()
        self.phase: State | None = None
        self.rolled_back = False
        self.reached_terminal: tuple[SessionStatus, dict[str, Any]] | None = None
        # Every finished session, with a copy of what it was when it was finished.
        self.history: list[tuple[SessionStatus, dict[str, Any]]] = []
        self.sessions = 0

    # --- the model's own rules ------------------------------------------------------------------

    @property
    def model_finished(self) -> bool:
        if self.state in {S.COMMITTED, S.DISCARDED}:
            return True
        return self.state is S.FAILED and self.rolled_back

    @property
    def model_can_commit(self) -> bool:
        if self.state is S.ACTIVE:
            return True
        return (
            self.state is S.FAILED
            and self.phase is S.COMMITTING
            and bool(self.pending)
            and not self.rolled_back
        )

    @property
    def model_can_discard(self) -> bool:
        if self.state is S.ACTIVE:
            return True
        return self.state is S.FAILED and not self.merged and not self.rolled_back

    def model_recover_outcomes(self) -> set[Event]:
        outcomes = set(MODEL_MOVES[self.state]) & set(RECOVERED)
        if self.merged:
            outcomes -= {E.RECOVERED_ACTIVE, E.RECOVERED_DISCARDED}
        return outcomes

    # --- helpers ----------------------------------------------------------------------------------

    def current(self) -> SessionStatus:
        assert self.status is not None
        return self.status

    def apply(self, event: Event, failure: Failure | None = None) -> None:
        self.status = self.current().apply(event, failure)
        if self.status.terminal:
            self.reached_terminal = (self.status, snapshot(self.status))

    def refused(self, call: Callable[[], object], error: type[Exception]) -> None:
        """``call`` must raise ``error`` and leave the status exactly as it was."""
        before = self.status
        copy = None if before is None else snapshot(before)
        with pytest.raises(error):
            call()
        assert self.status is before
        if before is not None:
            assert snapshot(before) == copy

    def set_failed(self, failure: Failure) -> None:
        self.state = S.FAILED
        self.phase = failure.phase
        self.rolled_back = failure.rolled_back
        self.merged = set(failure.merged_disks)
        self.pending = set(failure.pending_disks)

    def clear_failure(self) -> None:
        self.phase = None
        self.rolled_back = False
        self.pending = set()

    # --- sessions -----------------------------------------------------------------------------------

    @rule(disks=disk_sets)
    def start_a_session(self, disks: tuple[str, ...]) -> None:
        if self.state is not None and not self.model_finished:
            self.refused(lambda: start_session(self.status), SessionActive)
            return
        new = start_session(self.status)
        if self.status is not None:
            self.history.append((self.status, snapshot(self.status)))
        self.status = new
        self.sessions += 1
        self.state, self.disks, self.merged = S.CREATING, disks, set()
        self.reached_terminal = None
        self.clear_failure()

    # --- enable -------------------------------------------------------------------------------------

    @precondition(lambda self: self.state is S.CREATING)
    @rule()
    def enable_succeeds(self) -> None:
        self.apply(E.ENABLED)
        self.state = S.ACTIVE

    @precondition(lambda self: self.state is S.CREATING)
    @rule(rolled_back=st.booleans(), reason=texts, step=texts)
    def enable_fails(self, rolled_back: bool, reason: str, step: str) -> None:
        pending = () if rolled_back else self.disks
        failure = Failure(S.CREATING, reason, step, rolled_back, pending_disks=pending)
        self.apply(E.ENABLE_FAILED, failure)
        self.set_failed(failure)

    # --- commit -------------------------------------------------------------------------------------

    @precondition(lambda self: self.state in {S.ACTIVE, S.FAILED})
    @rule()
    def commit_or_retry_commit(self) -> None:
        if not self.model_can_commit:
            self.refused(lambda: self.current().apply(E.COMMIT), PrerequisiteError)
            return
        self.apply(E.COMMIT)
        self.state = S.COMMITTING
        self.clear_failure()

    @precondition(lambda self: self.state is S.COMMITTING)
    @rule()
    def commit_succeeds(self) -> None:
        self.apply(E.COMMITTED)
        self.state, self.merged = S.COMMITTED, set(self.disks)

    @precondition(lambda self: self.state is S.COMMITTING)
    @rule(data=st.data(), reason=texts, step=texts)
    def commit_fails(self, data: st.DataObject, reason: str, step: str) -> None:
        remaining = sorted(set(self.disks) - self.merged)
        assert remaining, "a commit only starts with a disk left on an overlay"
        newly = data.draw(st.sets(st.sampled_from(remaining)), label="merged now")
        merged = self.merged | newly
        failure = Failure(
            S.COMMITTING,
            reason,
            step,
            merged_disks=data.draw(st.permutations(sorted(merged))),
            pending_disks=sorted(set(remaining) - newly),
        )
        self.apply(E.COMMIT_FAILED, failure)
        self.set_failed(failure)

    @precondition(
        lambda self: self.state is S.COMMITTING and len(self.disks) - len(self.merged) > 1
    )
    @rule(data=st.data())
    def commit_fails_partway(self, data: st.DataObject) -> None:
        """The point of no return passed for some disks, not all: the case discard must never undo."""
        remaining = sorted(set(self.disks) - self.merged)
        cut = data.draw(st.integers(1, len(remaining) - 1), label="disks merged now")
        merged = sorted(self.merged | set(remaining[:cut]))
        failure = Failure(
            S.COMMITTING,
            "job-complete timed out",
            "run commit again to merge the pending disks",
            merged_disks=merged,
            pending_disks=remaining[cut:],
        )
        self.apply(E.COMMIT_FAILED, failure)
        self.set_failed(failure)

    @precondition(lambda self: self.state is S.FAILED and self.model_can_commit)
    @rule()
    def retry_commit_after_a_failure(self) -> None:
        self.apply(E.COMMIT)
        self.state = S.COMMITTING
        self.clear_failure()

    # --- discard ------------------------------------------------------------------------------------

    @precondition(lambda self: self.state in {S.ACTIVE, S.FAILED})
    @rule()
    def discard(self) -> None:
        if not self.model_can_discard:
            self.refused(lambda: self.current().apply(E.DISCARD), PrerequisiteError)
            return
        self.apply(E.DISCARD)
        self.state = S.DISCARDING
        self.clear_failure()

    @precondition(lambda self: self.state is S.DISCARDING)
    @rule(memory_restored=st.booleans())
    def discard_succeeds(self, memory_restored: bool) -> None:
        # Resumed from memory or cold-started: the same event either way.
        self.apply(E.DISCARDED)
        self.state = S.DISCARDED

    @precondition(lambda self: self.state is S.DISCARDING)
    @rule(reason=texts, step=texts)
    def discard_fails(self, reason: str, step: str) -> None:
        failure = Failure(S.DISCARDING, reason, step, pending_disks=self.disks)
        self.apply(E.DISCARD_FAILED, failure)
        self.set_failed(failure)

    # --- recover ------------------------------------------------------------------------------------

    def recovered_failure(self, rolled_back: bool, reason: str = "r", step: str = "s") -> Failure:
        """What recover reports when it finds the session broken, as a careful driver would."""
        assert self.state is not None
        phase = self.state if self.state is not S.FAILED else self.phase
        assert phase is not None
        rolled_back = rolled_back and not self.merged
        return Failure(
            phase,
            reason,
            step,
            rolled_back,
            merged_disks=sorted(self.merged),
            pending_disks=() if rolled_back else sorted(set(self.disks) - self.merged),
        )

    @precondition(lambda self: self.state in MODEL_UNFINISHED)
    @rule(outcome=st.sampled_from(sorted(RECOVERED, key=str)), rolled_back=st.booleans())
    def recover(self, outcome: Event, rolled_back: bool) -> None:
        failure = self.recovered_failure(rolled_back) if outcome is E.RECOVERED_FAILED else None
        if outcome not in self.model_recover_outcomes():
            self.refused(lambda: self.current().apply(outcome, failure), IllegalTransition)
            return
        self.apply(outcome, failure)
        found = RECOVERED[outcome]
        if failure is not None:
            self.set_failed(failure)
            return
        self.state = found
        self.clear_failure()
        if found is S.COMMITTED:
            self.merged = set(self.disks)

    # --- a sloppy driver ----------------------------------------------------------------------------

    @precondition(lambda self: self.state in {S.CREATING, S.COMMITTING, S.DISCARDING})
    @rule(data=st.data(), blank=st.sampled_from(["", " ", "\n\t"]))
    def sloppy_failure_reports_are_refused(self, data: st.DataObject, blank: str) -> None:
        """A failure report that would lose what the operator must reconcile changes nothing."""
        assert self.state is not None
        event = {
            S.CREATING: E.ENABLE_FAILED,
            S.COMMITTING: E.COMMIT_FAILED,
            S.DISCARDING: E.DISCARD_FAILED,
        }[self.state]
        pending = sorted(set(self.disks) - self.merged)
        # No reason, or no next step: refused when the Failure is built.
        with pytest.raises(InvalidArgument):
            Failure(self.state, blank, "s")
        with pytest.raises(InvalidArgument):
            Failure(self.state, "r", blank)
        # The wrong phase: the failure must name the state the work failed in.
        wrong = data.draw(
            st.sampled_from(sorted(MODEL_UNFINISHED - {self.state, S.FAILED}, key=str))
        )
        self.refused(
            lambda: self.current().apply(event, Failure(wrong, "r", "s", pending_disks=pending)),
            InvalidArgument,
        )
        # Forgetting disks a previous commit already merged would reopen discard: refused.
        if self.merged:
            kept = data.draw(
                st.sets(st.sampled_from(sorted(self.merged))).filter(lambda k: k != self.merged)
            )
            forgetful = Failure(S.COMMITTING, "r", "s", merged_disks=sorted(kept))
            self.refused(lambda: self.current().apply(event, forgetful), InvalidArgument)

    # --- illegal events -------------------------------------------------------------------------

    @rule(data=st.data(), with_failure=st.booleans())
    def illegal_event(self, data: st.DataObject, with_failure: bool) -> None:
        illegal = sorted(set(Event) - MODEL_MOVES[self.state], key=str)
        event = data.draw(st.sampled_from(illegal), label="illegal event")
        if self.status is None:
            self.refused(lambda: next_state(None, event), IllegalTransition)
            return
        failure = Failure(S.COMMITTING, "x", "y") if with_failure else None
        self.refused(lambda: self.current().apply(event, failure), IllegalTransition)

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data(), event=st.sampled_from(sorted(Event, key=str)))
    def poke_a_finished_session(self, data: st.DataObject, event: Event) -> None:
        old, _ = data.draw(st.sampled_from(self.history), label="finished session")
        failure = Failure(S.CREATING, "x", "y") if event is E.RECOVERED_FAILED else None
        if old.terminal:
            with pytest.raises(IllegalTransition):
                old.apply(event, failure)
            return
        # A rolled-back FAILED session: whatever apply says, it answers with a new value.
        try:
            new = old.apply(event, failure)
        except (IllegalTransition, PrerequisiteError):
            return
        assert new is not old

    # --- invariants ---------------------------------------------------------------------------------

    @invariant()
    def state_is_one_of_the_seven_and_the_models(self) -> None:
        if self.status is None:
            assert self.state is None
            return
        assert isinstance(self.status.state, State)
        assert self.status.state in set(State)
        assert self.status.state is self.state

    @invariant()
    def failed_always_says_what_to_reconcile(self) -> None:
        if self.status is None:
            return
        failure = self.status.failure
        if self.status.state is not S.FAILED:
            assert failure is None
            return
        assert failure is not None
        assert failure.reason.strip()
        assert failure.next_step.strip()
        assert failure.phase is self.phase
        assert failure.rolled_back is self.rolled_back
        assert set(failure.merged_disks) == self.merged
        assert set(failure.pending_disks) == self.pending
        assert set(failure.merged_disks) | set(failure.pending_disks) <= set(self.disks)

    @invariant()
    def merged_disks_are_never_forgotten(self) -> None:
        if self.status is not None and not self.status.terminal:
            assert set(self.status.merged_disks) == self.merged

    @invariant()
    def new_session_only_when_the_last_is_finished(self) -> None:
        assert may_start_new_session(self.status) is (self.state is None or self.model_finished)
        if self.status is not None:
            assert self.status.finished is self.model_finished
            assert self.status.can_commit is self.model_can_commit
            assert self.status.can_discard is self.model_can_discard

    @invariant()
    def discard_never_allowed_once_a_disk_was_merged(self) -> None:
        if self.status is None or not self.merged:
            return
        assert not self.status.can_discard
        with pytest.raises((IllegalTransition, PrerequisiteError)):
            self.status.apply(E.DISCARD)
        # Nor can a failure report that forgets a merged disk reopen it.
        event = {S.COMMITTING: E.COMMIT_FAILED, S.FAILED: E.RECOVERED_FAILED}.get(self.status.state)
        if event is not None:
            for gone in sorted(self.merged):
                kept = sorted(self.merged - {gone})
                pending = sorted(set(self.disks) - set(kept))
                forgetful = Failure(
                    S.COMMITTING, "r", "s", merged_disks=kept, pending_disks=pending
                )
                with pytest.raises(InvalidArgument, match="forgets"):
                    self.status.apply(event, forgetful)

    @invariant()
    def terminal_states_never_change(self) -> None:
        if self.reached_terminal is not None:
            reached, copy = self.reached_terminal
            assert self.status is reached
            assert snapshot(reached) == copy
        for old, copy in self.history:
            assert old.finished
            assert snapshot(old) == copy
        assert len(self.history) == max(self.sessions - 1, 0)

    @invariant()
    def recover_from_any_unfinished_state_finds_a_legal_true_state(self) -> None:
        if self.status is None or self.status.state not in UNFINISHED:
            return
        accepted = set()
        for event, found in RECOVERED.items():
            failure = self.recovered_failure(False) if found is S.FAILED else None
            try:
                after = self.status.apply(event, failure)
            except IllegalTransition:
                continue
            accepted.add(event)
            assert after.state is found
            assert after.state in {S.ACTIVE, S.COMMITTED, S.DISCARDED, S.FAILED}
            assert set(after.merged_disks) == self.merged
        assert accepted == self.model_recover_outcomes()
        assert E.RECOVERED_FAILED in accepted


TestForgeInstance = ForgeInstance.TestCase
TestForgeInstance.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


# --- next_state alone ---------------------------------------------------------------------------


#: Where each request and each success leads, whatever state it comes from.
OUTCOME_OF = {
    E.ENABLE: S.CREATING,
    E.ENABLED: S.ACTIVE,
    E.COMMIT: S.COMMITTING,
    E.COMMITTED: S.COMMITTED,
    E.DISCARD: S.DISCARDING,
    E.DISCARDED: S.DISCARDED,
}


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_event_sequences_only_reach_states_in_the_table(data: st.DataObject) -> None:
    targets = set(TRANSITIONS.values())
    state: State | None = None
    for _ in range(data.draw(st.integers(0, 60), label="steps")):
        legal = [e for (s, e) in TRANSITIONS if s is state]
        choices = st.sampled_from(sorted(Event, key=str))
        if legal:
            choices = choices | st.sampled_from(legal)
        event = data.draw(choices, label="event")
        try:
            new = next_state(state, event)
        except IllegalTransition:
            assert (state, event) not in TRANSITIONS
            if state in TERMINAL and data.draw(st.booleans(), label="new session"):
                state = None
            continue
        assert (state, event) in TRANSITIONS
        assert new in targets
        assert isinstance(new, State)
        assert state not in TERMINAL, "nothing leaves a terminal state"
        assert (event is E.ENABLE) is (state is None)
        if event in RECOVER_EVENTS:
            assert new.value == event.value.removeprefix("recovered_")
        if event in {E.ENABLE_FAILED, E.COMMIT_FAILED, E.DISCARD_FAILED}:
            assert new is S.FAILED
        if event in OUTCOME_OF:
            assert new is OUTCOME_OF[event]
        state = new
