"""The steps of each operation, as one typed enum per operation (sans-IO).

A session record's ``step`` says how far the last operation got; the crash points of the fault
tests (:mod:`forgeqmp.adapters.crashpoints`) are named after the same steps; recover
(:mod:`forgeqmp.core.reconcile`) decides from them what is left to undo or finish. All three use
the members defined here, never string literals.

Each enum lists its operation's steps in the order the operation reaches them (that order is the
order of the crash points). Not every step is written to the record: some are crash points only
(for example :attr:`EnableStep.PRE_SWITCHOVER`, reached while the guest is paused and nothing may
be written). The values are the names used in the record's JSON, in logs and in
``FORGEQMP_TEST_CRASH_AT`` (``commit:disk-recorded``): they never change, so records written
before this module existed still load.

Two record steps are not steps of an operation's sequence: :class:`Pivoting` (``pivoting:<disk>``,
a commit's guest paused by forgeqmp while ``disk`` switches back to its original) and
:attr:`RecoverStep.FORGE_BYPASSED` (the mark recover leaves when the VM ran on its original
disks since enable).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from forgeqmp.errors import InvalidArgument

__all__ = [
    "OPERATION_STEPS",
    "CommitStep",
    "DiscardStep",
    "EnableStep",
    "Pivoting",
    "RecoverStep",
    "Step",
    "ThrottleStep",
    "parse_step",
]


class EnableStep(enum.StrEnum):
    """The steps of enable, in order."""

    #: CREATING recorded; nothing changed yet.
    PLANNED = "planned"
    #: Overlay files and nodes exist; not attached.
    OVERLAYS_CREATED = "overlays-created"
    #: Memory file passed to QEMU, migration settings changed.
    MIGRATION_STARTED = "migration-started"
    #: The guest is paused by the migration; disks not snapshotted (crash point only).
    PRE_SWITCHOVER = "pre-switchover"
    #: Disks on the overlays; guest paused; memory not complete (crash point only).
    SNAPSHOT_TRANSACTION_DONE = "snapshot-transaction-done"
    #: Memory saved, guest running; digest not recorded yet.
    SNAPSHOT_DONE = "snapshot-done"
    #: ACTIVE recorded.
    ACTIVE = "active"


class CommitStep(enum.StrEnum):
    """The steps of commit, in order (per disk from ``DISK_MARKED`` to ``DISK_MERGED``)."""

    #: COMMITTING recorded; nothing merged.
    COMMITTING = "committing"
    #: A disk recorded merged (point of no return); job not started (crash point only).
    DISK_MARKED = "disk-marked"
    #: block-commit running (crash point only).
    JOB_STARTED = "job-started"
    #: Job ready (overlay and original in sync); not completed (crash point only).
    JOB_READY = "job-ready"
    #: Guest paused by us for the completion (crash point; the record says :class:`Pivoting`).
    PIVOTING = "pivoting"
    #: The disk is on its original again; not recorded yet (crash point only).
    PIVOTED = "pivoted"
    #: Recorded on its original (step committing); guest still paused by us (crash point only).
    DISK_RECORDED = "disk-recorded"
    #: Recorded, overlay removed, guest running (crash point only).
    DISK_MERGED = "disk-merged"
    #: COMMITTED recorded.
    COMMITTED = "committed"


class ThrottleStep(enum.StrEnum):
    """The steps a commit takes, per disk, only when that disk's merge does not converge and the
    guest's writes are bounded (:mod:`forgeqmp.core.plans.converge`), in order. Crash points of
    ``commit`` (``commit:throttle-recorded``), not in :data:`OPERATION_STEPS` (a commit of a
    guest that does not outwrite the copy never reaches them); the record says them with the
    disk's ``throttle`` field."""

    #: The platform's throttle recorded on the disk; forgeqmp's not applied yet.
    RECORDED = "throttle-recorded"
    #: forgeqmp's bound applied to the guest's writes.
    APPLIED = "throttle-applied"
    #: The platform's throttle set back; the record still names it.
    RESTORED = "throttle-restored"


class DiscardStep(enum.StrEnum):
    """The steps of discard, in order."""

    #: DISCARDING recorded; QEMU still runs on the overlays.
    STOPPING_QEMU = "stopping-qemu"
    #: The old QEMU is gone.
    QEMU_STOPPED = "qemu-stopped"
    #: A new QEMU waits for the memory state (crash point only).
    QEMU_LAUNCHED = "qemu-launched"
    #: Memory state loaded, guest not resumed (crash point only).
    MEMORY_LOADED = "memory-loaded"
    #: Guest resumed from the memory state; the restore's fdset and migration settings not yet
    #: given back (crash point only).
    RESUMED = "resumed"
    #: DISCARDED recorded.
    DISCARDED = "discarded"


class RecoverStep(enum.StrEnum):
    """The record steps only recover writes."""

    #: The forge was bypassed (the VM ran on its original disks since enable, e.g. QEMU restarted
    #: with its original command line): the originals may have changed, so the memory state saved
    #: at enable no longer matches them and discard stays refused for the rest of the session.
    FORGE_BYPASSED = "forge-bypassed"


_PIVOTING_PREFIX: Final = CommitStep.PIVOTING.value + ":"


class Pivoting(str):
    """The record step ``pivoting:<disk>``: a commit paused the guest to switch ``disk`` back to
    its original, so a guest found paused then was paused by forgeqmp (recover resumes it).

    A string (``"pivoting:<disk>"``, as the record's JSON spells it), like the enums' members, so
    a record's step is always text too; two are equal when they name the same disk.
    """

    __slots__ = ()

    def __new__(cls, disk: str) -> Pivoting:
        if not isinstance(disk, str) or not disk or "\0" in disk:
            raise InvalidArgument(f"a pivoting step names a disk, not {disk!r}")
        return super().__new__(cls, _PIVOTING_PREFIX + disk)

    @property
    def disk(self) -> str:
        """The disk being switched back to its original."""
        return str.__str__(self)[len(_PIVOTING_PREFIX) :]

    @property
    def value(self) -> str:
        """The step as the record's JSON spells it (as an enum member's ``value``)."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Pivoting({self.disk!r})"


#: A step as the session record holds it.
Step = EnableStep | CommitStep | DiscardStep | RecoverStep | Pivoting

#: The steps of each operation with crash points, by the operation's name.
OPERATION_STEPS: Final[Mapping[str, type[EnableStep | CommitStep | DiscardStep]]] = (
    MappingProxyType({"enable": EnableStep, "commit": CommitStep, "discard": DiscardStep})
)

_BY_VALUE: Final[Mapping[str, Step]] = MappingProxyType(
    {
        member.value: member
        for enum_type in (EnableStep, CommitStep, DiscardStep, RecoverStep)
        for member in enum_type
    }
)
assert len(_BY_VALUE) == sum(len(e) for e in (EnableStep, CommitStep, DiscardStep, RecoverStep))


def parse_step(text: str) -> Step:
    """The step a record's JSON names (``"overlays-created"``, ``"pivoting:vda"``...).

    Raises :class:`InvalidArgument` for a name that is no step of forgeqmp's.
    """
    if isinstance(text, str):
        found = _BY_VALUE.get(text)
        if found is not None:
            return found
        if text.startswith(_PIVOTING_PREFIX) and len(text) > len(_PIVOTING_PREFIX):
            return Pivoting(text[len(_PIVOTING_PREFIX) :])
    raise InvalidArgument(
        f"{text!r} is not a step of forgeqmp's: one of {', '.join(_BY_VALUE)} or "
        f"'{_PIVOTING_PREFIX}<disk>'"
    )
