"""Forge sessions seen in QEMU's own block graph, whatever state dir their record is in.

A session's record lives in one state dir; QEMU knows nothing of it. Another state dir (another
``--state-dir``, ``$HOME``, or spelling of the socket path), or a deleted record, would let a
second enable stack its overlays on the first session's and a discard give the guest disks from
before session 1 with memory from after it. So enable, the guard and ``status`` also look at the
block graph: forgeqmp names its overlay nodes ``fq<8 hex>-<n>-fmt``/``-file`` and its overlay
files ``<base>.forge-<8 hex>.qcow2``, the 8 hex digits being the start of the session id
(:func:`forgeqmp.core.plans.enable.plan_enable`). Any such node is an unfinished session.

Where its record is: QEMU keeps nothing forgeqmp could write a path into without changing the
VM, so forgeqmp searches the places it knows: the state dir in use and every state dir under the
default base (``~/.local/state/forgeqmp`` or ``$FORGEQMP_STATE_HOME``...), for a record of that
session (:func:`forgeqmp.adapters.recordstore.find_records`). A record kept elsewhere cannot be
found, and the message says so and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from forgeqmp.core import names

__all__ = ["GraphSession", "sessions_in_graph"]

_NODE = names.NODE_PATTERN
_FILE = names.OVERLAY_FILE_PATTERN


@attrs.frozen
class GraphSession:
    """One forge session QEMU's graph shows: its id's first 8 hex digits, nodes and files."""

    tag: str
    nodes: tuple[str, ...]
    files: tuple[str, ...]
    #: Records of this session found on this host (state-dir ``session.json`` paths).
    records: tuple[str, ...] = ()

    def describe(self) -> str:
        """What QEMU shows and where the record is, for an error message."""
        what = ", ".join((*self.nodes[:2], *self.files[:2]))
        where = (
            "its record is " + " and ".join(self.records)
            if self.records
            else "its record was not found in the state dirs forgeqmp knows (it was enabled "
            "with another --state-dir, or its record was deleted); finish it with "
            "'forgeqmp --state-dir DIR commit' or 'discard' through the state dir that enabled "
            "it, or 'recover' there"
        )
        return f"forge session {self.tag} is active in QEMU's block graph ({what}); {where}"


def sessions_in_graph(nodes: Iterable[Mapping[str, Any]]) -> tuple[GraphSession, ...]:
    """The sessions whose overlay nodes or files are in ``query-named-block-nodes``' reply."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for node in nodes:
        name = str(node.get("node-name") or "")
        file = str(node.get("file") or "")
        if m := _NODE.fullmatch(name):
            found.setdefault(m[1], ([], []))[0].append(name)
        if m := _FILE.fullmatch(file):
            files = found.setdefault(m[1], ([], []))[1]
            if file not in files:
                files.append(file)
    return tuple(
        GraphSession(tag, tuple(sorted(names)), tuple(files))
        for tag, (names, files) in sorted(found.items())
    )
