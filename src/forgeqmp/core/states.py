"""The Forge session states (sans-IO).

A forge session is a small state machine, and this module is all of it, written as data:

- :class:`State`: the seven states; :class:`Event`: the inputs that move a session.
- :data:`TRANSITIONS`: the table ``(state, event) -> next state``, ``None`` meaning "no session
  yet". A move that is not in the table is illegal; no other place allows one: a session record
  changes state only through :func:`forgeqmp.core.lifecycle.advance`, which asks this table (and
  ``SessionRecord.evolve`` refuses ``state=``).
- :func:`next_state`: looks a move up in the table, raising
  :class:`~forgeqmp.errors.IllegalTransition` for one the table does not hold.
- :class:`Failure` and :class:`SessionStatus`: the values a session record keeps. The status adds
  the rules a table of states cannot say by itself: a failed session carries what failed and what
  to do, and discard is refused once a disk was merged into its original (the point of no return).
- :func:`render_mermaid` and :func:`render_dot`: the table as a Mermaid or Graphviz diagram, so
  the docs are generated, never redrawn (the docs draw the Graphviz one into SVG at build time).

Nothing here does I/O. The operations run the QMP steps and feed their outcomes in as events
(:mod:`forgeqmp.core.lifecycle`); the record store writes the resulting record before and after
each step.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from forgeqmp.core.steps import RecoverStep
from forgeqmp.errors import IllegalTransition, InvalidArgument, PrerequisiteError, SessionActive

__all__ = [
    "FAILED_EVENT",
    "FORGE_BYPASSED",
    "RECOVER_EVENTS",
    "TERMINAL",
    "TRANSITIONS",
    "UNFINISHED",
    "WORKING",
    "WORKING_OPERATION",
    "Event",
    "Failure",
    "SessionStatus",
    "State",
    "allowed_events",
    "may_start_new_session",
    "next_state",
    "render_dot",
    "render_mermaid",
    "start_session",
]


class State(enum.Enum):
    """The seven states of a forge session.

    The value is the name used in records, JSON and the CLI.
    """

    CREATING = "creating"
    ACTIVE = "active"
    COMMITTING = "committing"
    DISCARDING = "discarding"
    COMMITTED = "committed"
    DISCARDED = "discarded"
    FAILED = "failed"


class Event(enum.Enum):
    """What happens to a session: a request (enable, commit, discard) or the outcome of one.

    Requests move a session into a working state (CREATING, COMMITTING, DISCARDING); outcomes move
    it out. The ``RECOVERED_*`` events are what ``recover`` found true after inspecting QEMU and the
    files, whatever the record said. The value is the name used in logs and in the state diagram.
    """

    ENABLE = "enable"
    ENABLED = "enabled"
    ENABLE_FAILED = "enable_failed"
    COMMIT = "commit"
    COMMITTED = "committed"
    COMMIT_FAILED = "commit_failed"
    DISCARD = "discard"
    #: The disks were reverted; the VM resumed from the memory file or fell back to a cold start.
    DISCARDED = "discarded"
    DISCARD_FAILED = "discard_failed"
    RECOVERED_ACTIVE = "recovered_active"
    RECOVERED_COMMITTED = "recovered_committed"
    RECOVERED_DISCARDED = "recovered_discarded"
    RECOVERED_FAILED = "recovered_failed"


# The whole state machine. Read it top to bottom: a move is legal if and only if it is listed here.
# None is "no session yet" (or the previous one is finished and a new one starts).
_TABLE: dict[tuple[State | None, Event], State] = {
    # --- enable: overlays and the memory file are being created; either the session is ACTIVE
    # (VM on overlays, memory saved) or it FAILED (its Failure says whether it was rolled back).
    (None, Event.ENABLE): State.CREATING,
    (State.CREATING, Event.ENABLED): State.ACTIVE,
    (State.CREATING, Event.ENABLE_FAILED): State.FAILED,
    # --- commit: overlays are merged into the originals. The first merged disk is the point of no
    # return. A commit that failed or timed out is finished by committing again from FAILED: the
    # disks already merged stay merged, the pending ones are merged now.
    (State.ACTIVE, Event.COMMIT): State.COMMITTING,
    (State.COMMITTING, Event.COMMITTED): State.COMMITTED,
    (State.COMMITTING, Event.COMMIT_FAILED): State.FAILED,
    (State.FAILED, Event.COMMIT): State.COMMITTING,
    # --- discard: QEMU restarts on the untouched originals and resumes from the memory file (or
    # cold-starts). Retrying from FAILED is in the table; whether it is safe (no disk merged yet,
    # nothing rolled back) is SessionStatus's guard, not the table's.
    (State.ACTIVE, Event.DISCARD): State.DISCARDING,
    (State.DISCARDING, Event.DISCARDED): State.DISCARDED,
    (State.DISCARDING, Event.DISCARD_FAILED): State.FAILED,
    (State.FAILED, Event.DISCARD): State.DISCARDING,
    # --- recover: after a crash, a timeout or a hand repair, recover looks at QEMU and the files
    # and reports what is true, whatever the record says: the record of an interrupted or failed
    # session may be stale (the work went on, or the operator reconciled by hand), so any true
    # state is accepted here. What the record rules out (ACTIVE or DISCARDED once a disk was
    # merged) is SessionStatus's guard.
    (State.CREATING, Event.RECOVERED_ACTIVE): State.ACTIVE,
    (State.CREATING, Event.RECOVERED_COMMITTED): State.COMMITTED,
    (State.CREATING, Event.RECOVERED_DISCARDED): State.DISCARDED,
    (State.CREATING, Event.RECOVERED_FAILED): State.FAILED,
    (State.COMMITTING, Event.RECOVERED_ACTIVE): State.ACTIVE,
    (State.COMMITTING, Event.RECOVERED_COMMITTED): State.COMMITTED,
    (State.COMMITTING, Event.RECOVERED_DISCARDED): State.DISCARDED,
    (State.COMMITTING, Event.RECOVERED_FAILED): State.FAILED,
    (State.DISCARDING, Event.RECOVERED_ACTIVE): State.ACTIVE,
    (State.DISCARDING, Event.RECOVERED_COMMITTED): State.COMMITTED,
    (State.DISCARDING, Event.RECOVERED_DISCARDED): State.DISCARDED,
    (State.DISCARDING, Event.RECOVERED_FAILED): State.FAILED,
    (State.FAILED, Event.RECOVERED_ACTIVE): State.ACTIVE,
    (State.FAILED, Event.RECOVERED_COMMITTED): State.COMMITTED,
    (State.FAILED, Event.RECOVERED_DISCARDED): State.DISCARDED,
    (State.FAILED, Event.RECOVERED_FAILED): State.FAILED,
    # An ACTIVE session has no operation under way (commit and discard record COMMITTING or
    # DISCARDING before they touch anything), so recover on it can only confirm ACTIVE or find that
    # something broke it (an overlay or the memory file is gone): FAILED.
    (State.ACTIVE, Event.RECOVERED_ACTIVE): State.ACTIVE,
    (State.ACTIVE, Event.RECOVERED_FAILED): State.FAILED,
    # --- COMMITTED and DISCARDED are terminal: no event leaves them. The next session starts from
    # None again (see may_start_new_session).
}

#: The transition table, read-only: ``(state or None, event) -> next state``.
TRANSITIONS: Mapping[tuple[State | None, Event], State] = types.MappingProxyType(_TABLE)

#: States no event leaves. A session that reaches one is over for good.
TERMINAL: frozenset[State] = frozenset({State.COMMITTED, State.DISCARDED})

#: States of a session that is not over, from which ``recover`` can act. A FAILED session whose
#: failure was rolled back is over nonetheless: ask :attr:`SessionStatus.finished`, not this set.
UNFINISHED: frozenset[State] = frozenset(State) - TERMINAL

#: The working states (an operation is under way, or was interrupted), with the operation's name.
WORKING_OPERATION: Mapping[State, str] = types.MappingProxyType(
    {State.CREATING: "enable", State.COMMITTING: "commit", State.DISCARDING: "discard"}
)

#: States in which an operation is under way: the request moved the session there, its outcome
#: moves it out.
WORKING: frozenset[State] = frozenset(WORKING_OPERATION)

#: The failure outcome of the operation under way in each working state.
FAILED_EVENT: Mapping[State, Event] = types.MappingProxyType(
    {
        State.CREATING: Event.ENABLE_FAILED,
        State.COMMITTING: Event.COMMIT_FAILED,
        State.DISCARDING: Event.DISCARD_FAILED,
    }
)

#: The outcomes of ``recover``: the true state it found.
RECOVER_EVENTS: frozenset[Event] = frozenset(
    {
        Event.RECOVERED_ACTIVE,
        Event.RECOVERED_COMMITTED,
        Event.RECOVERED_DISCARDED,
        Event.RECOVERED_FAILED,
    }
)


def _name(state: State | None) -> str:
    return "no session" if state is None else repr(state.value)


def _where(state: State | None) -> str:
    return "when there is no session" if state is None else f"for a session in {state.value!r}"


def allowed_events(state: State | None) -> tuple[Event, ...]:
    """The events the table accepts from ``state``, in table order (empty for a terminal state)."""
    return tuple(event for (source, event) in TRANSITIONS if source is state)


def next_state(state: State | None, event: Event) -> State:
    """The state ``event`` moves a session in ``state`` to (``None``: no session yet).

    Raises :class:`IllegalTransition` for a move the table does not hold; that is a bug in the
    caller or a hand-edited record, never something to retry.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        pass
    allowed = allowed_events(state)
    if allowed:
        what = "allowed from there: " + ", ".join(e.value for e in allowed)
    else:
        what = f"{_name(state)} is terminal: no event leaves it; start a new session instead"
    shown = repr(event.value) if isinstance(event, Event) else repr(event)
    raise IllegalTransition(f"event {shown} is illegal {_where(state)}; {what}")


# --- values -------------------------------------------------------------------------------------

#: The states work can fail in. FAILED itself is not one: when recover finds a FAILED session still
#: failed, it reports the phase of the work that failed, which is what the operator must reconcile.
_FAILURE_PHASES = WORKING | {State.ACTIVE}


def _disk_names(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise InvalidArgument(f"disk names must be a sequence of names, not the string {value!r}")
    return tuple(value)


def _check_disk_names(_: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for name in value:
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{attribute.name}: every disk name must be a non-empty string")
    if len(set(value)) != len(value):
        raise InvalidArgument(f"{attribute.name} lists a disk twice: {value!r}")


def _check_text(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"a Failure needs a non-empty {attribute.name}")


def _check_bool(_: Any, attribute: attrs.Attribute[Any], value: bool) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{attribute.name} must be True or False, not {value!r}")


def _check_phase(_: Any, attribute: attrs.Attribute[Any], value: State) -> None:
    if value not in _FAILURE_PHASES:
        allowed = ", ".join(sorted(s.value for s in _FAILURE_PHASES))
        raise InvalidArgument(f"a Failure's phase is one of {allowed}, not {value!r}")


@attrs.frozen
class Failure:
    """Why a session is FAILED, what it left behind, and what the operator should do next.

    ``phase`` is the state the failure happened in: CREATING, COMMITTING or DISCARDING for a failed
    operation, or the state recover found broken (ACTIVE, or the interrupted operation's state).

    ``rolled_back`` means everything was undone (no overlay, no memory file, the VM on its original
    disks): the instance is free for a new session. ``merged_disks`` are past the commit's point of
    no return, merged into their originals; ``pending_disks`` are still on their overlays.
    """

    phase: State = attrs.field(validator=_check_phase)
    reason: str = attrs.field(validator=_check_text)
    next_step: str = attrs.field(validator=_check_text)
    rolled_back: bool = attrs.field(default=False, validator=_check_bool)
    merged_disks: tuple[str, ...] = attrs.field(
        default=(), converter=_disk_names, validator=_check_disk_names
    )
    pending_disks: tuple[str, ...] = attrs.field(
        default=(), converter=_disk_names, validator=_check_disk_names
    )

    def __attrs_post_init__(self) -> None:
        both = set(self.merged_disks) & set(self.pending_disks)
        if both:
            raise InvalidArgument(f"disks both merged and pending: {sorted(both)}")
        if self.rolled_back and (self.merged_disks or self.pending_disks):
            raise InvalidArgument(
                "a rolled-back failure leaves no disk merged or on an overlay; "
                "list them in merged_disks/pending_disks and set rolled_back=False"
            )
        if self.merged_disks and self.phase is not State.COMMITTING:
            raise InvalidArgument(
                f"only a commit merges disks, but this failure's phase is {self.phase.value!r}"
            )


#: The record step recover writes when it finds the forge bypassed (the VM ran on its original disks
#: since enable, e.g. QEMU restarted with its original command line). The originals may have
#: changed since, so the memory state saved at enable no longer matches them: discard stays refused
#: for the rest of the session (:attr:`SessionStatus.originals_written`). The step itself is
#: :attr:`forgeqmp.core.steps.RecoverStep.FORGE_BYPASSED`; this is its name here.
FORGE_BYPASSED: Final = RecoverStep.FORGE_BYPASSED


def _check_status_state(_: Any, attribute: attrs.Attribute[Any], value: State) -> None:
    if not isinstance(value, State):
        raise InvalidArgument(f"state must be a State, not {value!r}")


def _check_status_failure(_: Any, attribute: attrs.Attribute[Any], value: Failure | None) -> None:
    if value is not None and not isinstance(value, Failure):
        raise InvalidArgument(f"failure must be a Failure or None, not {value!r}")


@attrs.frozen
class SessionStatus:
    """Where a session is: its state, and, when FAILED, its :class:`Failure`.

    FAILED requires a Failure and every other state forbids one, so a failed session always says
    what to reconcile. ``merged_disks`` carries the disks already merged through a retried commit
    (the Failure is dropped while COMMITTING again); it only grows, so discard stays refused once
    any disk passed the point of no return. It defaults to the Failure's ``merged_disks``.

    Values are immutable: :meth:`apply` returns a new status and leaves this one as it was.
    """

    state: State = attrs.field(validator=_check_status_state)
    failure: Failure | None = attrs.field(default=None, validator=_check_status_failure)
    merged_disks: tuple[str, ...] = attrs.field(converter=_disk_names, validator=_check_disk_names)
    #: The originals may have been written since enable other than by a commit (a bypassed forge,
    #: see :data:`FORGE_BYPASSED`): the memory state of enable no longer fits them, discard is
    #: refused in every state.
    originals_written: bool = attrs.field(default=False, validator=_check_bool, kw_only=True)

    @merged_disks.default
    def _merged_from_failure(self) -> tuple[str, ...]:
        return self.failure.merged_disks if isinstance(self.failure, Failure) else ()

    def __attrs_post_init__(self) -> None:
        if self.state is State.FAILED and self.failure is None:
            raise InvalidArgument(
                "a FAILED session needs a Failure saying what failed and what to do"
            )
        if self.state is not State.FAILED and self.failure is not None:
            raise InvalidArgument(f"a session in state {self.state.value!r} cannot carry a Failure")
        if self.failure is not None and set(self.failure.merged_disks) != set(self.merged_disks):
            raise InvalidArgument(
                f"merged_disks {self.merged_disks!r} disagree with the Failure's "
                f"{self.failure.merged_disks!r}"
            )
        if self.merged_disks and self.state not in {
            State.COMMITTING,
            State.COMMITTED,
            State.FAILED,
        }:
            raise InvalidArgument(f"a session in state {self.state.value!r} has no merged disk")

    @property
    def terminal(self) -> bool:
        """COMMITTED or DISCARDED: no event changes this session any more."""
        return self.state in TERMINAL

    @property
    def finished(self) -> bool:
        """The session is over, a new one may start: terminal, or FAILED and fully rolled back."""
        if self.terminal:
            return True
        return self.failure is not None and self.failure.rolled_back

    @property
    def can_commit(self) -> bool:
        """A commit may start: the session is ACTIVE, or a commit failed with disks pending."""
        if self.state is State.ACTIVE:
            return True
        failure = self.failure
        return (
            failure is not None
            and failure.phase is State.COMMITTING
            and not failure.rolled_back
            and bool(failure.pending_disks)
        )

    @property
    def can_discard(self) -> bool:
        """A discard may start: ACTIVE, or FAILED with nothing rolled back and no disk merged; never
        once the originals were written outside a commit (:attr:`originals_written`)."""
        if self.originals_written:
            return False
        if self.state is State.ACTIVE:
            return True
        failure = self.failure
        return failure is not None and not failure.rolled_back and not self.merged_disks

    def apply(self, event: Event, failure: Failure | None = None) -> SessionStatus:
        """The status after ``event``; ``failure`` is required exactly when it leads to FAILED.

        Raises :class:`IllegalTransition` for a move the table does not hold or a recover outcome
        the record makes impossible (ACTIVE or DISCARDED after a disk was merged);
        :class:`PrerequisiteError` for a commit or discard the guards refuse (see :attr:`can_commit`
        and :attr:`can_discard`); :class:`InvalidArgument` for a missing, unexpected or inconsistent
        Failure. In every case this status is unchanged.
        """
        target = next_state(self.state, event)
        if self.state is State.FAILED and event is Event.COMMIT and not self.can_commit:
            raise PrerequisiteError(self._refusal("commit"))
        if event is Event.DISCARD and self.originals_written:
            raise PrerequisiteError(
                "cannot discard: the forge was bypassed (the VM ran on its original disks since "
                "enable), so the originals may have changed and the memory state saved at enable "
                "no longer matches them; keep the VM as it runs on its originals and remove the "
                "session's overlays and memory file by hand ('forgeqmp status' lists them)"
            )
        if self.state is State.FAILED and event is Event.DISCARD and not self.can_discard:
            raise PrerequisiteError(self._refusal("discard"))
        if self.merged_disks and event in {Event.RECOVERED_ACTIVE, Event.RECOVERED_DISCARDED}:
            raise IllegalTransition(
                f"recover cannot find the session {target.value!r}: disks "
                f"{', '.join(self.merged_disks)} were already merged into their originals; "
                "it is COMMITTED, or FAILED with those disks merged"
            )
        if target is State.FAILED:
            if failure is None:
                raise InvalidArgument(
                    f"event {event.value!r} leads to FAILED: pass the Failure saying what failed "
                    "and what to do next"
                )
            self._check_failure(event, failure)
            return SessionStatus(target, failure, originals_written=self.originals_written)
        if failure is not None:
            raise InvalidArgument(
                f"event {event.value!r} leads to {target.value!r}, which carries no Failure"
            )
        merged = () if target is State.ACTIVE else self.merged_disks
        return SessionStatus(target, None, merged, originals_written=self.originals_written)

    def _check_failure(self, event: Event, failure: Failure) -> None:
        # A failure is reported in the state the work was in; a FAILED session found FAILED again by
        # recover keeps whatever phase recover reports.
        if self.state is not State.FAILED and failure.phase is not self.state:
            raise InvalidArgument(
                f"event {event.value!r} in state {self.state.value!r}: the Failure's phase must be "
                f"{self.state.value!r}, not {failure.phase.value!r}"
            )
        forgotten = set(self.merged_disks) - set(failure.merged_disks)
        if forgotten:
            raise InvalidArgument(
                f"the Failure forgets disks already merged: {sorted(forgotten)}; merged disks stay "
                "merged, list them in merged_disks"
            )

    def _refusal(self, operation: str) -> str:
        failure = self.failure
        assert failure is not None  # only called in FAILED, which always carries a Failure
        if failure.rolled_back:
            return (
                f"cannot {operation}: the failed session was rolled back, nothing is left to "
                f"{operation}; start a new session"
            )
        if operation == "discard":
            return (
                f"cannot discard: disks {', '.join(self.merged_disks)} were already merged into "
                "their originals (past the point of no return); run commit to finish the rest"
            )
        if failure.phase is not State.COMMITTING:
            return (
                f"cannot commit: the session failed while {failure.phase.value}, not during a "
                f"commit; {failure.next_step}"
            )
        return f"cannot commit: no disk is left on an overlay; {failure.next_step}"


def may_start_new_session(status: SessionStatus | None) -> bool:
    """Whether a new session may start on an instance whose last session is ``status``.

    Only when there is none or it is finished: committed, discarded, or failed and rolled back.
    """
    return status is None or status.finished


def start_session(previous: SessionStatus | None) -> SessionStatus:
    """The status of a new session (CREATING).

    Raises :class:`SessionActive` if the previous session is unfinished (see
    :func:`may_start_new_session`).
    """
    if not may_start_new_session(previous):
        assert previous is not None
        if previous.failure is not None:
            hint = previous.failure.next_step
        elif previous.state is State.ACTIVE:
            hint = "commit or discard it first"
        else:
            hint = "an operation on it is under way or was interrupted; wait for it or run recover"
        raise SessionActive(
            f"a forge session is unfinished (state {previous.state.value!r}): {hint}"
        )
    return SessionStatus(next_state(None, Event.ENABLE))


# --- documentation ------------------------------------------------------------------------------


def render_mermaid(
    transitions: Mapping[tuple[State | None, Event], State] = TRANSITIONS,
) -> str:
    """The transition table as Mermaid ``stateDiagram-v2`` text, one edge per table entry.

    ``None`` (no session) is Mermaid's start ``[*]``; states no entry leaves get an edge to the end
    ``[*]``. The docs generate the state diagram from this, so it can never drift from the table.
    """
    lines = ["stateDiagram-v2"]
    for (source, event), target in transitions.items():
        start = "[*]" if source is None else source.value
        lines.append(f"    {start} --> {target.value} : {event.value}")
    sources = {source for (source, _) in transitions}
    for state in State:
        if state not in sources and state in transitions.values():
            lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines) + "\n"


def render_dot(
    transitions: Mapping[tuple[State | None, Event], State] = TRANSITIONS,
) -> str:
    """The transition table as a Graphviz ``digraph``, one edge per table entry, in table order.

    ``None`` (no session) is the filled start node ``start``; states no entry leaves get an edge to
    the end node ``end``, as in :func:`render_mermaid`. The docs turn it into SVG when they are
    built, so the page needs no script and no network to show it.
    """
    lines = [
        "digraph forge_states {",
        '    graph [rankdir=LR, fontname="sans-serif"];',
        '    node [shape=box, style=rounded, fontname="sans-serif"];',
        '    edge [fontname="sans-serif", fontsize=10];',
        '    start [label="", shape=circle, style=filled, fillcolor=black, width=0.2];',
    ]
    sources = {source for (source, _) in transitions}
    ends = [s for s in State if s not in sources and s in transitions.values()]
    if ends:
        lines.append(
            '    end [label="", shape=doublecircle, style=filled, fillcolor=black, width=0.15];'
        )
    for (source, event), target in transitions.items():
        start = "start" if source is None else f'"{source.value}"'
        lines.append(f'    {start} -> "{target.value}" [label="{event.value}"];')
    lines.extend(f'    "{state.value}" -> end;' for state in ends)
    lines.append("}")
    return "\n".join(lines) + "\n"
