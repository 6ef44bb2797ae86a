"""The block options of a forged disk: kept on its overlay during a session, put back on the
original after commit (sans-IO).

What QEMU does (measured on 7.2 and 10.0, legacy ``-drive ...,detect-zeroes=unmap,discard=unmap,
cache=none,aio=native,throttling.iops-total=N``):

- ``blockdev-snapshot`` reopens the original read-only, and that reopen resets ``detect-zeroes``
  to ``off``: for ``-drive`` QEMU sets it outside the node's options, so no reopen keeps it. The
  commit's pivot reopens it read-write again, still ``off``: after a plain snapshot + commit,
  ``query-block`` shows ``detect_zeroes: off``. Cache mode, ``discard``, ``aio`` and read-only
  survive (they are in the node's open flags or its file child's options).
- An overlay added by ``blockdev-add`` gets QEMU's defaults (``detect-zeroes=off``, cached I/O,
  ``discard=ignore``, ``aio=threads``), so the guest's writes during the session would behave
  otherwise than before enable. Throttling, the throttle group and the iothread belong to the
  device's BlockBackend and follow the device onto the overlay.

So forgeqmp reads what QEMU shows of the original (``detect_zeroes``, ``cache``) plus, from the
VM's command line, what QEMU does not show (``discard``, ``aio``), gives the overlay's nodes the
same, and after the pivot ``blockdev-reopen``-s the original with its ``detect-zeroes`` when QEMU
reset it. ``blockdev-reopen`` needs the node's ``file`` child by name: it comes from
``x-debug-query-block-graph`` (present in 7.2 and 10.0; feature-probed, never assumed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from forgeqmp.core.plans.command import Command

__all__ = [
    "BlockOptions",
    "argv_block_options",
    "child_of",
    "options_of",
    "options_restored",
    "reopen_command",
]

_DETECT_ZEROES = ("off", "on", "unmap")
_DISCARD = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
_AIO = ("threads", "native", "io_uring")


@attrs.frozen
class BlockOptions:
    """The options of a disk's node that change how the guest's writes reach the image."""

    detect_zeroes: str = "off"
    cache_direct: bool = False
    cache_no_flush: bool = False
    #: ``ignore`` or ``unmap``; None when neither QEMU nor the command line tells.
    discard: str | None = None
    #: ``threads``, ``native`` or ``io_uring``; None when the command line does not tell.
    aio: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record's form (a flat JSON object)."""
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> BlockOptions | None:
        """The inverse of :meth:`to_json`; None for a record without options."""
        if value is None:
            return None
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})

    def with_given(self, given: Mapping[str, str] | None) -> BlockOptions:
        """These options completed by what the command line gives (``discard``, ``aio``)."""
        if not given:
            return self
        discard = _DISCARD.get(given.get("discard", ""))
        aio = given.get("aio")
        return attrs.evolve(
            self,
            discard=self.discard or discard,
            aio=self.aio or (aio if aio in _AIO else None),
        )

    def _cache(self) -> dict[str, bool]:
        return {"direct": self.cache_direct, "no-flush": self.cache_no_flush}

    def _discard(self) -> str | None:
        # QEMU refuses detect-zeroes=unmap without discard=unmap: the one implies the other.
        return "unmap" if self.detect_zeroes == "unmap" else self.discard

    def file_node_options(self) -> dict[str, Any]:
        """What the overlay's ``file`` node gets besides its driver, name and filename."""
        options: dict[str, Any] = {"cache": self._cache()}
        if (discard := self._discard()) is not None:
            options["discard"] = discard
        if self.aio is not None and (self.aio != "native" or self.cache_direct):
            options["aio"] = self.aio  # native needs O_DIRECT; QEMU refuses it otherwise
        return options

    def format_node_options(self) -> dict[str, Any]:
        """What the overlay's qcow2 node gets besides its driver, name, file and backing."""
        options: dict[str, Any] = {"cache": self._cache(), "detect-zeroes": self.detect_zeroes}
        if (discard := self._discard()) is not None:
            options["discard"] = discard
        return options


def _split_keyvals(text: str) -> dict[str, str]:
    """QEMU's ``key=value,key=value`` (``,,`` is a literal comma); a bare first word is ignored."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    return dict(p.split("=", 1) for p in parts if "=" in p)


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, Mapping):
            flat.update(_flatten(item, f"{prefix}{key}."))
        elif isinstance(item, bool):
            flat[prefix + key] = "on" if item else "off"
        else:
            flat[prefix + key] = str(item)
    return flat


def _blockdev_options(arg: str) -> dict[str, str]:
    if arg.lstrip().startswith("{"):
        try:
            value = json.loads(arg)
        except ValueError:
            return {}
        return _flatten(value) if isinstance(value, Mapping) else {}
    return _split_keyvals(arg)


def argv_block_options(argv: Sequence[str]) -> dict[str, dict[str, str]]:
    """The options each ``-drive`` (by its ``id``, which is the BlockBackend name QEMU reports
    as ``device``) and each ``-blockdev`` (by its ``node-name``) gives on the command line.

    For a ``-blockdev`` format node, the ``file`` child's options are merged in when the child
    is another ``-blockdev`` named by ``file=NAME`` (what ``aio`` and ``discard`` usually need).
    """
    drives: dict[str, dict[str, str]] = {}
    nodes: dict[str, dict[str, str]] = {}
    args = list(argv)
    for i, arg in enumerate(args[:-1]):
        value = args[i + 1]
        if arg in ("-drive", "--drive"):
            options = _split_keyvals(value)
            if "id" in options:
                drives[options["id"]] = options
        elif arg in ("-blockdev", "--blockdev"):
            options = _blockdev_options(value)
            if "node-name" in options:
                nodes[options["node-name"]] = options
    result = dict(drives)
    for name, options in nodes.items():
        merged = dict(options)
        child = options.get("file")
        if child in nodes:
            for key in ("aio", "discard", "cache.direct", "cache.no-flush"):
                merged.setdefault(key, nodes[child].get(key, ""))
            merged = {k: v for k, v in merged.items() if v != ""}
        result.setdefault(name, merged)
    return result


def options_of(inserted: Mapping[str, Any], given: Mapping[str, str] | None = None) -> BlockOptions:
    """A node's options: ``inserted`` is its ``query-block``/``query-named-block-nodes`` entry,
    ``given`` what the command line says of it (:func:`argv_block_options`)."""
    cache = inserted.get("cache") or {}
    detect = str(inserted.get("detect_zeroes") or "off")
    return BlockOptions(
        detect_zeroes=detect if detect in _DETECT_ZEROES else "off",
        cache_direct=bool(cache.get("direct", False)),
        cache_no_flush=bool(cache.get("no-flush", False)),
        discard="unmap" if detect == "unmap" else None,
    ).with_given(given)


def options_restored(wanted: BlockOptions, inserted: Mapping[str, Any]) -> bool:
    """True when the node shows every option QEMU shows as ``wanted`` has it."""
    now = options_of(inserted)
    return (now.detect_zeroes, now.cache_direct, now.cache_no_flush) == (
        wanted.detect_zeroes,
        wanted.cache_direct,
        wanted.cache_no_flush,
    )


def child_of(graph: Mapping[str, Any], node: str, role: str) -> str | None:
    """The node-name of ``node``'s child ``role`` (``file``, ``backing``) in the reply of
    ``x-debug-query-block-graph``; None when it has none."""
    ids = {n["id"]: n["name"] for n in graph.get("nodes", [])}
    parent = next((n["id"] for n in graph.get("nodes", []) if n["name"] == node), None)
    for edge in graph.get("edges", []):
        if edge.get("parent") == parent and edge.get("name") == role:
            return ids.get(edge.get("child"))
    return None


_NODE_NAME = re.compile(r"#?[A-Za-z][A-Za-z0-9_.-]{0,31}")


def reopen_command(node: str, options: BlockOptions) -> Command | None:
    """The command that gives the (writable) node ``node`` back its ``detect-zeroes``: HMP's
    ``qemu-io NODE "reopen -w -o detect-zeroes=X"`` through ``human-monitor-command``.

    Why not ``blockdev-reopen``: it refuses every node whose name QEMU generated ("Cannot change
    the option 'node-name'", measured on 7.2 and 10.0: a legacy ``-drive`` has only such nodes),
    and as a full reopen it would reset every option it is not given to its default. qemu-io's
    ``reopen`` keeps the node's other options (the same as QEMU's own read-only/read-write
    reopens) and changes only the one given. None for a name that is not a QEMU node-name
    (nothing may be quoted into an HMP command line)."""
    if not _NODE_NAME.fullmatch(node) or options.detect_zeroes not in _DETECT_ZEROES:
        return None
    line = f'qemu-io {node} "reopen -w -o detect-zeroes={options.detect_zeroes}"'
    return Command("human-monitor-command", {"command-line": line})
