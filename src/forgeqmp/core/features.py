"""Feature detection: what the QEMU behind the socket can do, asked of QEMU itself.

forgeqmp never does version arithmetic to choose a path. It reads ``query-qmp-schema`` (commands,
their arguments, enum values) and ``query-migrate-capabilities`` and answers concrete questions:
can QEMU migrate to a passed fd? to ``file:``? with mapped-ram? pause before switchover?
The version is kept only to report it.

:func:`features_from_introspection` is pure (unit-tested on recorded schemas of QEMU 7.2 and 10.0);
:func:`forgeqmp.adapters.featureprobe.probe` gathers its inputs over QMP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

__all__ = ["Features", "QemuVersion", "Schema", "features_from_introspection"]


@attrs.frozen
class QemuVersion:
    """QEMU's version as reported by ``query-version`` (for reports; never used to pick a path)."""

    major: int
    minor: int
    micro: int
    package: str = ""

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.micro}"
        return f"{text} ({self.package.strip()})" if self.package.strip() else text

    @classmethod
    def from_qmp(cls, reply: Mapping[str, Any]) -> QemuVersion:
        """Parse the ``query-version`` reply."""
        q = reply["qemu"]
        return cls(int(q["major"]), int(q["minor"]), int(q["micro"]), str(reply.get("package", "")))


class Schema:
    """Read-only view of ``query-qmp-schema``: type names are opaque numbers there, so every
    question starts from a command or event name and follows member types."""

    def __init__(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._by_name: dict[str, Mapping[str, Any]] = {}
        self.commands: frozenset[str]
        self.events: frozenset[str]
        commands: set[str] = set()
        events: set[str] = set()
        for entry in entries:
            self._by_name[str(entry["name"])] = entry
            if entry.get("meta-type") == "command":
                commands.add(str(entry["name"]))
            elif entry.get("meta-type") == "event":
                events.add(str(entry["name"]))
        self.commands = frozenset(commands)
        self.events = frozenset(events)

    def _type(self, name: str | None) -> Mapping[str, Any] | None:
        return None if name is None else self._by_name.get(name)

    def _members(self, type_name: str | None) -> dict[str, str]:
        """Members of an object type, including those of all union variants."""
        entry = self._type(type_name)
        if entry is None or entry.get("meta-type") != "object":
            return {}
        members = {str(m["name"]): str(m["type"]) for m in entry.get("members", ())}
        for variant in entry.get("variants", ()):
            for name, mtype in self._members(str(variant["type"])).items():
                members.setdefault(name, mtype)
        return members

    def command_arguments(self, command: str) -> frozenset[str]:
        """The argument names of ``command`` (empty if the command does not exist)."""
        entry = self._type(command)
        if entry is None or entry.get("meta-type") != "command":
            return frozenset()
        return frozenset(self._members(str(entry.get("arg-type"))))

    def type_at(self, name: str, path: Sequence[str]) -> str | None:
        """Follow argument ``path`` (member names; arrays are stepped through) from a command or
        an event ``name``; the type name at its end, or None where the path does not exist."""
        entry = self._type(name)
        if entry is None:
            return None
        current: str | None = str(entry.get("arg-type"))
        for member in path:
            current = self._unwrap_array(current)
            current = self._members(current).get(member)
            if current is None:
                return None
        return self._unwrap_array(current)

    def _unwrap_array(self, type_name: str | None) -> str | None:
        entry = self._type(type_name)
        while entry is not None and entry.get("meta-type") == "array":
            type_name = str(entry["element-type"])
            entry = self._type(type_name)
        return type_name

    def enum_values(self, type_name: str | None) -> frozenset[str]:
        """Values of an enum type (empty if it is not an enum)."""
        entry = self._type(type_name)
        if entry is None or entry.get("meta-type") != "enum":
            return frozenset()
        return frozenset(str(v) for v in entry.get("values", ()))


@attrs.frozen
class Features:
    """What this QEMU offers forgeqmp, each flag derived from QEMU's own introspection."""

    version: QemuVersion
    #: Commands QEMU accepts.
    commands: frozenset[str]
    #: Migration capabilities QEMU knows (``query-migrate-capabilities``).
    migration_capabilities: frozenset[str]
    #: Transports of the ``migrate`` command's structured channels (e.g. ``file``), if any.
    migration_transports: frozenset[str]
    #: Parameters accepted by ``migrate-set-parameters``.
    migration_parameters: frozenset[str]
    #: Statuses the MIGRATION event can carry.
    migration_statuses: frozenset[str]
    #: Actions ``transaction`` can take.
    transaction_actions: frozenset[str]

    @property
    def fd_transport(self) -> bool:
        """``migrate`` to ``fd:<name>`` with an fd passed by ``getfd``."""
        return "getfd" in self.commands

    @property
    def file_transport(self) -> bool:
        """``migrate`` to ``file:<path>`` (including ``file:/dev/fdset/N`` with ``add-fd``)."""
        return "file" in self.migration_transports

    @property
    def fdset(self) -> bool:
        """fdsets (``add-fd``/``remove-fd``) for ``/dev/fdset/N`` paths."""
        return {"add-fd", "remove-fd"} <= self.commands

    @property
    def pause_before_switchover(self) -> bool:
        """The ``pause-before-switchover`` capability and the ``pre-switchover`` status."""
        return (
            "pause-before-switchover" in self.migration_capabilities
            and "pre-switchover" in self.migration_statuses
            and "migrate-continue" in self.commands
        )

    @property
    def mapped_ram(self) -> bool:
        """The ``mapped-ram`` capability (a RAM-sized sparse file; needs the ``file`` transport)."""
        return "mapped-ram" in self.migration_capabilities and self.file_transport

    @property
    def multifd(self) -> bool:
        """The ``multifd`` capability (parallel migration channels)."""
        return "multifd" in self.migration_capabilities

    @property
    def background_snapshot(self) -> bool:
        """The ``background-snapshot`` capability (save while running, write-protect faults)."""
        return "background-snapshot" in self.migration_capabilities

    @property
    def blockdev_set_active(self) -> bool:
        """``blockdev-set-active``: (in)activate block nodes explicitly."""
        return "blockdev-set-active" in self.commands

    @property
    def blockdev_snapshot_transaction(self) -> bool:
        """``transaction`` with ``blockdev-snapshot`` actions and ``blockdev-add`` for overlays."""
        return "blockdev-snapshot" in self.transaction_actions and "blockdev-add" in self.commands

    @property
    def block_commit(self) -> bool:
        """``block-commit`` of the active layer with the job commands to complete and dismiss it."""
        return {"block-commit", "job-complete", "job-dismiss", "query-jobs"} <= self.commands

    def as_dict(self) -> dict[str, Any]:
        """The answers as a flat JSON-able dict (for status output and bug reports)."""
        return {
            "version": str(self.version),
            "fd_transport": self.fd_transport,
            "file_transport": self.file_transport,
            "fdset": self.fdset,
            "pause_before_switchover": self.pause_before_switchover,
            "mapped_ram": self.mapped_ram,
            "multifd": self.multifd,
            "background_snapshot": self.background_snapshot,
            "blockdev_set_active": self.blockdev_set_active,
            "blockdev_snapshot_transaction": self.blockdev_snapshot_transaction,
            "block_commit": self.block_commit,
        }


def features_from_introspection(
    version: Mapping[str, Any],
    schema: Iterable[Mapping[str, Any]],
    capabilities: Iterable[Mapping[str, Any]],
) -> Features:
    """Build :class:`Features` from the replies of ``query-version``, ``query-qmp-schema`` and
    ``query-migrate-capabilities``. Pure: no I/O."""
    view = Schema(schema)
    transports = view.enum_values(view.type_at("migrate", ("channels", "addr", "transport")))
    statuses = view.enum_values(view.type_at("MIGRATION", ("status",)))
    actions = view.enum_values(view.type_at("transaction", ("actions", "type")))
    return Features(
        version=QemuVersion.from_qmp(version),
        commands=view.commands,
        migration_capabilities=frozenset(str(c["capability"]) for c in capabilities),
        migration_transports=transports,
        migration_parameters=view.command_arguments("migrate-set-parameters"),
        migration_statuses=statuses,
        transaction_actions=actions,
    )
