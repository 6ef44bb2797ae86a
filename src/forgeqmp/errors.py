"""The one exception hierarchy of forgeqmp.

Every error forgeqmp raises is a :class:`ForgeError`. The subclasses are the ones a caller can act on,
and each maps to one of the CLI's exit codes (``exit_code``), so the CLI never guesses:

- :class:`InvalidArgument` (2): the caller asked for something that does not exist or makes no sense
  (an unknown disk, a bad timeout, an unknown operation). Nothing was changed.
- :class:`PrerequisiteError` (3) and its kinds, and :class:`OperationBlocked` (3): the request is valid
  but the instance is not in a state that allows it. Nothing was changed.
- :class:`ForgeFailed` (4): the operation started and failed; the session record says what state it
  left and what to do next.
- :class:`QEMUUnreachable` (5): nothing that speaks QMP answers on the socket.
- :class:`QMPError` (4): QEMU answered a command with an error, the connection dropped, or a deadline
  passed while waiting for QEMU.
- :class:`RecordUnreadable` and :class:`UnsafeStateDir` (3): the session record cannot be read, or
  the state dir is unsafe (a symlink, another owner, writable by others...): refused before
  anything changed. Any other :class:`RecordError` (a record that cannot be written during an
  operation) is a failure (4).

Every message says what happened and what to do next. Every class also has a stable
``error_kind`` (``forge-failed``, ``qemu-unreachable``...): the CLI's ``--json`` final object of a
failed or refused command carries it, so scripts never parse messages (docs/troubleshooting.md
lists them). :func:`leaf_errors` and :func:`describe_cause` turn what a task group raised (an
``ExceptionGroup``) into the inner errors and their messages.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

__all__ = [
    "INTERNAL_ERROR_KIND",
    "DiskNotForgeable",
    "FeatureMissing",
    "ForgeError",
    "ForgeFailed",
    "IllegalTransition",
    "InstanceLocked",
    "InsufficientSpace",
    "InvalidArgument",
    "MigrationBlocked",
    "NoDiskSelected",
    "NoSession",
    "NotQMP",
    "OperationBlocked",
    "PrerequisiteError",
    "QEMUUnreachable",
    "QMPCommandError",
    "QMPDisconnected",
    "QMPError",
    "QMPTimeout",
    "RecordError",
    "RecordUnreadable",
    "SessionActive",
    "TaskRunning",
    "UnknownDisk",
    "UnsafeStateDir",
    "VMNotRunning",
    "describe_cause",
    "error_kind",
    "leaf_errors",
]

#: The ``error_kind`` of an exception that is not a :class:`ForgeError` (a bug in forgeqmp, or
#: something it did not foresee): the CLI reports it as a failure (exit 4) with its message.
INTERNAL_ERROR_KIND = "internal-error"


def _kebab(name: str) -> str:
    """``QEMUUnreachable`` → ``qemu-unreachable``, ``NotQMP`` → ``not-qmp``."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z]|$)|[A-Z][a-z0-9]*|[a-z0-9]+", name)
    return "-".join(w.lower() for w in words)


class ForgeError(Exception):
    """Base class of every error raised by forgeqmp."""

    #: The CLI exit code for this kind of error (see the CLI contract).
    exit_code: ClassVar[int] = 4
    #: A stable name of the class for scripts (the CLI's ``error_kind``): the class name in
    #: kebab case, set once per class here, never renamed (tests pin the whole list).
    error_kind: ClassVar[str] = "forge-error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "error_kind" not in cls.__dict__:
            cls.error_kind = _kebab(cls.__name__)


# --- 2: invalid argument -------------------------------------------------------------------------


class InvalidArgument(ForgeError, ValueError):
    """The request names something that does not exist or is not a valid value. Nothing changed."""

    exit_code = 2


class UnknownDisk(InvalidArgument):
    """A disk name matches no disk device of the VM (by qdev id, qdev path or node-name)."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        listing = ", ".join(known) if known else "none"
        super().__init__(
            f"no disk named {name!r} on this VM; disks it has (qdev id or node-name): {listing}"
        )


# --- 3: refused by a prerequisite or the guard ---------------------------------------------------


class PrerequisiteError(ForgeError):
    """The VM or the instance is not in a state that allows the request. Nothing changed."""

    exit_code = 3


class VMNotRunning(PrerequisiteError):
    """The guest is not running (paused, suspended, migrating, shut down...)."""

    def __init__(self, status: str) -> None:
        self.status = status
        hints = {
            "paused": "resume it (QMP 'cont') first",
            "suspended": "wake the guest up (QMP 'system_wakeup') first",
            "inmigrate": "wait for the incoming migration to finish",
            "postmigrate": "the VM was migrated away; forge the destination instead",
            "finish-migrate": "a migration is finishing; wait for it",
        }
        hint = hints.get(status, "start or resume the VM first")
        super().__init__(f"the VM is not running (QEMU runstate {status!r}): {hint}")


class TaskRunning(PrerequisiteError):
    """Another task (block job, migration) is running on the instance."""


class InstanceLocked(TaskRunning):
    """Another forgeqmp controller holds this instance's lock."""

    def __init__(self, lock_path: str, holder: str | None = None) -> None:
        self.lock_path = lock_path
        self.holder = holder
        who = f" (held by {holder})" if holder else ""
        super().__init__(
            f"another forgeqmp process is working on this instance{who}; wait for it to finish "
            f"(lock: {lock_path})"
        )


class SessionActive(PrerequisiteError):
    """An unfinished forge session exists for this instance."""


class NoSession(PrerequisiteError):
    """There is no session to act on (commit, discard...)."""


class NoDiskSelected(PrerequisiteError):
    """The selection resolved to no disk (the VM has no writable disk, or an empty list was given)."""


class DiskNotForgeable(PrerequisiteError):
    """A selected disk cannot be forged: a CD-ROM, read-only, empty, or already in a job."""


class FeatureMissing(PrerequisiteError):
    """The QEMU behind the socket lacks a feature the chosen path needs."""


class InsufficientSpace(PrerequisiteError):
    """A file system lacks room for what enable would write there (the memory file, overlays)."""


class MigrationBlocked(PrerequisiteError):
    """QEMU reports migration blockers (a device or option that forbids saving the VM's state);
    ``reasons`` are QEMU's own words."""

    def __init__(self, message: str, reasons: tuple[str, ...] = ()) -> None:
        self.reasons = reasons
        super().__init__(message)


class NotRelaunchable(PrerequisiteError):
    """QEMU's command line cannot be started again by forgeqmp (inherited fds, fd sets, stdio:
    :mod:`forgeqmp.core.relaunch`) and no launcher is configured, so a discard could not bring the VM
    back. ``findings`` holds the :class:`forgeqmp.core.relaunch.Finding` of each argument."""

    def __init__(self, message: str, findings: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.findings = findings


class OperationBlocked(ForgeError):
    """A platform operation (or a QMP command) is refused while a forge session is unfinished.

    ``operation`` is what was refused, ``session_id`` and ``state`` the session it waits on (None
    when the record cannot be read), ``next_step`` how to finish that session.
    """

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        session_id: str | None = None,
        state: str | None = None,
        next_step: str | None = None,
    ) -> None:
        self.operation = operation
        self.session_id = session_id
        self.state = state
        self.next_step = next_step
        super().__init__(message)


# --- 4: the operation failed ---------------------------------------------------------------------


class ForgeFailed(ForgeError):
    """The operation started and failed; ``status`` tells what state it left and what to do next."""


class RecordError(ForgeError):
    """A session record on disk is unreadable, corrupted, or unsafe (e.g. a symlink), or it could
    not be written. The subclasses :class:`RecordUnreadable` and :class:`UnsafeStateDir` are the
    refusals (exit 3: nothing changed); a plain RecordError is a failure (exit 4)."""


class RecordUnreadable(RecordError):
    """The session record cannot be read or is not a valid record (damaged, hand-edited, from
    another format version, not a regular file). Refused before anything changed."""

    exit_code = 3


class UnsafeStateDir(RecordError):
    """The state dir cannot be used safely: a symlink, not a directory, owned by another user,
    writable by others, or it cannot be opened or created; or a file in it is a symlink or not a
    regular file. Refused before anything changed."""

    exit_code = 3


# --- QMP -----------------------------------------------------------------------------------------


class QMPError(ForgeError):
    """Base class of errors talking QMP to QEMU."""


class QMPCommandError(QMPError):
    """QEMU answered a command with an error; the QMP error class and description are kept."""

    def __init__(
        self, command: str, error_class: str, desc: str, arguments: dict[str, Any] | None = None
    ) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        self.arguments = arguments
        super().__init__(f"QEMU refused {command!r}: {error_class}: {desc}")


class QMPDisconnected(QMPError):
    """The QMP connection dropped (QEMU exited or closed the socket)."""


class QMPTimeout(QMPError):
    """A deadline passed while waiting for QEMU (a reply or an event)."""


class QEMUUnreachable(QMPError):
    """Nothing answers QMP on the socket: missing, not a socket, refused, or silent."""

    exit_code = 5

    def __init__(self, socket_path: str, reason: str) -> None:
        self.socket_path = socket_path
        self.reason = reason
        super().__init__(
            f"cannot reach QEMU's QMP on {socket_path}: {reason}; check that QEMU is running with "
            f"-qmp unix:{socket_path},server=on,wait=off and that you may open the socket"
        )


class NotQMP(QEMUUnreachable):
    """Something answers on the socket, but it does not speak QMP."""


class IllegalTransition(ForgeError):
    """A state change the transition table does not allow; a bug or a hand-edited record."""


# --- what a task group raised --------------------------------------------------------------------


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``: an ``ExceptionGroup`` (what an anyio task group raises) is
    opened down to its innermost exceptions, in order; anything else is itself.

    Cancellations that only accompany a real error (anyio cancels the other tasks of a group when
    one fails) are left out when there is a real error.
    """
    if isinstance(exc, BaseExceptionGroup):
        leaves = [leaf for inner in exc.exceptions for leaf in leaf_errors(inner)]
        real: list[BaseException] = [leaf for leaf in leaves if isinstance(leaf, Exception)]
        return real or leaves
    return [exc]


def describe_cause(exc: BaseException) -> str:
    """What went wrong, for a record's ``error`` and the CLI: the message of each inner error
    (never "unhandled errors in a TaskGroup"), prefixed by its class for errors that are not
    forgeqmp's own (``OSError: [Errno 28] No space left on device``)."""
    parts: list[str] = []
    for leaf in leaf_errors(exc):
        if isinstance(leaf, TimeoutError):
            text = "a deadline passed"
        elif isinstance(leaf, ForgeError):
            text = str(leaf) or type(leaf).__name__
        else:
            text = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
        if text not in parts:
            parts.append(text)
    return "; ".join(parts)


def error_kind(exc: BaseException) -> str:
    """The stable ``error_kind`` of ``exc``: its class's for a :class:`ForgeError` (the first
    inner one of a group), else :data:`INTERNAL_ERROR_KIND`."""
    for leaf in leaf_errors(exc):
        if isinstance(leaf, ForgeError):
            return leaf.error_kind
    return INTERNAL_ERROR_KIND
