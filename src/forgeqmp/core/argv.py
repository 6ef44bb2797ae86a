"""The command lines of a VM during a session: pure rewriting of the recorded QEMU argv.

Discard stops the running QEMU and starts the same configuration again, either waiting for the
memory state (:func:`incoming_argv`: ``-incoming defer -S``) or cold (:func:`cold_argv`, the
fallback).

Hosting software keeps starting, stopping, restarting and killing VMs while a forge session is
Active. A VM stopped during an Active session is started with :func:`active_argv`: the recorded
command line with each forged disk's device attached to its overlay (backed by the original),
under the node names the session recorded, so commit and discard work on it as on the original
process. Starting it with its original command line would silently bypass the forge (the guest
would write into the originals the discard relies on). :func:`start_argv` chooses between the two.
A guest reset (``system_reset``) changes nothing below the guest: the disks stay on their
overlays.

While QEMU is not running, ``commit`` merges each overlay with ``qemu-img commit``
(:mod:`forgeqmp.adapters.qemuimg`), and ``discard`` starts the VM on the originals from the memory
file (or cold); whether it runs is decided by :func:`forgeqmp.adapters.qemuproc.qemu_down`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import State
from forgeqmp.errors import PrerequisiteError, SessionActive

__all__ = ["active_argv", "cold_argv", "incoming_argv", "start_argv"]

#: Options that take a value and make QEMU wait for or load a state; removed before relaunching.
_STATE_OPTIONS = frozenset({"-incoming", "-loadvm"})
#: Options without a value that keep the guest from running; removed for a cold start.
_PAUSE_OPTIONS = frozenset({"-S"})


def _strip(argv: Sequence[str], with_value: frozenset[str], flags: frozenset[str]) -> list[str]:
    result: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        dashed = "-" + name.lstrip("-") if name.startswith("-") else name
        if dashed in with_value:
            skip = "=" not in arg
            continue
        if dashed in flags:
            continue
        result.append(arg)
    return [argv[0], *result]


def incoming_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """The recorded argv, ready to receive the memory state: earlier ``-incoming``/``-loadvm``
    removed, ``-incoming defer -S`` added (the guest stays paused until forgeqmp's ``cont``)."""
    base = _strip(argv, _STATE_OPTIONS, _PAUSE_OPTIONS)
    return (*base, "-incoming", "defer", "-S")


def cold_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """The recorded argv for a cold boot: no state to load, no pause at start."""
    return tuple(_strip(argv, _STATE_OPTIONS, _PAUSE_OPTIONS))


_BLOCKDEV = frozenset({"-blockdev", "--blockdev"})
_DEVICE = frozenset({"-device", "--device"})


# --- QEMU key=value option strings ---------------------------------------------------------------


def _split_options(text: str) -> list[str]:
    """Split a QEMU ``key=value,...`` string on single commas (``,,`` is a literal comma)."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _join_options(parts: Sequence[str]) -> str:
    return ",".join(part.replace(",", ",,") for part in parts)


def _option(parts: Sequence[str], key: str) -> str | None:
    for part in parts:
        name, sep, value = part.partition("=")
        if sep and name == key:
            return value
    return None


def _node_name(value: str) -> str | None:
    """The node-name a ``-blockdev`` value defines (key=value or JSON form)."""
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            return None
        name = obj.get("node-name") if isinstance(obj, dict) else None
        return name if isinstance(name, str) else None
    return _option(_split_options(value), "node-name")


def _retarget_device(value: str, old: str, new: str) -> str | None:
    """The ``-device`` value with ``drive=old`` changed to ``drive=new``; None if not that drive."""
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("drive") != old:
            return None
        obj["drive"] = new
        return json.dumps(obj, separators=(",", ":"))
    parts = _split_options(value)
    if _option(parts, "drive") != old:
        return None
    return _join_options([f"drive={new}" if p == f"drive={old}" else p for p in parts])


def active_argv(record: SessionRecord) -> tuple[str, ...]:
    """The command line that starts the VM with each disk where the session has it: forged disks
    still on an overlay get a qcow2 node on that overlay, backed by the original's node, under the
    recorded node names, and their device attached to it. Merged disks stay on their originals.

    Start the VM with this while a session is Active (or a commit is unfinished); with the
    recorded original command line the guest would write straight into the originals.

    :raises PrerequisiteError: the recorded command line does not define the forged disks' nodes
        with ``-blockdev`` (a ``-drive`` configuration), so they cannot be retargeted safely.
    """
    argv = list(cold_argv(record.qemu.argv))
    for disk in record.disks:
        if disk.overlay_node is None or disk.overlay_file is None:
            continue
        file_node = disk.overlay_file_node or f"{disk.overlay_node}-file"
        defined = [
            i
            for i in range(len(argv) - 1)
            if argv[i] in _BLOCKDEV and _node_name(argv[i + 1]) == disk.device_node
        ]
        if not defined:
            raise PrerequisiteError(
                f"the recorded command line does not define node {disk.device_node!r} of disk "
                f"{disk.name} with -blockdev, so forgeqmp cannot point the disk at its overlay: "
                f"start QEMU with that disk on {disk.overlay_file} (qcow2, backed by "
                f"{disk.base_file}) yourself, then run 'forgeqmp recover'"
            )
        retargeted = False
        for i in range(len(argv) - 1):
            if argv[i] in _DEVICE:
                new = _retarget_device(argv[i + 1], disk.device_node, disk.overlay_node)
                if new is not None:
                    argv[i + 1] = new
                    retargeted = True
        if not retargeted:
            raise PrerequisiteError(
                f"no -device of the recorded command line uses drive={disk.device_node} (disk "
                f"{disk.name}); start QEMU with that disk on {disk.overlay_file} yourself"
            )
        at = defined[-1] + 2
        argv[at:at] = [
            "-blockdev",
            _join_options(
                ["driver=file", f"filename={disk.overlay_file}", f"node-name={file_node}"]
            ),
            "-blockdev",
            _join_options(
                [
                    "driver=qcow2",
                    f"file={file_node}",
                    f"backing={disk.device_node}",
                    f"node-name={disk.overlay_node}",
                ]
            ),
        ]
    return tuple(argv)


def start_argv(record: SessionRecord) -> tuple[str, ...]:
    """The command line that starts the VM of ``record``'s instance now without bypassing the
    forge: :func:`active_argv` while the session has disks on overlays (Active, or a commit or
    an Active session that failed), the recorded command line once it is over or reverted.

    :raises SessionActive: an operation is under way or was interrupted (or an enable failed
        without being undone): run ``forgeqmp recover`` first.
    :raises PrerequisiteError: the command line cannot be retargeted (see :func:`active_argv`).
    """
    phase = record.failure_phase if record.state is State.FAILED else record.state
    if record.state in (State.CREATING, State.COMMITTING, State.DISCARDING) or (
        record.state is State.FAILED and not record.rolled_back and phase is State.CREATING
    ):
        raise SessionActive(
            f"session {record.session_id} is {record.state.value} (step {record.step}): wait for "
            "the operation, or run 'forgeqmp recover' if it was interrupted, before starting QEMU"
        )
    on_overlays = (
        record.state is State.ACTIVE
        or (
            record.state is State.FAILED
            and not record.rolled_back
            and phase in (State.ACTIVE, State.COMMITTING)
        )
    ) and any(d.overlay_node is not None for d in record.disks)
    return active_argv(record) if on_overlays else cold_argv(record.qemu.argv)
