"""forgeqmp: try-before-you-keep live snapshots of running QEMU VMs, with full memory state.

Point it at a running QEMU's QMP socket::

    async with forgeqmp.connect("/run/vm1/qmp.sock") as vm:
        session = await vm.enable()          # disks + memory, guest paused ~10-25 ms
        ...                                  # try things in the guest
        await vm.discard()                   # back to the moment of enable, or:
        await vm.commit()                    # keep everything

Everything is a coroutine for anyio's asyncio backend (qemu.qmp is asyncio-based).
"""

from forgeqmp._version import __version__
from forgeqmp.adapters.featureprobe import probe
from forgeqmp.adapters.launcher import (
    Launcher,
    LaunchSpec,
    detached_launcher,
    executable_launcher,
)
from forgeqmp.adapters.qmp import QMPConnection
from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import InstanceLock, StateDir, default_state_dir
from forgeqmp.core.argv import active_argv, cold_argv, incoming_argv, start_argv
from forgeqmp.core.disks import Disk, Selection, select_disks
from forgeqmp.core.features import Features
from forgeqmp.core.guard import (
    QMP_RULES,
    Operation,
    QMPRule,
    check_operation,
    check_qmp_command,
    parse_operation,
)
from forgeqmp.core.plans.enable import Strategy, Transport
from forgeqmp.core.reconcile import Observation, RecoveryPlan, reconcile
from forgeqmp.core.record import DiskRecord, MemoryRecord, QemuRecord, SessionRecord
from forgeqmp.core.relaunch import Finding, relaunch_findings
from forgeqmp.core.states import Event, Failure, SessionStatus, State
from forgeqmp.errors import (
    DiskNotForgeable,
    FeatureMissing,
    ForgeError,
    ForgeFailed,
    IllegalTransition,
    InstanceLocked,
    InsufficientSpace,
    InvalidArgument,
    MigrationBlocked,
    NoDiskSelected,
    NoSession,
    NotQMP,
    NotRelaunchable,
    OperationBlocked,
    PrerequisiteError,
    QEMUUnreachable,
    QMPCommandError,
    QMPDisconnected,
    QMPError,
    QMPTimeout,
    RecordError,
    SessionActive,
    TaskRunning,
    UnknownDisk,
    VMNotRunning,
)
from forgeqmp.forge import (
    DEFAULT_COMMIT_TIMEOUT,
    DEFAULT_DISCARD_TIMEOUT,
    DEFAULT_ENABLE_TIMEOUT,
    Instance,
    ProgressEvent,
    StateListener,
    connect,
    status_of,
)

__all__ = [
    "DEFAULT_COMMIT_TIMEOUT",
    "DEFAULT_DISCARD_TIMEOUT",
    "DEFAULT_ENABLE_TIMEOUT",
    "QMP_RULES",
    "Disk",
    "DiskNotForgeable",
    "DiskRecord",
    "Event",
    "Failure",
    "FeatureMissing",
    "Features",
    "Finding",
    "ForgeError",
    "ForgeFailed",
    "IllegalTransition",
    "Instance",
    "InstanceLock",
    "InstanceLocked",
    "InsufficientSpace",
    "InvalidArgument",
    "LaunchSpec",
    "Launcher",
    "MemoryRecord",
    "MigrationBlocked",
    "NoDiskSelected",
    "NoSession",
    "NotQMP",
    "NotRelaunchable",
    "Observation",
    "Operation",
    "OperationBlocked",
    "PrerequisiteError",
    "ProgressEvent",
    "QEMUUnreachable",
    "QMPCommandError",
    "QMPConnection",
    "QMPDisconnected",
    "QMPError",
    "QMPRule",
    "QMPTimeout",
    "QemuRecord",
    "RecordError",
    "RecordStore",
    "RecoveryPlan",
    "Selection",
    "SessionActive",
    "SessionRecord",
    "SessionStatus",
    "State",
    "StateDir",
    "StateListener",
    "Strategy",
    "TaskRunning",
    "Transport",
    "UnknownDisk",
    "VMNotRunning",
    "__version__",
    "active_argv",
    "check_operation",
    "check_qmp_command",
    "cold_argv",
    "connect",
    "default_state_dir",
    "detached_launcher",
    "executable_launcher",
    "incoming_argv",
    "parse_operation",
    "probe",
    "reconcile",
    "relaunch_findings",
    "select_disks",
    "start_argv",
    "status_of",
]
