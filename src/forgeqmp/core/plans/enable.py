"""The QMP plan of enable: overlays prepared before the pause, memory saved by migration, and one
``transaction`` of ``blockdev-snapshot`` actions while the guest is paused (sans-IO).

The sequence (measured best, see the QEMU recipe):

1. before anything pauses, per disk: ``blockdev-add`` a file node on a file forgeqmp created itself
   (O_EXCL), ``blockdev-create`` a qcow2 image on it whose backing file is the disk's image, then
   ``blockdev-add`` the qcow2 node with ``"backing": null`` (the snapshot links it later);
2. migration capabilities and parameters set (``pause-before-switchover``, a 20 ms downtime limit,
   unlimited bandwidth), then ``migrate`` into the memory file passed as an fd;
3. at the ``pre-switchover`` status the guest is paused: one ``transaction`` snapshots every selected
   disk or none (all or nothing, verified on 7.2 and 10.0);
4. ``migrate-continue``, wait ``completed``, wait for the runstate to leave ``finish-migrate``,
   ``cont``.

A guest that rewrites memory faster than the final pass can save it keeps precopy iterating: it
never reaches the pause on its own (measured: 85 s with 64 MiB rewritten in a loop at 780 MB/s in
a 512 MiB guest). While it does not, the :data:`CONVERGENCE_STEPS` allow a longer final pass step
by step and, last, pause the guest so that the save ends: enable always finishes, seconds after
the first pass over RAM, and pays with a longer pause only when the guest makes it.

The ``background-snapshot`` strategy instead stops the guest, runs the transaction, starts a
background migration and resumes at once; the migration then completes while the guest runs.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from forgeqmp.core import names
from forgeqmp.core.blockopts import BlockOptions
from forgeqmp.core.disks import Disk, Selection
from forgeqmp.core.features import Features
from forgeqmp.core.plans.command import Command
from forgeqmp.core.record import DiskRecord
from forgeqmp.errors import FeatureMissing

__all__ = [
    "CONVERGENCE_STEPS",
    "DOWNTIME_LIMIT_MS",
    "MAX_BANDWIDTH",
    "ConvergenceStep",
    "EnablePlan",
    "OverlayPlan",
    "Strategy",
    "Transport",
    "choose_strategy",
    "default_strategy",
    "migration_uri",
    "plan_enable",
]

#: Downtime the final RAM pass may take (ms); the recipe measured 7–25 ms pauses with it.
DOWNTIME_LIMIT_MS = 20
#: Bandwidth limit for the save (bytes/s): effectively none (QEMU's default 128 MiB/s crawls).
MAX_BANDWIDTH = 1 << 40


@attrs.frozen
class ConvergenceStep:
    """What enable does if precopy has not reached its pause ``after_s`` seconds after its first
    full pass over RAM ended: allow the final pass ``downtime_limit_ms``, or (None) pause the
    guest, so that the remaining memory is saved in one pause that no longer grows.

    Counted from the end of the first pass, not from ``migrate``: that pass takes as long as the
    RAM size needs (about 1 s per 1.5 GB here) and a large guest must not be paused during it."""

    after_s: float
    downtime_limit_ms: int | None

    @property
    def pauses_guest(self) -> bool:
        """True for the last resort: the guest is paused until the save ends."""
        return self.downtime_limit_ms is None

    def command(self) -> Command:
        """The QMP command of this step."""
        if self.downtime_limit_ms is None:
            return Command("stop")
        return Command("migrate-set-parameters", {"downtime-limit": self.downtime_limit_ms})

    def progress_detail(self) -> dict[str, Any]:
        """The detail of the ``converging`` progress event this step reports."""
        done: dict[str, Any] = (
            {"guest_paused": True}
            if self.downtime_limit_ms is None
            else {"downtime_limit_ms": self.downtime_limit_ms}
        )
        return {**done, "after_seconds": self.after_s}


#: Escalation for a save that does not converge. A guest that converges at all reaches the pause
#: within a few passes, a fraction of a second after the first one, and never sees a step.
CONVERGENCE_STEPS: tuple[ConvergenceStep, ...] = (
    ConvergenceStep(1.0, 50),
    ConvergenceStep(2.0, 100),
    ConvergenceStep(3.0, 250),
    ConvergenceStep(4.0, 500),
    ConvergenceStep(6.0, None),
)


class Strategy(enum.Enum):
    """How the memory state is saved. The default is chosen per QEMU by
    :func:`default_strategy`."""

    #: Precopy with ``pause-before-switchover``; snapshot in the pause. The default where QEMU
    #: has no ``mapped-ram`` (7.2).
    PRECOPY = "precopy"
    #: Precopy into a RAM-sized sparse file with ``mapped-ram`` + ``multifd`` (``file:`` only),
    #: snapshot in the pause; restored by parallel channels at fixed offsets. The default where
    #: QEMU has it (>= 9.0): measured ahead of ``precopy`` whenever the guest writes memory during
    #: the save, restored in about half the time at 2 GiB, within milliseconds of it otherwise
    #: (docs/performance.md).
    MAPPED_RAM = "mapped-ram"
    #: Stop, snapshot disks, then save memory while the guest runs (write-protect faults);
    #: slower save, pause independent of RAM size.
    BACKGROUND_SNAPSHOT = "background-snapshot"


def default_strategy(features: Features) -> Strategy:
    """The strategy enable uses when none is asked for, chosen by what this QEMU has (never by
    its version): ``mapped-ram`` where QEMU has everything it needs (:func:`choose_strategy`
    would accept it: the ``mapped-ram``, ``multifd`` and ``pause-before-switchover``
    capabilities, the ``file`` transport and fdsets), else ``precopy``. Measured on 10.0
    (docs/performance.md): a shorter save and pause than precopy with a guest rewriting its
    memory, a discard in about half the time at 2 GiB, and within milliseconds of precopy with
    an idle guest."""
    _transport, missing = _what_it_needs(features, Strategy.MAPPED_RAM)
    return Strategy.PRECOPY if missing else Strategy.MAPPED_RAM


#: The migration capabilities each strategy turns on (everything else is turned off).
_STRATEGY_CAPABILITIES: Mapping[Strategy, frozenset[str]] = {
    Strategy.PRECOPY: frozenset({"pause-before-switchover"}),
    Strategy.MAPPED_RAM: frozenset({"pause-before-switchover", "multifd", "mapped-ram"}),
    Strategy.BACKGROUND_SNAPSHOT: frozenset({"background-snapshot"}),
}


class Transport(enum.Enum):
    """How QEMU reaches the memory file forgeqmp opened."""

    #: ``file:/dev/fdset/N`` with the fd passed by ``add-fd`` (QEMU >= 8.2 has the file transport).
    FDSET_FILE = "fdset-file"
    #: ``fd:NAME`` with the fd passed by ``getfd`` (QEMU without the file transport, e.g. 7.2).
    FD = "fd"


def migration_uri(transport: Transport, *, fdset_id: int | None, fd_name: str) -> str:
    """The URI of the memory file as QEMU sees it: ``file:/dev/fdset/<fdset_id>`` (the fdset
    ``add-fd`` made) or ``fd:<fd_name>`` (the fd ``getfd`` named). The one builder of it, for the
    save (enable) and the load (discard).

    :raises ValueError: the file transport without an fdset id.
    """
    if transport is Transport.FDSET_FILE:
        if fdset_id is None:
            raise ValueError("the file transport needs the fdset id from add-fd")
        return f"file:/dev/fdset/{fdset_id}"
    return f"fd:{fd_name}"


def choose_strategy(
    features: Features, requested: Strategy | None = None
) -> tuple[Strategy, Transport]:
    """Pick the strategy (``requested`` or :func:`default_strategy`) and the transport QEMU
    supports for it.

    :raises FeatureMissing: this QEMU cannot do what the strategy needs (the message says what).
    """
    strategy = requested or default_strategy(features)
    transport, missing = _what_it_needs(features, strategy)
    if missing:
        raise FeatureMissing(
            f"QEMU {features.version} cannot forge with the {strategy.value!r} strategy: it lacks "
            + "; ".join(missing)
            + ". Choose another strategy or upgrade QEMU."
        )
    return strategy, transport


def _what_it_needs(features: Features, strategy: Strategy) -> tuple[Transport, list[str]]:
    """The transport ``strategy`` would use on this QEMU, and what QEMU lacks for it (empty:
    nothing)."""
    missing: list[str] = []
    if not features.blockdev_snapshot_transaction:
        missing.append("transaction with blockdev-snapshot and blockdev-add")
    if "blockdev-create" not in features.commands:
        missing.append("blockdev-create")
    if strategy in (Strategy.PRECOPY, Strategy.MAPPED_RAM) and not features.pause_before_switchover:
        missing.append("the pause-before-switchover migration capability")
    if strategy is Strategy.MAPPED_RAM and not (features.mapped_ram and features.multifd):
        missing.append("the mapped-ram and multifd migration capabilities with file: migration")
    if strategy is Strategy.BACKGROUND_SNAPSHOT and not features.background_snapshot:
        missing.append("the background-snapshot migration capability")
    if features.file_transport and features.fdset:
        transport = Transport.FDSET_FILE
    elif features.fd_transport and strategy is not Strategy.MAPPED_RAM:
        transport = Transport.FD
    else:
        transport = Transport.FD
        missing.append("a way to migrate into a passed file descriptor (getfd or add-fd + file:)")
    return transport, missing


@attrs.frozen
class OverlayPlan:
    """The overlay of one disk: its file, its two nodes, and the commands that make or remove it."""

    disk: Disk
    overlay_file: str
    file_node: str
    format_node: str
    create_job: str
    #: The original's options, given to the overlay so that the guest's writes during the
    #: session behave as before enable (see :mod:`forgeqmp.core.blockopts`); None: QEMU's defaults.
    options: BlockOptions | None = None

    def disk_record(self) -> DiskRecord:
        """How the session record keeps this disk: the original and the overlay's file and
        nodes, as planned (written before the overlay exists)."""
        disk = self.disk
        assert disk.node is not None
        assert disk.file is not None
        assert disk.format is not None
        assert disk.virtual_size is not None
        return DiskRecord(
            name=disk.name,
            qdev=disk.qdev,
            device_node=disk.node,
            base_file=os.path.abspath(disk.file),
            base_format=disk.format,
            virtual_size=disk.virtual_size,
            overlay_file=self.overlay_file,
            overlay_node=self.format_node,
            overlay_file_node=self.file_node,
            options=self.options.to_json() if self.options is not None else None,
        )

    def add_file_node(self) -> Command:
        """Open the (empty, forgeqmp-created) overlay file as a file node."""
        extra = self.options.file_node_options() if self.options is not None else {}
        return Command(
            "blockdev-add",
            {"driver": "file", "node-name": self.file_node, "filename": self.overlay_file, **extra},
        )

    def create_image(self) -> Command:
        """Format the file node as qcow2 backed by the disk's image (a job; wait for it)."""
        assert self.disk.file is not None
        assert self.disk.format is not None
        assert self.disk.virtual_size is not None
        return Command(
            "blockdev-create",
            {
                "job-id": self.create_job,
                "options": {
                    "driver": "qcow2",
                    "file": self.file_node,
                    "size": self.disk.virtual_size,
                    "backing-file": self.disk.file,
                    "backing-fmt": self.disk.format,
                },
            },
        )

    def add_format_node(self) -> Command:
        """Open the qcow2 overlay without its backing (``blockdev-snapshot`` links it)."""
        extra = self.options.format_node_options() if self.options is not None else {}
        return Command(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": self.format_node,
                "file": self.file_node,
                "backing": None,
                **extra,
            },
        )

    def snapshot_action(self) -> dict[str, Any]:
        """The ``transaction`` action that puts the overlay on top of the disk's node."""
        assert self.disk.node is not None
        return {
            "type": "blockdev-snapshot",
            "data": {"node": self.disk.node, "overlay": self.format_node},
        }

    def remove_nodes(self) -> tuple[Command, ...]:
        """Undo :meth:`add_format_node` and :meth:`add_file_node` (in that order)."""
        return (
            Command("blockdev-del", {"node-name": self.format_node}),
            Command("blockdev-del", {"node-name": self.file_node}),
        )


@attrs.frozen
class EnablePlan:
    """Everything enable sends to QEMU, computed before the first command."""

    session_id: str
    strategy: Strategy
    transport: Transport
    overlays: tuple[OverlayPlan, ...]
    memory_file: str
    #: Migration capabilities to set for the save (and to restore afterwards).
    capabilities: Mapping[str, bool]
    #: Migration parameters to set for the save (and to restore afterwards).
    parameters: Mapping[str, Any]
    #: The fd name for the ``fd:`` transport.
    fd_name: str
    #: What to do while precopy does not converge (empty: the strategy never waits for it).
    convergence: tuple[ConvergenceStep, ...] = ()

    def set_capabilities(self) -> Command:
        """``migrate-set-capabilities`` for the save."""
        return Command(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in self.capabilities.items()]},
        )

    def restore_capabilities(self, previous: Mapping[str, bool]) -> Command:
        """Put back the capabilities this plan changed, as they were before."""
        return Command(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": k, "state": bool(previous.get(k, False))}
                    for k in reversed(list(self.capabilities))
                ]
            },
        )

    def set_parameters(self) -> Command:
        """``migrate-set-parameters`` for the save."""
        return Command("migrate-set-parameters", dict(self.parameters))

    def restore_parameters(self, previous: Mapping[str, Any]) -> Command:
        """Put back the parameters this plan changed, as they were before."""
        return Command(
            "migrate-set-parameters", {k: previous[k] for k in self.parameters if k in previous}
        )

    def migration_uri(self, fdset_id: int | None) -> str:
        """The URI of the memory file as QEMU sees it."""
        return migration_uri(self.transport, fdset_id=fdset_id, fd_name=self.fd_name)

    def migrate(self, fdset_id: int | None) -> Command:
        """Start saving the memory state."""
        return Command("migrate", {"uri": self.migration_uri(fdset_id)})

    def transaction(self) -> Command:
        """All disks or none: one ``blockdev-snapshot`` per forged disk."""
        return Command("transaction", {"actions": [o.snapshot_action() for o in self.overlays]})

    @property
    def pauses_before_switchover(self) -> bool:
        """True when the transaction runs at the ``pre-switchover`` pause."""
        return self.strategy is not Strategy.BACKGROUND_SNAPSHOT

    @property
    def writes_memory_in_order(self) -> bool:
        """True when QEMU writes the memory file as a stream, from its start to its end and
        never going back (precopy, background-snapshot), so that it can be hashed while it is
        written; ``mapped-ram`` writes each page at its own offset, from several threads."""
        return self.strategy is not Strategy.MAPPED_RAM


def _overlay_path(disk: Disk, session_id: str, overlay_dir: str | None) -> str:
    assert disk.file is not None
    return names.overlay_file(disk.file, session_id, overlay_dir)


def save_capabilities(strategy: Strategy, known: Iterable[str]) -> dict[str, bool]:
    """Every migration capability QEMU knows, on for what ``strategy`` needs and off otherwise.

    Whatever the VM's owner (or an earlier restore: ``mapped-ram`` and ``multifd`` must be on to
    load such a file) left set would otherwise change the stream: ``x-ignore-shared`` leaves RAM
    out of the file, ``block`` puts disks in it, ``multifd`` refuses ``background-snapshot``...
    The previous values are put back after the save (:meth:`EnablePlan.restore_capabilities`).
    QEMU checks the combination once all values of one ``migrate-set-capabilities`` are applied,
    so the order does not matter.
    """
    # "events": QEMU sends MIGRATION events only with it; without them every wait would poll.
    wanted = {"events"} | _STRATEGY_CAPABILITIES[strategy]
    return {name: name in wanted for name in sorted(set(known) | wanted)}


def plan_enable(
    *,
    session_id: str,
    selection: Selection,
    features: Features,
    memory_file: str,
    strategy: Strategy | None = None,
    overlay_dir: str | None = None,
    options: Mapping[str, BlockOptions] | None = None,
) -> EnablePlan:
    """Compute the enable plan. Node names are short (QEMU allows 31 characters) and unique per
    session: ``fq<8 hex>-<n>-fmt`` / ``-file``; overlay files sit next to their base image (or in
    ``overlay_dir``) as ``<base name>.forge-<8 hex>.qcow2``. ``options`` maps a disk's qdev to
    the block options its overlay gets (see :mod:`forgeqmp.core.blockopts`).

    :raises FeatureMissing: see :func:`choose_strategy`.
    """
    chosen, transport = choose_strategy(features, strategy)
    overlays = tuple(
        OverlayPlan(
            disk=disk,
            overlay_file=_overlay_path(disk, session_id, overlay_dir),
            file_node=names.file_node(session_id, i),
            format_node=names.format_node(session_id, i),
            create_job=names.create_job(session_id, i),
            options=(options or {}).get(disk.qdev),
        )
        for i, disk in enumerate(selection.forged)
    )
    capabilities = save_capabilities(chosen, features.migration_capabilities)
    parameters: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH}
    if chosen is not Strategy.BACKGROUND_SNAPSHOT:
        parameters["downtime-limit"] = DOWNTIME_LIMIT_MS
    return EnablePlan(
        session_id=session_id,
        strategy=chosen,
        transport=transport,
        overlays=overlays,
        memory_file=memory_file,
        capabilities=capabilities,
        parameters=parameters,
        fd_name=names.memory_fd_name(session_id),
        convergence=() if chosen is Strategy.BACKGROUND_SNAPSHOT else CONVERGENCE_STEPS,
    )


def overlays_attached(
    plan_overlays: Sequence[OverlayPlan], query_block: Sequence[Mapping[str, Any]]
) -> dict[str, bool]:
    """For each overlay of the plan: is its format node attached to its disk's device now?

    Used to learn whether a transaction took effect when its reply was lost."""
    attached = {
        str(entry.get("qdev")): str(entry["inserted"]["node-name"])
        for entry in query_block
        if entry.get("inserted")
    }
    return {o.format_node: attached.get(o.disk.qdev) == o.format_node for o in plan_overlays}
