"""The VM's disks as users name them, and the choice of which ones to forge (sans-IO).

With ``-blockdev`` the ``query-block`` device name is empty, so a disk is known by its qdev id
(``-device virtio-blk-pci,id=NAME``), its qdev path (``/machine/peripheral/NAME/virtio-backend``) or
the node-name of the block node attached to it. A legacy ``-drive`` (``if=none`` with a device,
or ``if=pflash``, which has no qdev id: its qdev path is ``/machine/system.flashN``) is known by
its drive id, the BlockBackend name ``query-block`` reports as ``device``. Node-names QEMU made
up itself (``#block123``) change with every QEMU process: forgeqmp never names a disk by them.
:func:`disks_from_query` turns the replies of
``query-block`` (and the ``bootindex`` of each device) into :class:`Disk` values;
:func:`select_disks` resolves what the caller asked for, with the typed errors of the CLI contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from forgeqmp.core.blockopts import BlockOptions, options_of
from forgeqmp.errors import DiskNotForgeable, InvalidArgument, NoDiskSelected, UnknownDisk

__all__ = [
    "DISK_CHOICE_RULE",
    "Disk",
    "Selection",
    "check_disk_choice",
    "disks_from_query",
    "is_generated_node_name",
    "qom_path_of",
    "select_disks",
]

_PERIPHERAL = "/machine/peripheral/"


def qom_path_of(qdev: str) -> str:
    """The QOM path of the device owning a block backend (for ``qom-get ... bootindex``)."""
    if not qdev.startswith("/"):
        return _PERIPHERAL + qdev
    if qdev.endswith("/virtio-backend"):
        return qdev[: -len("/virtio-backend")]
    return qdev


def is_generated_node_name(name: str | None) -> bool:
    """True for a node-name QEMU generated (``#block123``): it changes with every QEMU process."""
    return name is not None and name.startswith("#")


def _device_id(qdev: str) -> str | None:
    if not qdev.startswith("/"):
        return qdev or None
    if qdev.startswith(_PERIPHERAL):
        return qdev[len(_PERIPHERAL) :].split("/", 1)[0] or None
    return None


@attrs.frozen
class Disk:
    """One disk device of the VM and the block node attached to it."""

    #: The qdev id (``-device ...,id=NAME``); None for anonymous devices.
    id: str | None
    #: The qdev path or id exactly as ``query-block`` reports it.
    qdev: str
    #: The node-name of the (format) node attached to the device, None if no medium.
    node: str | None
    #: The image file of that node.
    file: str | None
    #: Its format driver (``qcow2``, ``raw``...).
    format: str | None
    #: Guest-visible size in bytes.
    virtual_size: int | None
    read_only: bool
    #: Removable media (CD-ROM, floppy): never forgeable.
    removable: bool
    #: How many backing files are below the attached node.
    backing_depth: int
    #: The device's bootindex, None when it has none.
    bootindex: int | None = None
    #: The BlockBackend name (``query-block`` ``device``): the drive id of a legacy ``-drive``,
    #: None for ``-blockdev`` (QEMU reports "").
    backend: str | None = None
    #: The attached node's options as QEMU shows them (see :mod:`forgeqmp.core.blockopts`).
    options: BlockOptions | None = None

    @property
    def stable_node(self) -> str | None:
        """The attached node-name if the platform chose it, None if QEMU made it up."""
        return None if is_generated_node_name(self.node) else self.node

    @property
    def name(self) -> str:
        """The name forgeqmp reports, stable across QEMU processes: the qdev id, else the drive
        id (BlockBackend name), else a node-name the platform chose, else the qdev path."""
        return self.id or self.backend or self.stable_node or self.qdev

    @property
    def on_peripheral(self) -> bool:
        """True for a device the user added (``-device``), not a board's own (``pflash``)."""
        return self.qdev.startswith(_PERIPHERAL) or not self.qdev.startswith("/")

    def names(self) -> frozenset[str]:
        """Every name that selects this disk: its stable names, and the node-name even if QEMU
        generated it (the CLI contract accepts any node-name; forgeqmp never reports it)."""
        return frozenset(n for n in (self.id, self.qdev, self.backend, self.node) if n)

    @property
    def unforgeable_reason(self) -> str | None:
        """Why this disk cannot be forged, or None if it can."""
        if self.removable:
            return "it is a removable-media device (CD-ROM or floppy)"
        if self.node is None or self.file is None:
            return "it has no medium inserted"
        if self.read_only:
            return "it is read-only"
        return None


def disks_from_query(
    query_block: Iterable[Mapping[str, Any]], bootindexes: Mapping[str, int] | None = None
) -> tuple[Disk, ...]:
    """Build the disk list from ``query-block``; ``bootindexes`` maps qdev paths to their
    bootindex (from ``qom-get``), -1 or missing meaning none."""
    result = []
    for entry in query_block:
        qdev = str(entry.get("qdev") or "")
        if not qdev:
            continue  # a backend without a device (e.g. -drive if=none never attached)
        inserted = entry.get("inserted")
        image = (inserted or {}).get("image", {})
        boot = (bootindexes or {}).get(qdev)
        result.append(
            Disk(
                id=_device_id(qdev),
                qdev=qdev,
                node=str(inserted["node-name"]) if inserted else None,
                file=str(inserted.get("file")) if inserted else None,
                format=str(inserted.get("drv")) if inserted else None,
                virtual_size=int(image["virtual-size"]) if "virtual-size" in image else None,
                read_only=bool(inserted.get("ro", False)) if inserted else False,
                removable=bool(entry.get("removable", False)),
                backing_depth=int(inserted.get("backing_file_depth", 0)) if inserted else 0,
                bootindex=boot if boot is not None and boot >= 0 else None,
                backend=str(entry.get("device") or "") or None,
                options=options_of(inserted) if inserted else None,
            )
        )
    return tuple(result)


@attrs.frozen
class Selection:
    """The disks chosen for a forge, and the disks left out (they keep post-enable writes)."""

    forged: tuple[Disk, ...]
    unforged: tuple[Disk, ...]

    @property
    def warnings(self) -> tuple[str, ...]:
        """What a caller should be told about this choice."""
        if not self.unforged:
            return ()
        names = ", ".join(d.name for d in self.unforged)
        return (
            f"disks not in the forge keep their writes on discard while memory goes back to the "
            f"moment of enable, so the guest may see them inconsistent: {names}",
        )


#: The rule of a disk choice: name disks, or choose all of them, not both (the library's
#: ``disks``/``all_disks``, the CLI's ``--disk``/``--all-disks``).
DISK_CHOICE_RULE = "name disks (--disk) or choose all disks (--all-disks), not both"


def check_disk_choice(names: object, *, all_disks: bool) -> None:
    """Refuse a choice that both names disks (``names`` not None) and asks for all of them:
    :class:`~forgeqmp.errors.InvalidArgument` with :data:`DISK_CHOICE_RULE`."""
    if names is not None and all_disks:
        raise InvalidArgument(DISK_CHOICE_RULE)


def select_disks(
    disks: Sequence[Disk], names: Sequence[str] | None = None, *, all_disks: bool = False
) -> Selection:
    """Resolve the caller's choice.

    - ``names`` given: each must name a disk (qdev id, qdev path or node-name), else
      :class:`UnknownDisk`; each must be forgeable, else :class:`DiskNotForgeable`.
    - ``all_disks``: every forgeable disk (CD-ROMs and read-only disks are left out).
    - neither: the primary disk, i.e. the lowest bootindex, else the first disk device (a
      board's own device such as a UEFI vars store on pflash only if there is no other).

    :raises NoDiskSelected: the choice resolves to no disk.
    """
    check_disk_choice(names, all_disks=all_disks)
    if names is not None:
        chosen: list[Disk] = []
        for name in names:
            match = [d for d in disks if name in d.names()]
            if not match:
                raise UnknownDisk(name, sorted(d.name for d in disks))
            disk = match[0]
            if disk.unforgeable_reason:
                raise DiskNotForgeable(f"disk {name!r} cannot be forged: {disk.unforgeable_reason}")
            if disk not in chosen:
                chosen.append(disk)
        if not chosen:
            raise NoDiskSelected("no disk was selected: name at least one disk, or choose all")
    elif all_disks:
        chosen = [d for d in disks if d.unforgeable_reason is None]
        if not chosen:
            raise NoDiskSelected(
                "this VM has no writable disk to forge (CD-ROMs and read-only "
                "disks cannot be forged)"
            )
    else:
        candidates = [d for d in disks if not d.removable and d.node is not None]
        if not candidates:
            raise NoDiskSelected("this VM has no disk device with a medium; nothing to forge")
        booting = [d for d in candidates if d.bootindex is not None]
        added = [d for d in candidates if d.on_peripheral]
        primary = (
            min(booting, key=lambda d: d.bootindex or 0) if booting else (added or candidates)[0]
        )
        if primary.unforgeable_reason:
            raise DiskNotForgeable(
                f"the primary disk {primary.name!r} cannot be forged: {primary.unforgeable_reason}; "
                "name the disks to forge"
            )
        chosen = [primary]
    unforged = tuple(d for d in disks if d not in chosen and d.unforgeable_reason is None)
    return Selection(forged=tuple(chosen), unforged=unforged)
