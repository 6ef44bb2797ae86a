"""The preflight's I/O: what enable asks QEMU and the file systems before it changes anything.

The decisions, and why, are in :mod:`forgeqmp.core.preflight`; this module gathers their inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from forgeqmp.adapters.qmp import QMPConnection
from forgeqmp.core.plans.enable import EnablePlan
from forgeqmp.core.preflight import (
    FreeSpace,
    check_migratable,
    check_space,
    guest_ram_bytes,
    space_needs,
)

__all__ = ["check_enable", "free_space"]


def free_space(directory: str | os.PathLike[str]) -> FreeSpace:
    """The file system of ``directory`` and its free space (``f_bavail``: what is left to a
    non-root writer such as QEMU, without the blocks reserved for root)."""
    st = os.stat(directory)
    vfs = os.statvfs(directory)
    return FreeSpace(device=st.st_dev, available=vfs.f_bavail * vfs.f_frsize)


async def check_enable(
    conn: QMPConnection,
    plan: EnablePlan,
    measure: Callable[[str], FreeSpace] | None = None,
) -> None:
    """The preflight of enable, before it changes anything: migration blockers, then room for
    the memory file and the overlays (a few QMP queries and ``statvfs`` calls; ``measure``
    replaces :func:`free_space`).

    :raises MigrationBlocked: QEMU reports why it cannot migrate. Nothing changed.
    :raises InsufficientSpace: a file system lacks room. Nothing changed.
    """
    check_migratable(await conn.execute("query-migrate"))
    summary = await conn.execute("query-memory-size-summary")
    check_space(space_needs(plan, guest_ram_bytes(summary)), measure or free_space)
