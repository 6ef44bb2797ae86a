"""The guard (sans-IO): what a hosting platform, or anyone talking QMP, must not do to a VM while
one of its forge sessions is unfinished.

Two lists, both data, both read by pure functions that raise
:class:`~forgeqmp.errors.OperationBlocked` with the session they wait on and how to finish it:

- :class:`Operation`: the platform operations of a control panel. :data:`BLOCKED_OPERATIONS` are
  refused while a session is unfinished (creating, active, committing, discarding, or failed and
  not rolled back: :attr:`~forgeqmp.core.states.SessionStatus.finished` is the rule);
  :data:`ALWAYS_ALLOWED` never are. :func:`check_operation` is the check.
- :data:`QMP_RULES`: the QMP commands that would break an unfinished session (resizing or removing
  a forged disk, backups and mirrors of it, medium changes, migration, link toggles, quit while
  forgeqmp is working...). :func:`check_qmp_command` is the check;
  :meth:`forgeqmp.Instance.execute_guarded` runs it before sending a command.

:func:`render_markdown` prints both as the tables of the docs' guard page, so the page is
generated from this data and a test keeps it from drifting. Nothing here does I/O: the callers
load the record and look for files (:func:`check_recorded` takes the loader and the existence
test as functions).
"""

from __future__ import annotations

import enum
import os
import shlex
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from forgeqmp.core import names as qemu_names
from forgeqmp.core.graphsession import GraphSession
from forgeqmp.core.lifecycle import status_of
from forgeqmp.core.record import DiskRecord, SessionRecord
from forgeqmp.core.states import UNFINISHED, WORKING, SessionStatus, State
from forgeqmp.errors import InvalidArgument, OperationBlocked, RecordError

__all__ = [
    "ALL_ARGUMENTS",
    "ALWAYS_ALLOWED",
    "BLOCKED_OPERATIONS",
    "HMP_EQUIVALENTS",
    "QMP_RULES",
    "UNFINISHED_STATES",
    "WORKING_STATES",
    "Operation",
    "QMPRule",
    "Scope",
    "check_graph_sessions",
    "check_operation",
    "check_qmp_command",
    "check_recorded",
    "finish_hint",
    "may_refuse",
    "missing_overlays",
    "overlays_missing_hint",
    "parse_operation",
    "qmp_rule",
    "record_unreadable",
    "render_markdown",
]


class Operation(enum.Enum):
    """A platform operation, as a control panel names it. The value is the CLI's ``OPERATION``."""

    REINSTALL = "reinstall"
    RESIZE = "resize"
    MIGRATE = "migrate"
    SUSPEND = "suspend"
    UNSUSPEND = "unsuspend"
    DISK_ADD = "disk-add"
    DISK_REMOVE = "disk-remove"
    DISK_RESIZE = "disk-resize"
    BACKUP = "backup"
    ISO_MOUNT = "iso-mount"
    ISO_UNMOUNT = "iso-unmount"
    IMAGE_CREATE = "image-create"
    PUBLIC_INTERFACE = "public-interface"
    DESTROY = "destroy"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    KILL = "kill"
    CONSOLE = "console"

    @property
    def blocked_during_session(self) -> bool:
        """Whether an unfinished session blocks this operation (else it is always allowed)."""
        return self in BLOCKED_OPERATIONS

    @property
    def why(self) -> str:
        """Why it is blocked during a session, or why it is safe."""
        return BLOCKED_OPERATIONS.get(self) or ALWAYS_ALLOWED[self]


#: The operations an unfinished session blocks, and why (the message and the docs say it).
BLOCKED_OPERATIONS: Mapping[Operation, str] = types.MappingProxyType(
    {
        Operation.REINSTALL: "a reinstall rewrites the forged disks under their overlays: discard "
        "would resume the old system on a new disk, commit would merge old writes into it",
        Operation.RESIZE: "a new CPU or memory size does not fit the memory state saved at "
        "enable, which discard restores onto the configuration of enable",
        Operation.MIGRATE: "the overlays, the memory file and the session record stay on this "
        "host with this QEMU: commit and discard would act on a VM that is gone",
        Operation.SUSPEND: "a suspended VM is stopped, and started later from the platform's "
        "definition, on the original images: that bypasses the overlays",
        Operation.UNSUSPEND: "it starts the VM from the platform's definition, on the original "
        "images: that bypasses the overlays (a VM stopped during a session must be started with "
        "Instance.start_spec())",
        Operation.DISK_ADD: "a disk added now is not in the session: its writes are not reverted "
        "by discard, which restarts QEMU with the disks of enable (without it)",
        Operation.DISK_REMOVE: "commit and discard need every forged disk, and discard restarts "
        "QEMU with the disks of enable",
        Operation.DISK_RESIZE: "the disk would change size under its overlay and the saved "
        "memory state; discard refuses a disk whose size changed",
        Operation.BACKUP: "a backup now copies a trial state that may be discarded, and its job "
        "holds the forged nodes, which commit must remove",
        Operation.ISO_MOUNT: "discard restarts QEMU with the media of enable, so the change "
        "would be silently undone",
        Operation.ISO_UNMOUNT: "discard restarts QEMU with the media of enable, so the change "
        "would be silently undone",
        Operation.IMAGE_CREATE: "an image made now captures a trial that may be discarded, and "
        "reading the disks holds their nodes, which commit must remove",
        Operation.PUBLIC_INTERFACE: "discard restores the device state saved at enable, so the "
        "interface would silently flip back",
        Operation.DESTROY: "the session's overlays and memory file would be left behind, and "
        "nothing could finish the session; commit or discard first",
    }
)

#: The operations always allowed, and why they are safe.
ALWAYS_ALLOWED: Mapping[Operation, str] = types.MappingProxyType(
    {
        Operation.START: "safe if the VM is started with Instance.start_spec(), which puts each "
        "forged disk on its overlay (the platform's own command line would bypass them)",
        Operation.STOP: "the session survives a stopped VM: commit and discard also work offline",
        Operation.RESTART: "a guest reboot keeps QEMU and its overlays; a restart that relaunches "
        "QEMU must use Instance.start_spec(), like start",
        Operation.KILL: "like stop, a hard power-off: the overlays keep every write that reached "
        "the disks",
        Operation.CONSOLE: "it only reads the screen and types keys",
    }
)

assert set(BLOCKED_OPERATIONS) | set(ALWAYS_ALLOWED) == set(Operation)
assert not set(BLOCKED_OPERATIONS) & set(ALWAYS_ALLOWED)

#: The states of a session that is not over (a FAILED one is over once rolled back): the
#: transition table's :data:`forgeqmp.core.states.UNFINISHED`, under the name the rules use.
UNFINISHED_STATES: frozenset[State] = UNFINISHED
#: The states in which forgeqmp is carrying out an operation on QEMU
#: (:data:`forgeqmp.core.states.WORKING`).
WORKING_STATES: frozenset[State] = WORKING


def parse_operation(text: str | Operation) -> Operation:
    """The :class:`Operation` named ``text``; :class:`InvalidArgument` (exit 2) listing the valid
    names if there is none (case and surrounding blanks do not matter, ``_`` may stand for
    ``-``)."""
    if isinstance(text, Operation):
        return text
    if isinstance(text, str):
        wanted = text.strip().lower().replace("_", "-")
        for operation in Operation:
            if operation.value == wanted:
                return operation
    blocked = " ".join(op.value for op in BLOCKED_OPERATIONS)
    allowed = " ".join(op.value for op in ALWAYS_ALLOWED)
    raise InvalidArgument(
        f"unknown operation {text!r}; use one of: {blocked} (blocked during a forge session) or "
        f"{allowed} (always allowed)"
    )


# --- the session an operation waits on -----------------------------------------------------------


def _status(subject: SessionRecord | SessionStatus) -> SessionStatus:
    if isinstance(subject, SessionStatus):
        return subject
    return status_of(subject)


def finish_hint(subject: SessionRecord | SessionStatus) -> str:
    """What to do to finish the session ``subject`` (a record or its status), in one sentence."""
    status = _status(subject)
    state = status.state
    if status.finished:
        return "nothing: the session is finished"
    if state is State.ACTIVE:
        return (
            "finish the session first: 'forgeqmp commit' keeps what changed since enable, "
            "'forgeqmp discard' throws it away"
        )
    if state in WORKING_STATES:
        verb = {State.CREATING: "enable", State.COMMITTING: "commit"}.get(state, "discard")
        return (
            f"a forgeqmp {verb} is under way: wait for it to finish; if it was interrupted "
            "(no forgeqmp process works on it any more), run 'forgeqmp recover'"
        )
    failure = status.failure
    assert failure is not None  # FAILED always carries one
    step = failure.next_step.rstrip(". ")
    if "recover" not in step:
        step += "; or run 'forgeqmp recover' to re-examine the session"
    return step


def _session_name(subject: SessionRecord | SessionStatus) -> str:
    if isinstance(subject, SessionRecord):
        return f"forge session {subject.session_id}"
    return "the forge session"


def _blocked(
    what: str,
    subject: SessionRecord | SessionStatus,
    reason: str,
    *,
    operation: str,
) -> OperationBlocked:
    status = _status(subject)
    hint = finish_hint(status)
    return OperationBlocked(
        f"{what} is blocked: {_session_name(subject)} is {status.state.value}, and {reason}; "
        f"{hint}",
        operation=operation,
        session_id=subject.session_id if isinstance(subject, SessionRecord) else None,
        state=status.state.value,
        next_step=hint,
    )


def check_operation(
    subject: SessionRecord | SessionStatus | None, operation: Operation | str
) -> None:
    """Refuse ``operation`` if the session ``subject`` (its record, its status, or None for no
    session) is unfinished and the operation is one it blocks.

    :raises InvalidArgument: ``operation`` names no :class:`Operation`.
    :raises OperationBlocked: the operation must wait; the message names the session, its state,
        why, and how to finish it (also in the error's ``session_id``, ``state``, ``next_step``).
    """
    op = parse_operation(operation)
    if subject is None or not op.blocked_during_session or _status(subject).finished:
        return
    raise _blocked(op.value, subject, BLOCKED_OPERATIONS[op], operation=op.value)


def check_recorded(
    load: Callable[[], SessionRecord | None],
    operation: Operation | str,
    *,
    exists: Callable[[str], bool],
) -> SessionRecord | None:
    """:func:`check_operation` on the record ``load()`` returns (the caller's I/O, e.g.
    ``RecordStore(state_dir).load``); returns that record. ``exists`` tells whether a file is
    there (``os.path.exists``), for :func:`missing_overlays`.

    A record that cannot be read (:class:`~forgeqmp.errors.RecordError`) blocks every operation a
    session could block: the guard cannot tell the session is over, so it says no, with the
    record's own advice. Always-allowed operations stay allowed.
    """
    op = parse_operation(operation)
    try:
        record = load()
    except RecordError as exc:
        if not op.blocked_during_session:
            return None
        raise record_unreadable(op.value, exc) from exc
    check_operation(record, op)
    if record is not None and op in _STOPS_QEMU:
        gone = missing_overlays(record, exists)
        if gone:
            hint = overlays_missing_hint(record, gone)
            raise OperationBlocked(
                f"{op.value} is blocked: {hint}",
                operation=op.value,
                session_id=record.session_id,
                state=record.state.value,
                next_step=hint,
            )
    return record


def check_graph_sessions(
    record: SessionRecord | None,
    operation: Operation | str,
    sessions: Sequence[GraphSession] | None,
) -> None:
    """Refuse ``operation`` when this state dir's ``record`` shows no unfinished session but
    QEMU's block graph shows one (``sessions``, from
    :meth:`~forgeqmp.forge.Instance.sessions_in_graph`; None when QEMU was not asked): a
    session enabled through another state dir, or whose record was deleted.

    :raises OperationBlocked: the message names the session, what QEMU shows, and its record
        if it was found.
    """
    op = parse_operation(operation)
    if not sessions or not op.blocked_during_session:
        return
    if record is not None and not _status(record).finished:
        return  # check_operation answers for this session
    raise OperationBlocked(
        f"{op.value} is blocked: " + "; ".join(g.describe() for g in sessions),
        operation=op.value,
        next_step="finish that session through the state dir that enabled it",
    )


#: Always-allowed operations that end the QEMU process: blocked when an overlay file is gone,
#: since the running QEMU's open file is then the only copy of the guest's writes.
_STOPS_QEMU = frozenset({Operation.STOP, Operation.RESTART, Operation.KILL})
#: Failure phases in which the forged disks may still run on their overlays.
_ON_OVERLAYS = frozenset({State.ACTIVE, State.COMMITTING})


def missing_overlays(
    record: SessionRecord, exists: Callable[[str], bool]
) -> tuple[DiskRecord, ...]:
    """The forged disks of an unfinished session that are still on their overlay (not merged
    back) while the overlay file is gone from its directory (``exists`` is the only I/O)."""
    if record.state is State.FAILED:
        if record.rolled_back or record.failure_phase not in _ON_OVERLAYS:
            return ()
    elif record.state not in _ON_OVERLAYS:
        return ()
    return tuple(
        d
        for d in record.disks
        if d.overlay_node is not None and d.overlay_file is not None and not exists(d.overlay_file)
    )


def overlays_missing_hint(record: SessionRecord, gone: Sequence[DiskRecord]) -> str:
    """What a deleted overlay means and what to do, in one sentence."""
    names = ", ".join(f"{d.name} ({d.overlay_file})" for d in gone)
    return (
        f"the overlay file of forged disk(s) {names} was deleted; a QEMU still running on it "
        "holds the only copy of the guest's writes since enable: run 'forgeqmp commit' now to "
        "keep them, or 'forgeqmp discard' to drop them, and do not stop or restart QEMU before "
        "(if QEMU is not running any more, those writes are lost: run 'forgeqmp recover')"
    )


def record_unreadable(what: str, error: RecordError) -> OperationBlocked:
    """The refusal of ``what`` (an operation, a QMP command) when the session record cannot be
    read: the guard cannot tell whether a session is unfinished, so it says no."""
    return OperationBlocked(
        f"{what} is blocked: the forge session record cannot be read, so the guard cannot tell "
        f"whether a session is unfinished ({error})",
        operation=what,
        next_step="repair or restore the record as the error says, then run 'forgeqmp recover'",
    )


# --- QMP commands ------------------------------------------------------------------------------


class Scope(enum.Enum):
    """When a :class:`QMPRule` refuses its commands (in its states)."""

    #: Whatever the arguments.
    ANY = "any"
    #: When one of the rule's arguments is present at all.
    PRESENT = "present"
    #: When one of the rule's arguments names something of the session: a forged disk's node,
    #: device, image file or overlay, the memory file, or one of forgeqmp's jobs.
    FORGED = "forged"


#: In :attr:`QMPRule.arguments`: every argument (the whole arguments object is searched).
ALL_ARGUMENTS = "*"


@attrs.frozen
class QMPRule:
    """QMP commands an unfinished session refuses, when (:attr:`scope`, :attr:`arguments`), in
    which states, why, and the platform operation they belong to if any."""

    #: The QMP command names (older and newer spellings of one command included).
    commands: tuple[str, ...]
    #: When they are refused: always, with an argument present, or naming a forged disk.
    scope: Scope
    #: Why (the refusal and the docs say it).
    reason: str
    #: The argument names :attr:`scope` looks at (:data:`ALL_ARGUMENTS`: all of them).
    arguments: tuple[str, ...] = ()
    #: The session states they are refused in (a rolled-back FAILED session never refuses).
    states: frozenset[State] = UNFINISHED_STATES
    #: The platform operation they amount to, if any.
    operation: Operation | None = None

    def when(self) -> str:
        """The condition, in words (for messages and the docs)."""
        keys = " or ".join(f"`{a}`" for a in self.arguments)
        if self.scope is Scope.ANY:
            return "always"
        if self.scope is Scope.PRESENT:
            return f"with {keys}"
        if self.arguments == (ALL_ARGUMENTS,):
            return "any argument names a forged disk"
        return f"{keys} names a forged disk"

    def during(self) -> str:
        """The states, in words (for messages and the docs)."""
        if self.states == UNFINISHED_STATES:
            return "unfinished"
        return ", ".join(s.value for s in State if s in self.states)


_WORKING = WORKING_STATES
_JOB_STATES = frozenset({State.CREATING, State.COMMITTING})

#: The QMP commands that would break an unfinished session. Commands not listed are never
#: refused: power and console commands (``stop``, ``cont``, ``system_reset``,
#: ``system_wakeup``, ``send-key``...), every ``query-*``, and anything not touching the session.
#: ``transaction`` is checked action by action and ``human-monitor-command`` through
#: :data:`HMP_EQUIVALENTS`.
QMP_RULES: tuple[QMPRule, ...] = (
    QMPRule(
        ("block_resize", "block-resize"),
        Scope.FORGED,
        "the disk would change size under its overlay and the saved memory state: discard "
        "refuses it, commit would merge into a disk of another size",
        ("device", "node-name"),
        operation=Operation.DISK_RESIZE,
    ),
    QMPRule(
        ("blockdev-del",),
        Scope.FORGED,
        "it removes a node of the session's chain: the overlay, the original under it, or the "
        "node commit merges into",
        ("node-name",),
        operation=Operation.DISK_REMOVE,
    ),
    QMPRule(
        ("device_del",),
        Scope.FORGED,
        "unplugging a forged disk orphans its overlay; commit and discard need the device",
        ("id",),
        operation=Operation.DISK_REMOVE,
    ),
    QMPRule(
        ("device_add",),
        Scope.PRESENT,
        "a disk added now is not in the session: discard restarts QEMU with the disks of enable "
        "(without it) and does not revert its writes",
        ("drive",),
        operation=Operation.DISK_ADD,
    ),
    QMPRule(
        ("blockdev-add",),
        Scope.FORGED,
        "a node on a forged node or image holds it (commit could not remove the overlay) or "
        "opens the original behind the session's back",
        (ALL_ARGUMENTS,),
    ),
    QMPRule(
        ("blockdev-reopen", "x-blockdev-reopen"),
        Scope.FORGED,
        "reopening a forged node can change its backing chain or make the original writable",
        ("options",),
    ),
    QMPRule(
        ("x-blockdev-change",),
        Scope.FORGED,
        "it changes the children of a forged node",
        ("parent", "child", "node"),
    ),
    QMPRule(
        ("blockdev-create", "x-blockdev-create"),
        Scope.FORGED,
        "it would format an image over a forged node or file",
        ("options",),
    ),
    QMPRule(
        ("blockdev-amend", "x-blockdev-amend"),
        Scope.FORGED,
        "it changes a forged image's options under the session",
        ("node-name",),
    ),
    QMPRule(
        ("blockdev-snapshot-sync", "blockdev-snapshot"),
        Scope.FORGED,
        "another overlay on a forged disk takes it off the session's chain: commit would merge "
        "the wrong layer",
        ("device", "node-name", "node", "snapshot-file", "overlay"),
    ),
    QMPRule(
        ("blockdev-snapshot-internal-sync", "blockdev-snapshot-delete-internal-sync"),
        Scope.FORGED,
        "it writes an internal snapshot into a forged disk's image",
        ("device",),
    ),
    QMPRule(
        ("drive-backup", "blockdev-backup"),
        Scope.FORGED,
        "a backup copies a trial state that may be discarded, and its job holds the forged node "
        "commit must remove; back up after the session",
        ("device", "target"),
        operation=Operation.BACKUP,
    ),
    QMPRule(
        ("drive-mirror", "blockdev-mirror"),
        Scope.FORGED,
        "a mirror can pivot a forged disk off its overlay, and its job holds the forged node",
        ("device", "target", "replaces"),
    ),
    QMPRule(
        ("block-stream",),
        Scope.FORGED,
        "streaming copies the original into the overlay or drops it from the chain",
        ("device", "base", "base-node", "bottom"),
    ),
    QMPRule(
        ("block-commit",),
        Scope.FORGED,
        "a commit outside forgeqmp merges an overlay without the session knowing; use "
        "'forgeqmp commit'",
        ("device", "top", "base", "top-node", "base-node"),
    ),
    QMPRule(
        ("block-export-add", "nbd-server-add"),
        Scope.FORGED,
        "an export holds the forged node (commit could not remove the overlay) and lets others "
        "write into it",
        ("node-name", "device"),
    ),
    QMPRule(
        (
            "job-cancel",
            "job-complete",
            "job-finalize",
            "job-dismiss",
            "job-pause",
            "block-job-cancel",
            "block-job-complete",
            "block-job-finalize",
            "block-job-dismiss",
            "block-job-pause",
        ),
        Scope.FORGED,
        "the job belongs to forgeqmp's enable or commit: touching it makes that fail or pivots a "
        "disk behind the session's back",
        ("id", "device"),
        states=_JOB_STATES,
    ),
    QMPRule(
        ("blockdev-change-medium", "change", "blockdev-insert-medium", "blockdev-close-tray"),
        Scope.ANY,
        "discard restarts QEMU with the media of enable, so a medium change would be silently "
        "undone",
        operation=Operation.ISO_MOUNT,
    ),
    QMPRule(
        ("eject", "blockdev-open-tray", "blockdev-remove-medium"),
        Scope.ANY,
        "discard restarts QEMU with the media of enable, so a medium change would be silently "
        "undone",
        operation=Operation.ISO_UNMOUNT,
    ),
    QMPRule(
        ("migrate",),
        Scope.ANY,
        "the overlays, the memory file and the session record stay with this QEMU; during enable "
        "or discard the migration stream is forgeqmp's",
        operation=Operation.MIGRATE,
    ),
    QMPRule(
        ("migrate-incoming",),
        Scope.ANY,
        "loading another state would replace the guest the session's memory state and overlays "
        "belong to",
        operation=Operation.MIGRATE,
    ),
    QMPRule(
        (
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
        ),
        Scope.ANY,
        "forgeqmp is saving or loading the memory state over the migration stream: changing or "
        "cancelling it makes enable or discard fail",
        states=frozenset({State.CREATING, State.DISCARDING}),
    ),
    QMPRule(
        ("snapshot-save", "snapshot-load", "snapshot-delete"),
        Scope.ANY,
        "internal VM snapshots write a memory state into the disks' images, and loading one "
        "replaces the guest's memory and disks under the session",
        operation=Operation.IMAGE_CREATE,
    ),
    QMPRule(
        ("set_link",),
        Scope.ANY,
        "discard restores the device state saved at enable, so the link would silently flip back",
        operation=Operation.PUBLIC_INTERFACE,
    ),
    QMPRule(
        ("quit", "system_powerdown"),
        Scope.ANY,
        "QEMU would exit in the middle of forgeqmp's enable, commit or discard (an active "
        "session survives QEMU stopping: quit is allowed then)",
        states=_WORKING,
    ),
    QMPRule(
        ("qemu-io",),
        Scope.FORGED,
        "it writes into a forged disk's image from outside the guest (HMP only)",
        (ALL_ARGUMENTS,),
    ),
)

_BY_COMMAND: Mapping[str, QMPRule] = types.MappingProxyType(
    {command: rule for rule in QMP_RULES for command in rule.commands}
)
assert len(_BY_COMMAND) == sum(len(rule.commands) for rule in QMP_RULES), "a command listed twice"

#: HMP commands (``human-monitor-command``'s ``command-line``) checked as their QMP equivalent.
HMP_EQUIVALENTS: Mapping[str, str] = types.MappingProxyType(
    {
        "block_resize": "block_resize",
        "drive_del": "blockdev-del",
        "device_del": "device_del",
        "device_add": "device_add",
        "snapshot_blkdev": "blockdev-snapshot-sync",
        "snapshot_blkdev_internal": "blockdev-snapshot-internal-sync",
        "snapshot_delete_blkdev_internal": "blockdev-snapshot-delete-internal-sync",
        "drive_backup": "drive-backup",
        "drive_mirror": "drive-mirror",
        "block_stream": "block-stream",
        "commit": "block-commit",
        "nbd_server_add": "nbd-server-add",
        "block_job_cancel": "block-job-cancel",
        "block_job_complete": "block-job-complete",
        "block_job_pause": "block-job-pause",
        "change": "change",
        "eject": "eject",
        "migrate": "migrate",
        "migrate_incoming": "migrate-incoming",
        "migrate_cancel": "migrate_cancel",
        "migrate_continue": "migrate-continue",
        "migrate_pause": "migrate-pause",
        "migrate_recover": "migrate-recover",
        "migrate_start_postcopy": "migrate-start-postcopy",
        "migrate_set_capability": "migrate-set-capabilities",
        "migrate_set_parameter": "migrate-set-parameters",
        "savevm": "snapshot-save",
        "loadvm": "snapshot-load",
        "delvm": "snapshot-delete",
        "set_link": "set_link",
        "quit": "quit",
        "q": "quit",
        "system_powerdown": "system_powerdown",
        "qemu-io": "qemu-io",
    }
)
assert set(HMP_EQUIVALENTS.values()) <= set(_BY_COMMAND)


def qmp_rule(command: str) -> QMPRule | None:
    """The rule that lists ``command``, or None (a command no session refuses)."""
    return _BY_COMMAND.get(command)


def may_refuse(command: str, arguments: Mapping[str, Any] | None = None) -> bool:
    """Whether some unfinished session could make :func:`check_qmp_command` refuse ``command``
    (a listed command, a ``transaction`` with a listed action, an HMP line with an equivalent).
    The others never need the session record."""
    args: Mapping[str, Any] = arguments or {}
    if command == "transaction":
        actions = args.get("actions") or ()
        return any(isinstance(a, Mapping) and may_refuse(str(a.get("type")), None) for a in actions)
    if command == "human-monitor-command":
        line = args.get("command-line")
        return _parse_hmp(line if isinstance(line, str) else "")[0] in HMP_EQUIVALENTS
    return command in _BY_COMMAND


@attrs.frozen
class _Forged:
    """Everything of a session a command may name, each mapped to what it is (for messages)."""

    names: Mapping[str, str]
    files: Mapping[str, str]
    job_prefixes: Mapping[str, str]
    cwd: str

    def match(self, value: str) -> str | None:
        if value in self.names:
            return self.names[value]
        for prefix, what in self.job_prefixes.items():
            if value.startswith(prefix):
                return what
        path = value.removeprefix("file:")
        if path and not path.startswith("json:"):
            return self.files.get(os.path.normpath(os.path.join(self.cwd, path)))
        return None


def _qdev_ancestors(qdev: str) -> Iterator[str]:
    """A device's QOM path and its parents up to the device itself (``/machine/peripheral/ID``)."""
    parts = qdev.rstrip("/").split("/")
    for end in range(len(parts), 3, -1):
        yield "/".join(parts[:end])


def _forged(record: SessionRecord, block_nodes: Sequence[Mapping[str, Any]] | None) -> _Forged:
    names: dict[str, str] = {}
    files: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    for disk in record.disks:
        d = f"disk {disk.name!r}"
        files[os.path.normpath(disk.base_file)] = f"{d}'s original image {disk.base_file}"
        if disk.overlay_file is not None:
            files[os.path.normpath(disk.overlay_file)] = f"{d}'s overlay {disk.overlay_file}"
        for qdev in _qdev_ancestors(disk.qdev):
            names.setdefault(qdev, f"{d}'s device {qdev}")
        names[disk.name] = f"{d}'s device"
        names[disk.device_node] = f"{d}'s original node {disk.device_node!r}"
        if disk.overlay_file_node is not None:
            names[disk.overlay_file_node] = f"{d}'s overlay file node {disk.overlay_file_node!r}"
        if disk.overlay_node is not None:
            names[disk.overlay_node] = f"{d}'s overlay node {disk.overlay_node!r}"
            # forgeqmp's jobs for this disk are named after its overlay ("<tag>-<i>-commit"...).
            prefix = qemu_names.commit_job(disk.overlay_node).removesuffix("commit")
            prefixes[prefix] = f"forgeqmp's job for {d}"
    if record.memory is not None:
        files[os.path.normpath(record.memory.path)] = f"the memory file {record.memory.path}"
    # The graph knows nodes the record does not name: the original's protocol node, implicit
    # nodes. Any node whose file is one of the session's files is the session's.
    for node in block_nodes or ():
        name, filename = node.get("node-name"), node.get("file")
        if isinstance(name, str) and isinstance(filename, str) and name not in names:
            what = files.get(os.path.normpath(filename))
            if what is not None:
                names[name] = f"node {name!r} of {what}"
    return _Forged(names, files, prefixes, record.qemu.cwd)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _hits(
    rule: QMPRule, arguments: Mapping[str, Any], forged: _Forged, *, everything: bool
) -> list[str]:
    if everything or rule.arguments == (ALL_ARGUMENTS,):
        values: list[object] = [arguments]
    else:
        values = [arguments[key] for key in rule.arguments if key in arguments]
    found: list[str] = []
    for text in (s for v in values for s in _strings(v)):
        what = forged.match(text)
        if what is not None and what not in found:
            found.append(what)
    return found


def _parse_hmp(command_line: str) -> tuple[str, dict[str, Any]]:
    """An HMP command line as (command, arguments): ``key=value`` pairs by key, the other words
    as ``arg0``, ``arg1``..."""
    try:
        words = shlex.split(command_line)
    except ValueError:
        words = command_line.split()
    if not words:
        return "", {}
    arguments: dict[str, Any] = {}
    for i, word in enumerate(words[1:]):
        arguments[f"arg{i}"] = word
        for pair in word.split(","):
            key, sep, value = pair.partition("=")
            if sep:
                arguments[key] = value
    return words[0], arguments


def check_qmp_command(
    record: SessionRecord | None,
    command: str,
    arguments: Mapping[str, Any] | None = None,
    *,
    block_nodes: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Refuse the QMP ``command`` if it would break the unfinished session ``record``.

    ``block_nodes`` (optional) is QEMU's ``query-named-block-nodes``: with it, nodes the record
    does not name (the original image's protocol node, implicit nodes) are recognised by their
    file. ``transaction`` is checked action by action, ``human-monitor-command`` as the QMP
    command its command line stands for (:data:`HMP_EQUIVALENTS`).

    :raises OperationBlocked: with the rule's reason, what the command named, and how to finish
        the session. No session, a finished one, or a command no rule lists: nothing raised.
    """
    if record is None or _status(record).finished:
        return
    args: Mapping[str, Any] = arguments or {}
    if command == "transaction":
        for action in args.get("actions") or ():
            if isinstance(action, Mapping) and isinstance(action.get("type"), str):
                data = action.get("data")
                check_qmp_command(
                    record,
                    action["type"],
                    data if isinstance(data, Mapping) else {},
                    block_nodes=block_nodes,
                )
        return
    shown, hmp_line = command, False
    if command == "human-monitor-command":
        line = args.get("command-line")
        hmp, args = _parse_hmp(line if isinstance(line, str) else "")
        if hmp not in HMP_EQUIVALENTS:
            return
        command, shown, hmp_line = HMP_EQUIVALENTS[hmp], f"HMP {hmp!r}", True
        if hmp == "commit" and args.get("arg0") == "all":
            args = {"device": [d.device_node for d in record.disks]}
    rule = qmp_rule(command)
    if rule is None or record.state not in rule.states:
        return
    detail = ""
    if rule.scope is Scope.PRESENT:
        present = [key for key in rule.arguments if key in args]
        if not present:
            return
        detail = f" (with {', '.join(present)})"
    elif rule.scope is Scope.FORGED:
        # HMP arguments are mostly positional: every word of the line is looked at.
        hits = _hits(rule, args, _forged(record, block_nodes), everything=hmp_line)
        if not hits:
            return
        detail = f" (it names {'; '.join(hits)})"
    raise _blocked(f"QMP command {shown}{detail}", record, rule.reason, operation=command)


# --- documentation ------------------------------------------------------------------------------


def render_markdown() -> str:
    """The guard's data as the Markdown tables of ``docs/guard.md`` (a test keeps them equal)."""
    lines = [
        "| operation | while a session is unfinished | why |",
        "|---|---|---|",
    ]
    for op, why in BLOCKED_OPERATIONS.items():
        lines.append(f"| `{op.value}` | blocked | {why} |")
    for op, why in ALWAYS_ALLOWED.items():
        lines.append(f"| `{op.value}` | allowed | {why} |")
    lines += [
        "",
        "| QMP commands | refused when | in states | why |",
        "|---|---|---|---|",
    ]
    for rule in QMP_RULES:
        commands = ", ".join(f"`{c}`" for c in rule.commands)
        lines.append(f"| {commands} | {rule.when()} | {rule.during()} | {rule.reason} |")
    lines += [
        "",
        "| HMP command | checked as |",
        "|---|---|",
    ]
    for hmp, command in HMP_EQUIVALENTS.items():
        lines.append(f"| `{hmp}` | `{command}` |")
    return "\n".join(lines) + "\n"
