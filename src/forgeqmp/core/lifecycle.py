"""The one writer of a session record's state (sans-IO).

:mod:`forgeqmp.core.states` holds the transition table; this module is where a record moves by
it. A record's ``state`` changes only here: :func:`advance` applies an :class:`Event` to a
record and returns the new record in the state the table gives (or raises the table's typed
error), and :func:`begin` makes the record of a new session, in the state the table gives the
``enable`` request. :meth:`SessionRecord.evolve <forgeqmp.core.record.SessionRecord.evolve>`
refuses a change of state, so no other code can make a move the table does not hold.

:func:`status_of` reads a record as the :class:`SessionStatus` the table's guards judge (a
FAILED record's :class:`Failure`, which disks are merged, whether the forge was bypassed).
"""

from __future__ import annotations

from typing import Any

import attrs

from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import (
    Event,
    Failure,
    SessionStatus,
    State,
    next_state,
    start_session,
)
from forgeqmp.core.steps import RecoverStep
from forgeqmp.errors import InvalidArgument

__all__ = ["GUARDED_EVENTS", "advance", "begin", "status_of"]

#: The requests whose guards are the status's, not only the table's: a commit or discard from
#: FAILED (is anything left to do, is discard still safe), a discard after a bypassed forge.
GUARDED_EVENTS = frozenset({Event.COMMIT, Event.DISCARD})


def status_of(record: SessionRecord) -> SessionStatus:
    """The sans-IO status (state + failure) a record describes."""
    bypassed = record.step is RecoverStep.FORGE_BYPASSED  # originals written outside a commit
    if record.state is not State.FAILED:
        return SessionStatus(record.state, None, originals_written=bypassed)
    # Fully merged: the overlay is gone. A disk whose commit started but did not finish is
    # pending (a later commit finishes it) and also bars discard (see Instance.discard).
    merged = tuple(d.name for d in record.disks if d.merged and d.overlay_node is None)
    pending = tuple(d.name for d in record.disks if d.overlay_node is not None)
    if record.rolled_back:  # everything was undone: the planned overlays never stayed
        merged = pending = ()
    failure = Failure(
        phase=record.failure_phase or State.ACTIVE,
        reason=record.error or "unknown failure",
        next_step=record.next_step or "run 'forgeqmp recover'",
        rolled_back=record.rolled_back,
        merged_disks=merged,
        pending_disks=pending,
    )
    return SessionStatus(State.FAILED, failure, originals_written=bypassed)


def _no_state(changes: dict[str, Any]) -> None:
    if "state" in changes:
        raise InvalidArgument(
            "a record's state is not set by hand: apply an Event (forgeqmp.core.lifecycle."
            "advance), and the transition table gives the state"
        )


def advance(record: SessionRecord, event: Event, **changes: Any) -> SessionRecord:
    """The record after ``event``: in the state the transition table gives for it from
    ``record.state``, with ``changes`` (any other fields) applied; otherwise unchanged.

    Raises :class:`~forgeqmp.errors.IllegalTransition` for a move the table does not hold, and,
    for a commit or discard request (:data:`GUARDED_EVENTS`), the
    :class:`~forgeqmp.errors.PrerequisiteError` of :meth:`SessionStatus.apply` when the session's
    status refuses it; :class:`~forgeqmp.errors.InvalidArgument` when ``changes`` name a state.
    In every case ``record`` is unchanged.
    """
    _no_state(changes)
    target = next_state(record.state, event)
    if event in GUARDED_EVENTS:
        target = status_of(record).apply(event).state
    return attrs.evolve(record, state=target, **changes)


def begin(previous: SessionRecord | None, **fields: Any) -> SessionRecord:
    """The record of a new session with ``fields``, in the state of the ``enable`` request.

    Raises :class:`~forgeqmp.errors.SessionActive` when ``previous`` (the instance's last
    session, None for none) is unfinished (:func:`forgeqmp.core.states.start_session`).
    """
    _no_state(fields)
    status = start_session(None if previous is None else status_of(previous))
    return SessionRecord(state=status.state, **fields)
