"""Preflight: what enable checks before it changes anything, so that it never starts a session
it could not finish.

- **Free space.** The memory file goes to the state dir; it is sized from the guest's RAM
  (``query-memory-size-summary``: base + hotplugged memory) plus :data:`MEMORY_MARGIN` for the
  RAM QEMU adds beside the guest's (video memory, ROMs) and the device state. A mapped-ram file
  is RAM-sized (sparse, but a guest that touched all its memory fills it); a precopy stream holds
  each touched page once, plus the pages saved again because the guest rewrote them during the
  save: a converging save stays below the RAM's size (measured 200-274 MiB for a 512 MiB guest
  rewriting 64 MiB in a loop, both builds), one that does not converge can exceed it (840 MiB on
  7.2 with the save throttled to 200 MB/s) until the convergence steps end it; that rare case
  fails with ENOSPC during the save and enable undoes everything. Each overlay needs
  :data:`OVERLAY_MINIMUM` where it goes. Needs on one file system are added up (the memory file
  and overlays often share one).
- **Migration blockers.** QEMU lists why it cannot migrate now in ``query-migrate``'s
  ``blocked-reasons`` (a 9p share mounted by the guest, an ivshmem peer, a VFIO device...):
  the memory save would fail, so enable refuses before it creates any overlay, with QEMU's words.
  Both QEMU 7.2 and 10.0 have that member (see their recorded schemas); a QEMU without it (before
  6.0) can only tell at ``migrate``, where the failed save is undone.

Dirty bitmaps need no check: QEMU's ``block-commit`` marks the clusters it merges in every
enabled bitmap of the base, and the base is not written during a session, so persistent bitmaps
show the writes since enable after commit and stay as they were after discard (tested on both
builds).

The decisions are pure functions of QEMU's replies and of the measured free space;
:func:`forgeqmp.adapters.preflight.check_enable` gathers both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from forgeqmp.core.plans.enable import EnablePlan
from forgeqmp.errors import InsufficientSpace, MigrationBlocked

__all__ = [
    "MEMORY_MARGIN",
    "OVERLAY_MINIMUM",
    "FreeSpace",
    "SpaceNeed",
    "check_migratable",
    "check_space",
    "guest_ram_bytes",
    "migration_blockers",
    "space_needs",
]

MiB = 1 << 20

#: Room for the memory file beyond the guest's RAM: the RAM blocks QEMU adds (a VGA card's 16 MiB
#: of video memory, ROMs, ACPI tables) and the device state, with room to spare.
MEMORY_MARGIN = 64 * MiB

#: Room each overlay needs where it goes. A fresh overlay takes ~0.2 MiB, then grows by every
#: cluster the guest writes during the session; with less than this, a few seconds of guest
#: writes fill the file system and QEMU pauses the guest (io-error). 64 MiB is one second of a
#: busy disk here, and small enough to never refuse a sane setup.
OVERLAY_MINIMUM = 64 * MiB


@attrs.frozen
class SpaceNeed:
    """Room enable needs in ``directory`` for ``what``."""

    directory: str
    what: str
    size: int


@attrs.frozen
class FreeSpace:
    """A file system, by device number, and the bytes an unprivileged writer may still use."""

    device: int
    available: int


def guest_ram_bytes(summary: Mapping[str, Any]) -> int:
    """The guest's RAM from ``query-memory-size-summary``: base plus hotplugged memory."""
    return int(summary.get("base-memory", 0)) + int(summary.get("plugged-memory", 0) or 0)


def space_needs(plan: EnablePlan, ram_bytes: int) -> tuple[SpaceNeed, ...]:
    """What enable will write, and where: the memory file and each overlay."""
    needs = [
        SpaceNeed(
            os.path.dirname(plan.memory_file),
            f"the memory file ({_mib(ram_bytes)} of guest RAM + {_mib(MEMORY_MARGIN)} for "
            "device state)",
            ram_bytes + MEMORY_MARGIN,
        )
    ]
    needs.extend(
        SpaceNeed(
            os.path.dirname(o.overlay_file),
            f"the overlay of disk {o.disk.name} (at least {_mib(OVERLAY_MINIMUM)} for the "
            "guest's writes during the session)",
            OVERLAY_MINIMUM,
        )
        for o in plan.overlays
    )
    return tuple(needs)


def check_space(needs: Iterable[SpaceNeed], measure: Callable[[str], FreeSpace]) -> None:
    """Refuse when a file system has less room than the needs placed on it, together.

    ``measure`` gives a directory's file system and free space
    (:func:`forgeqmp.adapters.preflight.free_space`).

    :raises InsufficientSpace: naming the file system's directories, what needs the room, how
        much is free, and what to do.
    """
    by_device: dict[int, tuple[FreeSpace, list[SpaceNeed]]] = {}
    for need in needs:
        space = measure(need.directory)
        by_device.setdefault(space.device, (space, []))[1].append(need)
    for space, placed in by_device.values():
        total = sum(n.size for n in placed)
        if total <= space.available:
            continue
        where = ", ".join(sorted({n.directory for n in placed}))
        what = "; ".join(n.what for n in placed)
        remedies = []
        if any(n.what.startswith("the memory file") for n in placed):
            remedies.append("choose a state dir on a larger file system (--state-dir)")
        if any(n.what.startswith("the overlay") for n in placed):
            remedies.append("put the overlays on a larger file system (--overlay-dir)")
        raise InsufficientSpace(
            f"not enough free space for this session on the file system of {where}: it needs "
            f"{_mib(total)} ({what}) and has {_mib(space.available)} free; free space there, or "
            + ", or ".join(remedies)
            + ". Nothing was changed"
        )


def migration_blockers(query_migrate: Mapping[str, Any]) -> tuple[str, ...]:
    """QEMU's reasons why it cannot migrate now (``query-migrate``'s ``blocked-reasons``);
    empty when there are none, or when this QEMU does not report them."""
    reasons = query_migrate.get("blocked-reasons") or ()
    return tuple(str(r) for r in reasons)


def check_migratable(query_migrate: Mapping[str, Any]) -> None:
    """Refuse when QEMU reports migration blockers: the memory save could not run.

    :raises MigrationBlocked: with QEMU's reasons and what to do.
    """
    reasons = migration_blockers(query_migrate)
    if reasons:
        raise MigrationBlocked(
            "QEMU cannot save this VM's memory state now, so forgeqmp could not discard a "
            "session: " + "; ".join(reasons) + ". Remove or detach what blocks migration "
            "(the device named, or unmount the share in the guest), then enable again. "
            "Nothing was changed",
            reasons,
        )


def _mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB" if size % MiB else f"{size // MiB} MiB"
