"""Whether the QEMU of a session runs: its QMP socket, and its process.

"Not running" is decided strictly (:func:`qemu_down`): nobody listens on the QMP socket *and*
no process runs the recorded command line. A QEMU that runs but does not answer is never treated
as stopped: offline operations would write into images it has open.
"""

from __future__ import annotations

import contextlib
import socket

from forgeqmp.adapters.process import describe_process, is_alive
from forgeqmp.core.argv import active_argv, cold_argv, incoming_argv
from forgeqmp.core.record import SessionRecord
from forgeqmp.errors import PrerequisiteError

__all__ = ["qemu_down", "qmp_listening", "recorded_qemu_alive"]


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
