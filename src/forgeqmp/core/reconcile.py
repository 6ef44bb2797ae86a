"""Recover: what is true after a crash, and what to do about it (sans-IO).

A forge session's record is written before every irreversible step, but a crash of the
controlling process (or of QEMU) can stop an operation anywhere between two records. ``recover``
looks at what is really there and makes the record say it:

- :class:`Observation`: what the driver saw, as plain values: the QEMU answering on the socket
  (its pid, runstate, which node each forged device is attached to, the named nodes, the block jobs,
  the migration, our fdsets and migration settings) or none, and which of the session's files
  exist, with their sizes.
- :func:`reconcile`: a pure function of the record and an observation returning a
  :class:`RecoveryPlan`: the true state to reach (one of the ``RECOVERED_*`` events of
  :mod:`forgeqmp.core.states`), the record as it must read once the plan's actions are done, the actions
  themselves, what was found, and the safe next step.

The rules, in one sentence each:

- recover never starts new work for the user: it finishes what QEMU was already doing past a
  point of no return (a block-commit job), undoes what never got there (an interrupted enable), and
  finishes a discard once the old QEMU is gone (its running state is lost anyway);
- the QEMU that answers tells the truth about the disks (which node, which file is attached); when
  none answers, the record's step and the files on disk tell it;
- it only ever deletes files the record names (overlays, the memory file), and an overlay only
  once its data is in the original or the session was discarded;
- it sets back the platform's I/O throttle of a disk whose guest writes a killed commit bounded
  (the disk's recorded ``throttle``), once the merge it was bounding for is finished;
- it leaves the guest running as it was before the operation, whatever instant the operation was
  killed at: it resumes a guest the recorded QEMU holds while the record says forgeqmp paused it
  (``paused_by_forgeqmp``, written before each pause), and leaves any other pause as it is, saying
  in the record's warnings who paused the guest and what to do;
- applied to its own result it plans nothing: recover is idempotent.

The driver (:mod:`forgeqmp.ops.recover`) observes, runs the actions, saves the record and
observes again until the plan is empty.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, Final

import attrs

from forgeqmp.core import names
from forgeqmp.core.argv import cold_argv
from forgeqmp.core.lifecycle import advance
from forgeqmp.core.names import session_tag
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.common import close_fd, remove_fdset
from forgeqmp.core.plans.converge import set_throttle
from forgeqmp.core.plans.discard import (
    DEFAULT_MULTIFD_CHANNELS,
    RESTORE_CAPABILITIES,
    RESTORE_MULTIFD_CHANNELS,
)
from forgeqmp.core.plans.enable import DOWNTIME_LIMIT_MS, MAX_BANDWIDTH
from forgeqmp.core.plans.recover import Order, remove_node, reset_migration
from forgeqmp.core.record import DiskRecord, SessionRecord
from forgeqmp.core.states import TERMINAL, WORKING_OPERATION, Event, State, next_state
from forgeqmp.core.steps import CommitStep, DiscardStep, EnableStep, Pivoting, RecoverStep

__all__ = [
    "ENABLE_STEPS_AFTER_SNAPSHOT",
    "MIGRATION_RUNNING",
    "Action",
    "CancelMigration",
    "CloseFd",
    "CommitBack",
    "CommitOffline",
    "DeleteFile",
    "DeviceView",
    "DropJob",
    "FinishDiscard",
    "FinishJob",
    "HashMemory",
    "JobView",
    "Observation",
    "QemuView",
    "RecoveryPlan",
    "RemoveFdset",
    "RemoveNode",
    "ResetMigration",
    "RestoreThrottle",
    "ResumeGuest",
    "Where",
    "reconcile",
    "stale_reason",
]

#: Migration statuses of a migration still under way.
MIGRATION_RUNNING: Final = frozenset(
    {
        "setup",
        "active",
        "pre-switchover",
        "device",
        "cancelling",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "postcopy-recover-setup",
        "wait-unplug",
        "colo",
    }
)
#: Enable steps recorded after which the snapshot transaction may have run (an overlay may hold
#: guest writes). Before them, overlays are empty and can simply be removed.
ENABLE_STEPS_AFTER_SNAPSHOT: Final = frozenset(
    {EnableStep.MIGRATION_STARTED, EnableStep.SNAPSHOT_DONE, EnableStep.ACTIVE}
)
#: Runstates in which the guest is held by an operation (ours during an enable or a discard).
_HELD: Final = frozenset({"paused", "postmigrate", "finish-migrate"})
#: Runstates of a QEMU that has not run the guest yet (waiting for or loading a memory state).
_NOT_STARTED: Final = frozenset({"inmigrate", "prelaunch", "restore-vm"})
#: Why a guest stopped that forgeqmp did not pause, and what to do (status shows it).
_PAUSED_BY: Final[Mapping[str, str]] = {
    "io-error": (
        "QEMU paused it after an I/O error (a full or failing disk, often the overlay's file "
        "system): free space, then resume it (QMP cont), or discard"
    ),
    "guest-panicked": "the guest kernel panicked: reset or restart the VM",
    "internal-error": "QEMU hit an internal error: check its log, then reset or restart the VM",
    "shutdown": "the guest shut down (QEMU runs with -no-shutdown): reset or restart it",
    "suspended": "the guest suspended itself (ACPI S3): wake it (QMP system_wakeup)",
    "watchdog": "the guest's watchdog fired: reset or restart the VM",
    "paused": (
        "it was paused by someone else (a QMP stop, or started with -S), not by forgeqmp: "
        "resume it (QMP cont) when it should run"
    ),
    "postmigrate": "a migration not started by forgeqmp paused it: resume it (QMP cont)",
}
#: Migration capabilities enable turns on that would change later migrations if left on
#: ("events" only adds QMP events, and other tools turn it on themselves: left alone).
_RESETTABLE_CAPABILITIES: Final = (
    "pause-before-switchover",
    "background-snapshot",
    "mapped-ram",
    "multifd",
)
#: QEMU's defaults for the migration parameters enable and discard's restore change.
_DEFAULT_PARAMETERS: Final = {
    "downtime-limit": 300,
    "max-bandwidth": 128 << 20,
    "multifd-channels": DEFAULT_MULTIFD_CHANNELS,
}
#: The values enable's save sets.
_OUR_PARAMETERS: Final = {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH}
#: The values discard's restore of a multifd (mapped-ram) file sets.
_RESTORE_PARAMETERS: Final = {"multifd-channels": RESTORE_MULTIFD_CHANNELS}


# --- the observation -----------------------------------------------------------------------------


@attrs.frozen
class DeviceView:
    """What is attached to one disk device: the node and its image file (None: no medium)."""

    node: str | None = None
    file: str | None = None


@attrs.frozen
class JobView:
    """One block job as ``query-jobs`` reports it."""

    id: str
    type: str
    status: str
    error: str | None = None


@attrs.frozen
class QemuView:
    """The QEMU that answered QMP on the instance's socket."""

    pid: int
    runstate: str
    #: qdev path → what is attached to it, for the session's disks (absent: no such device).
    devices: Mapping[str, DeviceView] = attrs.field(factory=dict)
    nodes: frozenset[str] = frozenset()
    jobs: tuple[JobView, ...] = ()
    #: ``query-migrate`` status ("none" when there was none).
    migration: str = "none"
    #: Ids of fdsets whose opaque names this session.
    fdsets: tuple[int, ...] = ()
    capabilities: Mapping[str, bool] = attrs.field(factory=dict)
    parameters: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Observation:
    """Everything recover looked at. ``qemu`` is None when no QEMU runs for the instance (nobody
    listens on the socket and the recorded process is gone); ``files`` maps each file the record
    names (overlays, memory file) that exists to its size in bytes."""

    qemu: QemuView | None
    files: Mapping[str, int] = attrs.field(factory=dict)


class Where(enum.Enum):
    """Where a forged disk's device is, as QEMU reports it."""

    OVERLAY = "overlay"
    BASE = "base"
    OTHER = "other"
    #: No QEMU runs: the record and the files tell.
    UNKNOWN = "unknown"


def where_is(disk: DiskRecord, qemu: QemuView | None) -> Where:
    """Which image ``disk``'s device is attached to now."""
    if qemu is None:
        return Where.UNKNOWN
    dev = qemu.devices.get(disk.qdev)
    if dev is None or dev.node is None:
        return Where.OTHER
    if (disk.overlay_node is not None and dev.node == disk.overlay_node) or (
        disk.overlay_file is not None and dev.file == disk.overlay_file
    ):
        return Where.OVERLAY
    if dev.node == disk.device_node or dev.file == disk.base_file:
        return Where.BASE
    return Where.OTHER


# --- the actions ---------------------------------------------------------------------------------


@attrs.frozen
class CancelMigration:
    """Cancel the memory save an interrupted enable left running (letting go of its pause)."""

    order: ClassVar[Order] = Order.STOP_MIGRATION
    tidying: ClassVar[bool] = False

    def describe(self) -> str:
        return "cancel the interrupted memory save"


@attrs.frozen
class FinishJob:
    """Finish a commit job QEMU is running for us: wait until ready, complete, dismiss."""

    order: ClassVar[Order] = Order.MERGE
    tidying: ClassVar[bool] = False

    job_id: str
    disk: str

    def describe(self) -> str:
        return f"finish the commit job {self.job_id} of disk {self.disk}"


@attrs.frozen
class DropJob:
    """Cancel (unless concluded) and dismiss a job of ours nobody waits for any more."""

    order: ClassVar[Order] = Order.MERGE
    tidying: ClassVar[bool] = False

    job_id: str

    def describe(self) -> str:
        return f"cancel and dismiss the leftover job {self.job_id}"


@attrs.frozen
class CommitBack:
    """Move a disk back onto its original (live): commit its overlay into it, keeping every write
    the guest made on the overlay."""

    order: ClassVar[Order] = Order.MERGE
    tidying: ClassVar[bool] = False

    disk: str
    top_node: str
    base_node: str
    job_id: str

    def describe(self) -> str:
        return f"move disk {self.disk} back onto its original (commit {self.top_node} into it)"


@attrs.frozen
class CommitOffline:
    """``qemu-img commit`` an overlay into its original (QEMU not running)."""

    order: ClassVar[Order] = Order.MERGE
    tidying: ClassVar[bool] = False

    disk: str
    overlay_file: str

    def describe(self) -> str:
        return f"merge {self.overlay_file} into the original of disk {self.disk} (qemu-img commit)"


@attrs.frozen
class RemoveNode:
    """``blockdev-del`` a node of ours nothing uses any more."""

    order: ClassVar[Order] = Order.REMOVE_NODES
    #: QMP only; a failure is logged and does not change the session's state.
    tidying: ClassVar[bool] = True

    node: str

    def describe(self) -> str:
        return f"remove the block node {self.node}"

    def commands(self) -> tuple[Command, ...]:
        """What this action sends."""
        return remove_node(self.node)


@attrs.frozen
class ResumeGuest:
    """``cont`` a guest an interrupted operation of ours left paused."""

    order: ClassVar[Order] = Order.RESUME
    tidying: ClassVar[bool] = False

    def describe(self) -> str:
        return "resume the guest"


@attrs.frozen
class RestoreThrottle:
    """Set a disk's I/O throttle back to the platform's, recorded before a commit bounded the
    guest's writes to it (:mod:`forgeqmp.core.plans.converge`). Runs after the merges, which
    the bound helps converge."""

    order: ClassVar[Order] = Order.RESUME
    tidying: ClassVar[bool] = True

    disk: str
    qdev: str
    limits: tuple[tuple[str, int | str], ...]

    def describe(self) -> str:
        return f"set the I/O throttle of disk {self.disk} back to the platform's"

    def commands(self) -> tuple[Command, ...]:
        """What this action sends."""
        return (set_throttle(self.qdev, dict(self.limits)),)


@attrs.frozen
class ResetMigration:
    """Turn off the migration capabilities and reset the parameters enable set (and nobody
    changed since), so a later migration of the VM behaves as before."""

    order: ClassVar[Order] = Order.TIDY_MIGRATION
    #: QMP only; a failure is logged and does not change the session's state.
    tidying: ClassVar[bool] = True

    capabilities: tuple[str, ...] = ()
    parameters: Mapping[str, int] = attrs.field(factory=dict)

    def describe(self) -> str:
        return "reset the migration settings the interrupted operation changed"

    def commands(self) -> tuple[Command, ...]:
        """What this action sends."""
        return reset_migration(self.capabilities, self.parameters)


@attrs.frozen
class RemoveFdset:
    """``remove-fd`` the fdset holding the memory file open in QEMU."""

    order: ClassVar[Order] = Order.TIDY_MIGRATION
    #: QMP only; a failure is logged and does not change the session's state.
    tidying: ClassVar[bool] = True

    fdset_id: int

    def describe(self) -> str:
        return f"remove fdset {self.fdset_id} (the memory file passed to QEMU)"

    def commands(self) -> tuple[Command, ...]:
        """What this action sends."""
        return (remove_fdset(self.fdset_id),)


@attrs.frozen
class CloseFd:
    """``closefd`` the memory file passed by name (``fd:`` transport); it may be gone already."""

    order: ClassVar[Order] = Order.TIDY_MIGRATION
    #: QMP only; a failure is logged and does not change the session's state.
    tidying: ClassVar[bool] = True

    name: str

    def describe(self) -> str:
        return f"close the file descriptor {self.name} in QEMU, if still open"

    def commands(self) -> tuple[Command, ...]:
        """What this action sends."""
        return (close_fd(self.name),)


@attrs.frozen
class DeleteFile:
    """Delete a file the session created (an overlay or the memory file) that is now useless."""

    order: ClassVar[Order] = Order.DELETE_FILES
    tidying: ClassVar[bool] = False

    path: str
    why: str

    def describe(self) -> str:
        return f"delete {self.path} ({self.why})"


@attrs.frozen
class HashMemory:
    """Record the complete memory file's size and digest (finishes an enable, as enable does:
    the digest of the page cache's bytes, no fsync)."""

    order: ClassVar[Order] = Order.FINGERPRINT
    tidying: ClassVar[bool] = False

    path: str

    def describe(self) -> str:
        return f"verify and fingerprint the memory file {self.path}"


@attrs.frozen
class FinishDiscard:
    """Stop any QEMU that has not run the guest yet, start QEMU on the originals and restore the
    memory state (or cold-start when it cannot be trusted). Always the last action."""

    order: ClassVar[Order] = Order.FINISH_DISCARD
    tidying: ClassVar[bool] = False

    def describe(self) -> str:
        return "finish the discard: start QEMU on the originals from the memory state"


Action = (
    CancelMigration
    | FinishJob
    | DropJob
    | CommitBack
    | CommitOffline
    | RemoveNode
    | ResumeGuest
    | ResetMigration
    | RestoreThrottle
    | RemoveFdset
    | CloseFd
    | DeleteFile
    | HashMemory
    | FinishDiscard
)
# Each action type says when it runs (``order``) and whether it only tidies QEMU up (``tidying``:
# QMP only, its ``commands()``); see :mod:`forgeqmp.core.plans.recover`.


@attrs.frozen
class RecoveryPlan:
    """What recover found and does.

    ``event`` is the ``RECOVERED_*`` outcome, None when the record already tells the truth and the
    session is finished (nothing to change). ``record`` is the record once ``actions`` are done
    (the driver adds timestamps and, for :class:`HashMemory`, the digest). ``vm_running`` says
    whether the guest runs afterwards; ``findings`` and ``next_step`` are for humans.
    """

    event: Event | None
    record: SessionRecord
    actions: tuple[Action, ...] = ()
    findings: tuple[str, ...] = ()
    next_step: str = ""
    vm_running: bool = False

    @property
    def state(self) -> State:
        return self.record.state

    def describe(self) -> str:
        lines = [f"session {self.record.session_id}: {self.state.value}"]
        lines += [f"  found: {f}" for f in self.findings]
        lines += [f"  do: {a.describe()}" for a in self.actions]
        if self.next_step:
            lines.append(f"  next: {self.next_step}")
        return "\n".join(lines)


# --- the decision --------------------------------------------------------------------------------


def _phase(record: SessionRecord) -> State:
    if record.state is State.FAILED:
        return record.failure_phase or State.ACTIVE
    return record.state


def _argv_text(argv: Sequence[str]) -> str:
    return shlex.join(argv)


class _Planner:
    """Builds one plan; a helper so each state's rules read as a short function."""

    def __init__(self, record: SessionRecord, obs: Observation) -> None:
        self.record = record
        self.obs = obs
        self.qemu = obs.qemu
        self.tag = session_tag(record.session_id)
        self.actions: list[Action] = []
        self.findings: list[str] = []
        self.where = {d.name: where_is(d, obs.qemu) for d in record.disks}
        self.same_qemu = self.qemu is not None and self.qemu.pid == record.qemu.pid
        #: What the operator must know that the record's own fields do not say (status shows it).
        self.warnings: list[str] = []

    # --- observation helpers

    def exists(self, path: str | None) -> bool:
        return path is not None and path in self.obs.files

    def ours(self, name: str) -> bool:
        return name.startswith(self.tag + "-")

    def our_jobs(self) -> list[JobView]:
        return [j for j in self.qemu.jobs if self.ours(j.id)] if self.qemu else []

    def commit_job(self, index: int, disk: DiskRecord) -> JobView | None:
        overlay = disk.overlay_node
        if overlay is None or not overlay.endswith(names.FORMAT_NODE_SUFFIX):
            overlay = names.format_node(self.record.session_id, index)
        wanted = {names.commit_job(overlay), self.undo_job(index)}
        if disk.commit_job is not None and self.ours(disk.commit_job):
            wanted.add(disk.commit_job)  # recorded when the commit sent it
        return next((j for j in self.our_jobs() if j.id in wanted), None)

    @property
    def memory_path(self) -> str | None:
        return self.record.memory.path if self.record.memory is not None else None

    def qemu_text(self) -> str:
        if self.qemu is None:
            return "QEMU is not running (nobody answers on its QMP socket)"
        which = "the recorded" if self.same_qemu else "a new"
        return f"{which} QEMU (pid {self.qemu.pid}) runs, {self.qemu.runstate}"

    def paused_by_us(self) -> bool:
        """The guest is held, and by forgeqmp: the record said so before it paused the guest
        (``paused_by_forgeqmp``, or a ``pivoting`` step of a record written before that field)."""
        qemu = self.qemu
        if qemu is None or not self.same_qemu or qemu.runstate not in _HELD:
            return False
        return self.record.paused_by_forgeqmp or isinstance(self.record.step, Pivoting)

    def resume_ours(self) -> None:
        """Resume the guest if forgeqmp paused it; say why not if it is paused otherwise."""
        qemu = self.qemu
        if qemu is None or qemu.runstate == "running":
            return
        if self.paused_by_us():
            self.findings.append(f"the guest is {qemu.runstate}: forgeqmp paused it")
            self.add(ResumeGuest())
            return
        if qemu.runstate in _NOT_STARTED or (
            _phase(self.record) is State.DISCARDING and not self.same_qemu
        ):
            return  # a QEMU that has not run the guest yet (a discard's): the state's rules decide
        text = self.pause_warning()
        self.findings.append(text)
        self.warnings.append(text)

    def pause_warning(self) -> str:
        """What status says of a guest that recover leaves paused, and why it is so."""
        assert self.qemu is not None
        qemu = self.qemu
        why = _PAUSED_BY.get(qemu.runstate, "forgeqmp did not pause it")
        return (
            f"when recover ran, the guest was {qemu.runstate!r} (QEMU pid {qemu.pid}): {why}; "
            "recover left it so"
        )

    # --- action helpers

    def add(self, action: Action) -> None:
        if action not in self.actions:
            self.actions.append(action)

    def delete(self, path: str | None, why: str) -> None:
        if path is not None and self.exists(path):
            self.add(DeleteFile(path, why))

    def drop_nodes(self, keep: frozenset[str] = frozenset()) -> None:
        """Remove our nodes that the outcome does not keep: format nodes before file nodes."""
        if self.qemu is None:
            return
        ours = sorted(n for n in self.qemu.nodes if self.ours(n) and n not in keep)
        for node in sorted(ours, key=lambda n: (not n.endswith(names.FORMAT_NODE_SUFFIX), n)):
            self.add(RemoveNode(node))

    def release_migration_setup(self) -> None:
        """Give back what an enable's save borrowed, if this is the QEMU it borrowed it from."""
        qemu = self.qemu
        if qemu is None or not self.same_qemu:
            return
        if qemu.migration in MIGRATION_RUNNING and CancelMigration() not in self.actions:
            return  # the migration still uses them
        for fdset in qemu.fdsets:
            self.add(RemoveFdset(fdset))
        if self.record.memory is not None and self.record.memory.transport == "fd":
            self.add(CloseFd(names.memory_fd_name(self.record.session_id)))
        caps = self._our_capabilities_on(qemu, _RESETTABLE_CAPABILITIES)
        params = self._our_parameters_on(qemu, _OUR_PARAMETERS)
        if caps or params:
            self.add(ResetMigration(caps, params))

    def release_restore_setup(self) -> None:
        """Give back what discard's restore borrowed from the QEMU it started, when discard was
        interrupted after that QEMU resumed the guest and before the restore's cleanup (it
        follows ``cont``): the fdset holding the memory file, the capabilities of the save the
        load needed, and the load's ``multifd-channels`` (set back to QEMU's default: what the
        relaunched QEMU had before is not recorded). A freshly started QEMU has the capabilities
        off, so on there is the restore's doing; left alone while a migration runs (someone
        else's, then)."""
        qemu = self.qemu
        if qemu is None or self.same_qemu or qemu.migration in MIGRATION_RUNNING:
            return
        for fdset in qemu.fdsets:
            self.add(RemoveFdset(fdset))
        caps = self._our_capabilities_on(qemu, RESTORE_CAPABILITIES)
        loaded_with_multifd = self.record.memory is not None and (
            "multifd" in self.record.memory.capabilities
        )
        params = self._our_parameters_on(qemu, _RESTORE_PARAMETERS) if loaded_with_multifd else {}
        if caps or params:
            self.add(ResetMigration(caps, params))

    def _our_capabilities_on(self, qemu: QemuView, among: Collection[str]) -> tuple[str, ...]:
        """The resettable capabilities, of ``among``, that the session's save had and that are
        on in ``qemu`` now (in :data:`_RESETTABLE_CAPABILITIES` order)."""
        ours = set(self.record.memory.capabilities) if self.record.memory else set()
        return tuple(
            c
            for c in _RESETTABLE_CAPABILITIES
            if c in among and c in ours and qemu.capabilities.get(c) is True
        )

    def _our_parameters_on(self, qemu: QemuView, ours: Mapping[str, int]) -> dict[str, int]:
        """QEMU's defaults for the parameters of ``ours`` that ``qemu`` still has at our value
        (another value was set by someone else since: left alone)."""
        return {k: _DEFAULT_PARAMETERS[k] for k, v in ours.items() if qemu.parameters.get(k) == v}

    # --- outcomes

    def plan(
        self,
        event: Event | None,
        record: SessionRecord,
        next_step: str,
        vm_running: bool,
    ) -> RecoveryPlan:
        return RecoveryPlan(
            event=event,
            record=record,
            actions=tuple(sorted(self.actions, key=lambda a: a.order)),
            findings=tuple(self.findings),
            next_step=next_step,
            vm_running=vm_running,
        )

    def undo_job(self, index: int) -> str:
        """The job an undone enable moves disk ``index`` back off its overlay with."""
        return names.undo_job(names.create_job(self.record.session_id, index))

    def updated(self, event: Event, **changes: Any) -> SessionRecord:
        """The record as recover leaves it, moved by ``event`` (the true state found): it
        resumed any guest forgeqmp paused (or none is left: another QEMU, or none), so
        ``paused_by_forgeqmp`` is cleared."""
        record = self.record
        target = next_state(record.state, event)
        changes.setdefault("paused_by_forgeqmp", False)
        adopted = (
            self.qemu is not None
            and not self.same_qemu
            and target in (State.ACTIVE, State.COMMITTING)
        )
        if (
            adopted
            and self.qemu is not None
            and self.qemu.runstate not in ("running", *_NOT_STARTED)
        ):
            # The session goes on in another QEMU that is paused (not by forgeqmp): say so now,
            # as a later recover would.
            self.warnings.append(self.pause_warning())
        if self.warnings:
            warnings = changes.get("warnings", record.warnings)
            changes["warnings"] = tuple(dict.fromkeys([*warnings, *self.warnings]))
        if self.qemu is not None and adopted:
            changes["qemu"] = attrs.evolve(record.qemu, pid=self.qemu.pid)
        return advance(record, event, **changes)

    def failed(
        self,
        phase: State,
        reason: str,
        next_step: str,
        *,
        rolled_back: bool = False,
        disks: tuple[DiskRecord, ...] | None = None,
        vm_running: bool = False,
        record_step: CommitStep | RecoverStep | None = None,
    ) -> RecoveryPlan:
        record = self.updated(
            Event.RECOVERED_FAILED,
            step=record_step or self.record.step,
            failure_phase=phase,
            rolled_back=rolled_back,
            error=reason,
            next_step=next_step,
            disks=disks if disks is not None else self.record.disks,
        )
        return self.plan(Event.RECOVERED_FAILED, record, next_step, vm_running)

    def running(self) -> bool:
        """Whether the guest runs once the actions are done."""
        if self.qemu is None:
            return False
        return self.qemu.runstate == "running" or any(
            isinstance(a, ResumeGuest | FinishDiscard) for a in self.actions
        )

    def start_hint(self, *, on_overlays: bool) -> str:
        if on_overlays:
            return (
                "start it on the overlays with the command line 'forgeqmp status --json' shows "
                "as start_argv (Instance.start_spec()), never with its original command line, "
                "which would bypass the forge"
            )
        return "start it with its original command line: " + _argv_text(
            cold_argv(self.record.qemu.argv)
        )


def reconcile(record: SessionRecord, observation: Observation) -> RecoveryPlan:
    """The plan that makes ``record`` true to ``observation`` (see the module docstring).

    Pure and total: any record and observation give a plan, never an exception, and the plan's
    event is always a legal move of the transition table from the record's state.
    """
    p = _Planner(record, observation)
    return _restore_throttles(p, _decide(p, record))


def _restore_throttles(p: _Planner, plan: RecoveryPlan) -> RecoveryPlan:
    """``plan``, also setting back each throttle a killed commit recorded (and may have left
    bounded): in the QEMU it was set in, by :class:`RestoreThrottle`; another QEMU, or none,
    has no bound of forgeqmp's (it went with its process). Either way the record forgets it."""
    throttled = [d for d in p.record.disks if d.throttle is not None]
    if not throttled:
        return plan
    actions = list(plan.actions)
    findings = list(plan.findings)
    record = plan.record
    for disk in throttled:
        assert disk.throttle is not None
        if p.same_qemu and p.qemu is not None and disk.qdev in p.qemu.devices:
            findings.append(
                f"disk {disk.name}: a commit bounded its guest writes; its I/O throttle goes back "
                "to the platform's"
            )
            actions.append(RestoreThrottle(disk.name, disk.qdev, tuple(disk.throttle.items())))
        if any(d.name == disk.name and d.throttle is not None for d in record.disks):
            record = record.evolve_disk(disk.name, throttle=None)
    return attrs.evolve(
        plan,
        record=record,
        actions=tuple(sorted(actions, key=lambda a: a.order)),
        findings=tuple(findings),
    )


def _decide(p: _Planner, record: SessionRecord) -> RecoveryPlan:
    finished = record.state in TERMINAL or (record.state is State.FAILED and record.rolled_back)
    if finished:
        p.findings.append(
            f"the session is {record.state.value}: nothing to recover"
            if record.state is not State.FAILED
            else "the failed session was rolled back: nothing to recover"
        )
        if p.paused_by_us():  # killed between its last resume and the record saying so
            p.resume_ours()
        if record.paused_by_forgeqmp:
            record = record.evolve(paused_by_forgeqmp=False)
        return p.plan(None, record, record.next_step or "nothing to do", p.running())
    # Wherever the operation was killed, a guest it paused runs again once recover is done.
    p.resume_ours()
    phase = _phase(record)
    if phase is State.CREATING:
        return _creating(p)
    if phase is State.COMMITTING:
        return _committing(p)
    if phase is State.DISCARDING:
        return _discarding(p)
    return _active(p)


# --- enable interrupted --------------------------------------------------------------------------


def _memory_complete(p: _Planner) -> bool:
    """The memory save of an interrupted enable finished: the forge can be completed."""
    record = p.record
    if record.state is not State.CREATING or not p.exists(p.memory_path):
        return False
    if not p.obs.files.get(p.memory_path or "", 0):
        return False
    if p.qemu is None:
        return record.step is EnableStep.SNAPSHOT_DONE and all(
            p.exists(d.overlay_file) for d in record.disks
        )
    on_overlays = all(w is Where.OVERLAY for w in p.where.values())
    if not (p.same_qemu and on_overlays):
        return False
    return record.step is EnableStep.SNAPSHOT_DONE or p.qemu.migration == "completed"


def _creating(p: _Planner) -> RecoveryPlan:
    record = p.record
    p.findings.append(f"enable was interrupted at step {record.step.value!r}; {p.qemu_text()}")
    if _memory_complete(p):
        return _finish_enable(p)
    return _roll_back_enable(p)


def _finish_enable(p: _Planner) -> RecoveryPlan:
    record = p.record
    assert record.memory is not None
    p.findings.append("the disks are on their overlays and the memory state was saved completely")
    p.release_migration_setup()
    p.drop_nodes(keep=_overlay_nodes(record.disks))
    p.add(HashMemory(record.memory.path))
    if p.qemu is None:
        step = _stopped_active_step(p)
        new = _active_record(p, step=EnableStep.ACTIVE, next_step=step)
        return p.plan(Event.RECOVERED_ACTIVE, new, step, False)
    new = _active_record(p, step=EnableStep.ACTIVE, next_step=None)
    return p.plan(Event.RECOVERED_ACTIVE, new, "commit or discard the session when done", True)


def _stopped_active_step(p: _Planner) -> str:
    return (
        "the session is Active with QEMU stopped: "
        + p.start_hint(on_overlays=True)
        + "; or run 'forgeqmp commit' (merges offline) or 'forgeqmp discard' (starts the VM from "
        "the memory state)"
    )


def _overlay_nodes(disks: Sequence[DiskRecord]) -> frozenset[str]:
    return frozenset(
        n for d in disks for n in (d.overlay_node, d.overlay_file_node) if n is not None
    )


def _roll_back_enable(p: _Planner) -> RecoveryPlan:
    record = p.record
    qemu = p.qemu
    kept: list[str] = []
    snapshot_possible = record.step in ENABLE_STEPS_AFTER_SNAPSHOT
    if qemu is not None and p.same_qemu:
        if qemu.migration in MIGRATION_RUNNING:
            p.add(CancelMigration())
        busy: set[str] = set()
        for index, disk in enumerate(record.disks):
            job = p.commit_job(index, disk)
            if (
                job is not None
                and job.status != "concluded"
                and p.where[disk.name] is Where.OVERLAY
            ):
                p.add(FinishJob(job.id, disk.name))
                busy.add(disk.name)
        finishing = {a.job_id for a in p.actions if isinstance(a, FinishJob)}
        for job in p.our_jobs():
            if job.id not in finishing:
                p.add(DropJob(job.id))
        for index, disk in enumerate(record.disks):
            if p.where[disk.name] is Where.OVERLAY and disk.name not in busy:
                top = str(qemu.devices[disk.qdev].node)
                job_id = p.undo_job(index)
                p.add(CommitBack(disk.name, top, disk.device_node, job_id))
        if qemu.migration in MIGRATION_RUNNING:
            p.add(ResumeGuest())  # our save, paused at its switchover or pausing: let go
        p.drop_nodes()
        p.release_migration_setup()
        for disk in record.disks:
            if (
                p.where[disk.name] is Where.OTHER
                and snapshot_possible
                and p.exists(disk.overlay_file)
            ):
                kept.append(f"{disk.overlay_file} (disk {disk.name} is on another image now)")
                continue
            p.delete(disk.overlay_file, "the interrupted enable's overlay, merged back or unused")
    elif qemu is not None:
        # Another QEMU than the one enable worked on: it does not use our overlays unless it
        # was started on them; an overlay the snapshot may have written into is kept.
        for disk in record.disks:
            if p.where[disk.name] is Where.OVERLAY:
                kept.append(
                    f"{disk.overlay_file} (QEMU pid {qemu.pid} runs disk {disk.name} on it)"
                )
            elif snapshot_possible and p.exists(disk.overlay_file):
                kept.append(f"{disk.overlay_file} (it may hold writes made before QEMU restarted)")
            else:
                p.delete(disk.overlay_file, "the interrupted enable's overlay, never used")
        p.drop_nodes()
    else:
        for disk in record.disks:
            if not p.exists(disk.overlay_file):
                continue
            assert disk.overlay_file is not None
            # overlay_node None: the undo already moved the disk back off this overlay.
            if snapshot_possible and disk.overlay_node is not None:
                p.add(CommitOffline(disk.name, disk.overlay_file))
            p.delete(disk.overlay_file, "the interrupted enable's overlay, merged back or unused")
    p.delete(p.memory_path, "the memory state of an enable that did not finish")
    if kept:
        reason = (
            f"enable was interrupted at step {record.step.value!r} and QEMU was restarted meanwhile; "
            "kept: " + "; ".join(kept)
        )
        step = (
            "check each kept overlay (qemu-img info --backing-chain): commit it into its original "
            "or remove it, then run 'forgeqmp recover' again"
        )
        return p.failed(State.CREATING, reason, step, vm_running=p.running())
    reason = f"enable was interrupted at step {record.step.value!r} and recover undid it"
    undone = tuple(attrs.evolve(d, overlay_node=None, overlay_file_node=None) for d in record.disks)
    if qemu is None:
        reason += "; QEMU is not running (it exited or was killed)"
        step = "the VM is stopped: " + p.start_hint(on_overlays=False) + "; then enable again"
        return p.failed(
            State.CREATING, reason, step, rolled_back=True, disks=undone, vm_running=False
        )
    step = "nothing to do: everything was undone and the VM runs as before; enable again"
    return p.failed(State.CREATING, reason, step, rolled_back=True, disks=undone, vm_running=True)


# --- an Active session ---------------------------------------------------------------------------


def _memory_ok(p: _Planner) -> bool:
    memory = p.record.memory
    if memory is None:
        return False
    if memory.size is None:
        return p.exists(memory.path)
    return p.obs.files.get(memory.path) == memory.size


def _active_record(p: _Planner, **changes: Any) -> SessionRecord:
    """The record of an Active session as observed, with what the operator must know."""
    warnings = list(p.record.warnings)
    if p.qemu is not None:
        warnings += [
            f"the overlay {d.overlay_file} of disk {d.name} was deleted, but QEMU still has it "
            "open: commit now, before QEMU stops, or its writes since enable are lost"
            for d in p.record.disks
            if not p.exists(d.overlay_file)
        ]
    if not _memory_ok(p):
        warnings.append(
            "the memory file is missing or was changed: a discard will cold-start the VM"
        )
    return p.updated(
        Event.RECOVERED_ACTIVE,
        warnings=tuple(dict.fromkeys(warnings)),
        error=None,
        failure_phase=None,
        **changes,
    )


def _active(p: _Planner) -> RecoveryPlan:
    record = p.record
    qemu = p.qemu
    p.findings.append(p.qemu_text())
    missing = [d for d in record.disks if not p.exists(d.overlay_file)]
    if qemu is not None:
        wheres = {d.name: p.where[d.name] for d in record.disks}
        if all(w is Where.OVERLAY for w in wheres.values()):
            p.findings.append("every forged disk runs on its overlay: the forge is intact")
            p.drop_nodes(keep=_overlay_nodes(record.disks))
            new = _active_record(p, next_step=None)
            return p.plan(Event.RECOVERED_ACTIVE, new, "commit or discard when done", p.running())
        off = ", ".join(f"{n} ({w.value})" for n, w in wheres.items() if w is not Where.OVERLAY)
        restarted = "" if p.same_qemu else f" (QEMU was restarted: pid {qemu.pid})"
        reason = (
            f"disks {off} no longer run on their overlays{restarted}: the forge was bypassed, "
            "so their originals may have changed since enable"
        )
        step = (
            "do not discard (the memory state no longer matches the originals); stop QEMU, start "
            "it on the overlays (Instance.start_spec()) and run 'forgeqmp recover', or keep the "
            "VM as it runs and remove the overlays and the memory file by hand"
        )
        return p.failed(
            State.ACTIVE,
            reason,
            step,
            vm_running=p.running(),
            record_step=RecoverStep.FORGE_BYPASSED,
        )
    if missing:
        names = ", ".join(f"{d.name} ({d.overlay_file})" for d in missing)
        reason = (
            f"QEMU is not running and the overlays of {names} are gone: their writes since enable "
            "are lost; the originals still hold the disks as they were at enable"
        )
        step = "run 'forgeqmp discard' to start the VM as it was at enable" + (
            " (cold: the memory state is missing)" if not _memory_ok(p) else ""
        )
        return p.failed(State.ACTIVE, reason, step, vm_running=False)
    p.findings.append("the overlays and the memory state are intact on disk")
    step = _stopped_active_step(p)
    return p.plan(Event.RECOVERED_ACTIVE, _active_record(p, next_step=step), step, False)


# --- commit interrupted --------------------------------------------------------------------------


def _gone(disk: DiskRecord) -> DiskRecord:
    return attrs.evolve(
        disk, merged=True, overlay_node=None, overlay_file_node=None, commit_job=None
    )


def _unrecorded(disk: DiskRecord) -> str:
    return (
        f"disk {disk.name} left its overlay although no commit of it was recorded; its overlay "
        f"{disk.overlay_file} is kept (if it still exists): check it"
    )


def _committing(p: _Planner) -> RecoveryPlan:
    record = p.record
    qemu = p.qemu
    p.findings.append(
        f"commit {'was interrupted' if record.state is State.COMMITTING else 'had failed'} "
        f"(step {record.step.value!r}); {p.qemu_text()}"
    )
    disks: list[DiskRecord] = []
    pending: list[str] = []
    odd: list[str] = []
    for index, disk in enumerate(record.disks):
        where = p.where[disk.name]
        job = p.commit_job(index, disk)
        if disk.overlay_node is None and disk.merged:
            # Recorded as merged: the device was on its original before this was written.
            if where is Where.OVERLAY:
                odd.append(f"{disk.name} is recorded merged but runs on {disk.overlay_file}")
            disks.append(disk)
            p.delete(disk.overlay_file, f"the overlay of disk {disk.name}, merged")
            continue
        if disk.overlay_node is None:
            # Off its overlay without a recorded commit (a hand edit): keep what is there.
            disks.append(disk)
            odd.append(_unrecorded(disk))
            continue
        if where is Where.BASE or (
            where is Where.UNKNOWN and disk.merged and not p.exists(disk.overlay_file)
        ):
            # On its original again: the commit job completed (the overlay file is removed only
            # after that, so a missing overlay of a merged disk means the same).
            if job is not None:
                p.add(DropJob(job.id))
            if disk.merged:
                disks.append(_gone(disk))
                p.delete(disk.overlay_file, f"the overlay of disk {disk.name}, merged")
                continue
            disks.append(attrs.evolve(disk, overlay_node=None, overlay_file_node=None))
            odd.append(_unrecorded(disk))
            continue
        if where is Where.OVERLAY and job is not None and job.status != "concluded":
            p.add(FinishJob(job.id, disk.name))
            disks.append(_gone(disk))
            p.delete(disk.overlay_file, f"the overlay of disk {disk.name}, merged")
            continue
        if job is not None:
            p.add(DropJob(job.id))
        if where is Where.OTHER:
            odd.append(f"disk {disk.name} is on neither its overlay nor its original")
        elif where is Where.UNKNOWN and not p.exists(disk.overlay_file):
            odd.append(f"the overlay {disk.overlay_file} of disk {disk.name} is missing")
        disks.append(disk)
        pending.append(disk.name)
    merged_any = any(d.merged for d in disks)
    keep = _overlay_nodes([d for d in disks if d.name in pending])
    if odd:
        p.drop_nodes(keep=keep)
        reason = "commit was interrupted and recover found: " + "; ".join(odd)
        step = (
            "check the disks by hand (qemu-img info --backing-chain), then run 'forgeqmp recover'"
        )
        return p.failed(
            State.COMMITTING,
            reason,
            step,
            disks=tuple(disks),
            vm_running=p.running(),
            record_step=CommitStep.COMMITTING,
        )
    if not pending:
        p.drop_nodes()
        p.delete(p.memory_path, "the memory state of a committed session")
        step = "nothing to do: every disk is merged into its original"
        if qemu is None:
            step = "the commit is complete but the VM is stopped: " + p.start_hint(
                on_overlays=False
            )
        new = p.updated(
            Event.RECOVERED_COMMITTED,
            step=CommitStep.COMMITTED,
            disks=tuple(disks),
            error=None,
            next_step=None if qemu is not None else step,
            failure_phase=None,
        )
        return p.plan(Event.RECOVERED_COMMITTED, new, step, p.running())
    if not merged_any:
        p.findings.append("the commit had not touched any original: the forge is intact")
        p.drop_nodes(keep=keep)
        if qemu is None:
            step = _stopped_active_step(p)
        else:
            step = "run 'forgeqmp commit' again, or discard"
        new = _active_record(
            p,
            step=EnableStep.ACTIVE,
            disks=tuple(disks),
            next_step=step if qemu is None else None,
        )
        return p.plan(Event.RECOVERED_ACTIVE, new, step, p.running())
    p.drop_nodes(keep=keep)
    if merged_any:
        p.delete(p.memory_path, "the memory state, useless once a disk was merged")
    done = [d.name for d in disks if d.name not in pending] or ["none"]
    reason = (
        f"commit stopped; disks fully merged: {', '.join(done)}; still on overlays: "
        + ", ".join(pending)
    )
    offline = (
        " (QEMU is not running: it merges offline with qemu-img commit)" if qemu is None else ""
    )
    step = f"run 'forgeqmp commit' again to merge the disks still on overlays{offline}"
    return p.failed(
        State.COMMITTING,
        reason,
        step,
        disks=tuple(disks),
        vm_running=p.running(),
        record_step=CommitStep.COMMITTING,
    )


# --- discard interrupted -------------------------------------------------------------------------


def _discarding(p: _Planner) -> RecoveryPlan:
    record = p.record
    qemu = p.qemu
    interrupted = record.state is State.DISCARDING
    p.findings.append(
        f"discard {'was interrupted' if interrupted else 'had failed'} (step {record.step.value!r}); "
        + p.qemu_text()
    )
    on_overlays = qemu is not None and all(w is Where.OVERLAY for w in p.where.values())
    if on_overlays and all(p.exists(d.overlay_file) for d in record.disks):
        # The old QEMU still runs the forge (or one was started on the overlays): nothing was lost.
        p.findings.append("every forged disk runs on its overlay: the forge is intact")
        p.drop_nodes(keep=_overlay_nodes(record.disks))
        new = _active_record(p, step=EnableStep.ACTIVE, next_step=None)
        return p.plan(Event.RECOVERED_ACTIVE, new, "run 'forgeqmp discard' again", p.running())
    guest_ran = (
        qemu is not None
        and not p.same_qemu
        and qemu.runstate not in _NOT_STARTED | _HELD
        and all(w is Where.BASE for w in p.where.values())
    )
    if guest_ran:
        assert qemu is not None
        restored = qemu.migration == "completed"
        if not interrupted and record.memory_restored is not None:
            restored = record.memory_restored
        p.findings.append(
            f"QEMU pid {qemu.pid} runs the guest on the originals "
            + ("(restored from the memory state)" if restored else "(cold-started)")
        )
        p.release_restore_setup()
        for disk in record.disks:
            p.delete(disk.overlay_file, f"the overlay of disk {disk.name}, discarded")
        p.delete(p.memory_path, "the memory state of a discarded session")
        new = p.updated(
            Event.RECOVERED_DISCARDED,
            step=DiscardStep.DISCARDED,
            memory_restored=restored,
            error=None
            if restored
            else "memory not restored: the discard was interrupted and the VM cold-started",
            next_step=None,
            failure_phase=None,
        )
        return p.plan(Event.RECOVERED_DISCARDED, new, "nothing to do", True)
    if interrupted:
        # The old QEMU is gone (or was never stopped on the overlays): its running state is lost
        # either way, so finish what discard was asked to do.
        p.add(FinishDiscard())
        new = p.updated(
            Event.RECOVERED_DISCARDED, step=DiscardStep.DISCARDED, error=None, next_step=None
        )
        return p.plan(Event.RECOVERED_DISCARDED, new, "nothing to do", True)
    # A discard that failed and is still failed: nothing changed since; say it again.
    step = record.next_step or "run 'forgeqmp discard' again"
    reason = record.error or "discard failed"
    return p.failed(State.DISCARDING, reason, step, vm_running=p.running())


# --- status ----------------------------------------------------------------------------------------


def stale_reason(
    record: SessionRecord, *, lock_held: bool | None, qemu_alive: bool | None = None
) -> str | None:
    """Why ``record`` cannot be trusted as it reads, or None.

    A working state (creating, committing, discarding) with nobody holding the instance's lock
    means the controller doing the work is gone: the record is stale until ``recover`` runs.
    ``lock_held`` None means it could not be told (then nothing is claimed).
    """
    operation = WORKING_OPERATION.get(record.state)
    if operation is None or lock_held is None or lock_held:
        return None
    qemu = "" if qemu_alive is None else (" QEMU runs." if qemu_alive else " QEMU is not running.")
    return (
        f"the {operation} that left this session {record.state.value!r} (step {record.step.value!r}) is "
        f"no longer running: no forgeqmp process holds the instance's lock, so it was "
        f"interrupted.{qemu} Run 'forgeqmp recover' to find and reach the true state"
    )
