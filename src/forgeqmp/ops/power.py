"""Power operations during a session: whether QEMU runs, how to start it without bypassing the
forge, and merging overlays while it is stopped.

Hosting software keeps starting, stopping, restarting and killing VMs while a forge session is
Active. The session stays correct across all of them:

- a guest reset (``system_reset``) changes nothing below the guest: the disks stay on their
  overlays;
- a VM stopped during an Active session is started with :func:`active_argv`: the recorded command
  line with each forged disk's device attached to its overlay (backed by the original), under the
  node names the session recorded, so commit and discard work on it as on the original process.
  Starting it with its original command line would silently bypass the forge (the guest would
  write into the originals the discard relies on);
- while QEMU is not running, ``commit`` merges each overlay with ``qemu-img commit``
  (:func:`qemu_img_commit_argv`), and ``discard`` starts the VM on the originals from the memory
  file (or cold).

"Not running" is decided strictly (:func:`qemu_down`): nobody listens on the QMP socket *and*
no process runs the recorded command line. A QEMU that runs but does not answer is never treated
as stopped: offline operations would write into images it has open.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Mapping, Sequence

import anyio

from forgeqmp.adapters.launcher import cold_argv, incoming_argv
from forgeqmp.adapters.process import describe_process, is_alive
from forgeqmp.core.record import DiskRecord, SessionRecord
from forgeqmp.core.states import State
from forgeqmp.errors import FeatureMissing, ForgeFailed, PrerequisiteError, SessionActive

__all__ = [
    "active_argv",
    "commit_overlay",
    "find_qemu_img",
    "overlay_problem",
    "qemu_down",
    "qemu_img_commit_argv",
    "qemu_img_info_argv",
    "qmp_listening",
    "recorded_qemu_alive",
    "start_argv",
]

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


# --- is QEMU running? ----------------------------------------------------------------------------


def qmp_listening(socket_path: str) -> bool:
    """Whether something accepts connections on ``socket_path`` (a missing file or a refused
    connection: no; anything else, including a permission error: yes, to stay on the safe side).
    The probe connection is closed at once (QEMU just sees a client come and go)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(2.0)
        sock.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return False
    except OSError:
        return True
    finally:
        sock.close()
    return True


def recorded_qemu_alive(record: SessionRecord) -> bool:
    """Whether the recorded QEMU process (or one forgeqmp started in its place with the recorded
    command line) still runs: the pid is alive and runs one of the command lines of this session,
    so a reused pid is never mistaken for it."""
    pid = record.qemu.pid
    if not is_alive(pid):
        return False
    try:
        current = describe_process(pid).argv
    except (ProcessLookupError, PermissionError):
        return False
    argv = record.qemu.argv
    known = {tuple(argv), incoming_argv(argv), cold_argv(argv)}
    with contextlib.suppress(PrerequisiteError):
        known.add(active_argv(record))
    return current in known


def qemu_down(socket_path: str, record: SessionRecord | None) -> bool:
    """QEMU is provably not running for this instance: nobody listens on its QMP socket and the
    recorded process is gone."""
    if qmp_listening(socket_path):
        return False
    return record is None or not recorded_qemu_alive(record)


# --- qemu-img ------------------------------------------------------------------------------------


def find_qemu_img(record: SessionRecord) -> str:
    """The ``qemu-img`` of the QEMU build the session runs on: next to the recorded QEMU binary,
    else on the recorded or our PATH.

    :raises FeatureMissing: none is found.
    """
    binary = record.qemu.argv[0]
    candidates: list[str] = []
    if os.sep in binary:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(binary)), "qemu-img"))
    else:
        found = shutil.which(binary, path=record.qemu.env.get("PATH"))
        if found:
            candidates.append(os.path.join(os.path.dirname(found), "qemu-img"))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    for path in (record.qemu.env.get("PATH"), None):
        found = shutil.which("qemu-img", path=path)
        if found:
            return found
    raise FeatureMissing(
        "qemu-img is needed to merge overlays while QEMU is not running, and none was found next "
        f"to {binary} or on PATH: install qemu-utils, or start QEMU and commit live"
    )


def qemu_img_info_argv(qemu_img: str, image: str) -> list[str]:
    """``qemu-img info`` of one image (not its chain), as JSON."""
    return [qemu_img, "info", "--output=json", image]


def qemu_img_commit_argv(qemu_img: str, overlay: str) -> list[str]:
    """``qemu-img commit`` of a qcow2 overlay into its backing file. ``-d`` keeps the overlay as
    it is (it is deleted afterwards), so an interrupted commit can simply be run again."""
    return [qemu_img, "commit", "-q", "-d", "-f", "qcow2", overlay]


async def overlay_problem(qemu_img: str, disk: DiskRecord, env: Mapping[str, str]) -> str | None:
    """Why ``disk``'s overlay file is not a qcow2 overlay of its original (None when it is).

    An empty or unformatted file (an enable interrupted before the overlay was formatted) holds
    no guest data; anything else that is not the overlay forgeqmp created is never merged."""
    assert disk.overlay_file is not None
    try:
        if os.path.getsize(disk.overlay_file) == 0:
            return f"{disk.overlay_file} is empty (never formatted)"
    except OSError as exc:
        return f"{disk.overlay_file} cannot be read: {exc.strerror}"
    done = await anyio.run_process(
        qemu_img_info_argv(qemu_img, disk.overlay_file), check=False, env=dict(env)
    )
    if done.returncode != 0:
        text = done.stderr.decode(errors="replace").strip()
        return f"{disk.overlay_file} is not a readable image: {text}"
    try:
        info = json.loads(done.stdout)
    except ValueError:
        return f"qemu-img info printed no JSON for {disk.overlay_file}"
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if info.get("format") != "qcow2" or backing != disk.base_file:
        return (
            f"{disk.overlay_file} is not a qcow2 overlay of {disk.base_file} "
            f"(format {info.get('format')!r}, backing {backing!r})"
        )
    return None


async def commit_overlay(qemu_img: str, disk: DiskRecord, env: Mapping[str, str]) -> None:
    """Merge ``disk``'s overlay into its original with ``qemu-img commit`` (QEMU not running).

    :raises ForgeFailed: the overlay is not the one forgeqmp created, or qemu-img failed (its
        message is quoted); the overlay is left as it was, so the commit can be run again.
    """
    assert disk.overlay_file is not None
    problem = await overlay_problem(qemu_img, disk, env)
    if problem is not None:
        raise ForgeFailed(f"cannot merge the overlay of disk {disk.name}: {problem}")
    done = await anyio.run_process(
        qemu_img_commit_argv(qemu_img, disk.overlay_file), check=False, env=dict(env)
    )
    if done.returncode != 0:
        text = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise ForgeFailed(f"qemu-img commit of {disk.overlay_file} failed: {text}")


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
