"""The QMP plan of discard's memory restore, run on the QEMU started again with ``-incoming
defer -S`` on the original images (sans-IO).

1. ``migrate-set-capabilities``: ``events`` and the capabilities of the save that the load needs
   too (``mapped-ram``, ``multifd``); with ``multifd``, ``migrate-set-parameters``
   ``multifd-channels`` :data:`RESTORE_MULTIFD_CHANNELS` (the value before it is read first);
2. the memory file passed as an fd: by ``add-fd`` into an fdset for the ``file:`` transport, by
   ``getfd`` for ``fd:`` (the one URI builder, :func:`forgeqmp.core.plans.enable.migration_uri`);
3. ``migrate-incoming`` with that URI; wait for the ``MIGRATION`` event ``completed``;
4. ``cont`` (:data:`~forgeqmp.core.plans.common.CONT`), once the memory file verified;
5. :meth:`RestorePlan.after_resume`: ``remove-fd`` of the fdset (QEMU would keep the deleted
   file, guest RAM, open while the VM runs), and the capabilities turned off again (the
   relaunched QEMU is the platform's VM: its next migration must not inherit
   ``multifd``/``mapped-ram``), then ``multifd-channels`` set back. None of them touches the
   guest, so they follow ``cont`` rather than keep the VM down, and none failing undoes a restore
   that succeeded.

Before any of it the old QEMU is stopped (:data:`~forgeqmp.core.plans.common.QUIT`) and the
machine type compared with the record (:data:`~forgeqmp.core.plans.common.QUERY_MACHINE_TYPE`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from forgeqmp.core import names
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.common import remove_fdset
from forgeqmp.core.plans.enable import Transport, migration_uri
from forgeqmp.core.record import SessionRecord

__all__ = [
    "DEFAULT_MULTIFD_CHANNELS",
    "RESTORE_CAPABILITIES",
    "RESTORE_MULTIFD_CHANNELS",
    "RestorePlan",
    "plan_restore",
]

#: Capabilities of the save that the restoring QEMU must also have.
RESTORE_CAPABILITIES: Final = frozenset({"mapped-ram", "multifd"})
#: The multifd channels a ``mapped-ram`` file is loaded with (a ``file:`` load may use another
#: count than the save: each channel reads its pages at their fixed offsets). More channels than
#: cores load faster: 2 GiB on 2 cores (``python -m benchmarks.verifycost``-style interleaved
#: runs, session 15), load phase median 0.79 s with QEMU's 2 channels, 0.67 s with 4, 0.60 s
#: with 8, 0.56 s with 16, 0.46-0.49 s with 32; 64 and 128 no better than 32.
RESTORE_MULTIFD_CHANNELS: Final = 32
#: QEMU's own ``multifd-channels`` (what recover sets back when it finds the restore's).
DEFAULT_MULTIFD_CHANNELS: Final = 2


@attrs.frozen
class RestorePlan:
    """Everything the memory restore sends to the relaunched QEMU."""

    session_id: str
    memory_file: str
    transport: Transport
    #: Turned on for the load and off after it, in this order.
    capabilities: tuple[str, ...]
    fd_name: str = names.RESTORE_FD_NAME
    #: ``multifd-channels`` for the load (None: no multifd, the parameter is left alone).
    multifd_channels: int | None = None

    @property
    def uses_fdset(self) -> bool:
        """True when the file is passed by ``add-fd`` (``file:`` URI), False for ``getfd``."""
        return self.transport is Transport.FDSET_FILE

    @property
    def fdset_opaque(self) -> str:
        """The ``opaque`` text of the fdset (recover finds a session's fdsets by it)."""
        return names.fdset_opaque(self.session_id)

    def _capabilities(self, state: bool) -> Command:
        return Command(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": c, "state": state} for c in self.capabilities]},
        )

    def set_capabilities(self) -> Command:
        """Before the load: the capabilities the save had that the load needs."""
        return self._capabilities(True)

    def reset_capabilities(self) -> Command:
        """After the load: the same capabilities off again (QEMU's defaults)."""
        return self._capabilities(False)

    def set_parameters(self) -> Command | None:
        """Before the load, once the parameters were read: the load's ``multifd-channels``;
        None without multifd."""
        if self.multifd_channels is None:
            return None
        return Command("migrate-set-parameters", {"multifd-channels": self.multifd_channels})

    def reset_parameters(self, before: Mapping[str, Any]) -> Command | None:
        """After the load: ``multifd-channels`` as ``before`` (``query-migrate-parameters``
        before :meth:`set_parameters`) had it; None without multifd."""
        if self.multifd_channels is None:
            return None
        previous = before.get("multifd-channels", DEFAULT_MULTIFD_CHANNELS)
        return Command("migrate-set-parameters", {"multifd-channels": previous})

    def migration_uri(self, fdset_id: int | None) -> str:
        """The URI of the memory file as the relaunched QEMU sees it."""
        return migration_uri(self.transport, fdset_id=fdset_id, fd_name=self.fd_name)

    def migrate_incoming(self, fdset_id: int | None) -> Command:
        """Load the memory state (the guest stays paused: QEMU runs with ``-S``)."""
        return Command("migrate-incoming", {"uri": self.migration_uri(fdset_id)})

    def release(self, fdset_id: int | None) -> Command | None:
        """What gives the file back once loaded: ``remove-fd`` of the fdset; None for ``fd:``
        (the load closes a ``getfd`` descriptor itself)."""
        return remove_fdset(fdset_id) if fdset_id is not None else None

    def after_resume(
        self, fdset_id: int | None, parameters_before: Mapping[str, Any] | None = None
    ) -> tuple[Command, ...]:
        """What follows ``cont`` once the state loaded: the file given back (:meth:`release`),
        then the capabilities off again (:meth:`reset_capabilities`), then the parameters as
        ``parameters_before`` had them (:meth:`reset_parameters`)."""
        release = self.release(fdset_id)
        parameters = self.reset_parameters(parameters_before or {})
        return (
            *(() if release is None else (release,)),
            self.reset_capabilities(),
            *(() if parameters is None else (parameters,)),
        )


def plan_restore(record: SessionRecord) -> RestorePlan:
    """The restore of ``record``'s memory file, with the transport and capabilities of its save.

    :raises ValueError: the record has no memory file.
    """
    memory = record.memory
    if memory is None:
        raise ValueError(f"session {record.session_id} recorded no memory file to restore")
    transport = (
        Transport.FDSET_FILE if memory.transport == Transport.FDSET_FILE.value else Transport.FD
    )
    capabilities = ("events", *(c for c in memory.capabilities if c in RESTORE_CAPABILITIES))
    return RestorePlan(
        session_id=record.session_id,
        memory_file=memory.path,
        transport=transport,
        capabilities=capabilities,
        multifd_channels=RESTORE_MULTIFD_CHANNELS if "multifd" in capabilities else None,
    )
