"""Every name forgeqmp makes that QEMU (or another tool looking at the host) sees (sans-IO).

A session's names all start with its *tag*, ``fq`` and the first 8 hex digits of the session id,
so that recover, the guard and the graph scan tell forgeqmp's nodes, jobs and fds from anyone
else's, and which session they belong to. QEMU limits node names to 31 characters: the longest
here (``fq<8 hex>-<n>-create-undo``) stays well under.

- node names: ``<tag>-<n>-file`` (the overlay's protocol node) and ``<tag>-<n>-fmt`` (its qcow2
  format node), ``n`` the disk's index in the session;
- job ids: ``<tag>-<n>-create`` (formatting the overlay), ``<tag>-<n>-create-undo`` (an undone
  enable's commit back), ``<tag>-<n>-commit`` (commit's merge);
- the memory file's fd name ``<tag>-memory`` and its fdset's opaque text
  ``forgeqmp <session id>``; the fd name ``forgeqmp-restore`` discard passes the memory file to
  the relaunched QEMU under;
- files: the overlay ``<base name>.forge-<8 hex>.qcow2`` and the memory file
  ``memory-<session id>.bin`` in the state dir.
"""

from __future__ import annotations

import os
import re
from typing import Final

__all__ = [
    "COMMIT_JOB_SUFFIX",
    "FORMAT_NODE_SUFFIX",
    "NODE_PATTERN",
    "OVERLAY_FILE_PATTERN",
    "RESTORE_FD_NAME",
    "commit_job",
    "create_job",
    "fdset_opaque",
    "file_node",
    "format_node",
    "job_prefix",
    "memory_fd_name",
    "memory_file_name",
    "overlay_file",
    "session_tag",
    "throttle_group",
    "undo_job",
]

#: The suffix of an overlay's format node (the node attached to the device).
FORMAT_NODE_SUFFIX: Final = "-fmt"
_FILE_NODE_SUFFIX: Final = "-file"
#: The end of every commit job id forgeqmp makes (``<tag>-<n>-commit``).
COMMIT_JOB_SUFFIX: Final = "-commit"
#: The name discard passes the memory file under to the relaunched QEMU (``fd:`` transport).
RESTORE_FD_NAME: Final = "forgeqmp-restore"

#: An overlay node of any session; group 1 is the session's 8 hex digits.
NODE_PATTERN: Final = re.compile(r"fq([0-9a-f]{8})-\d+-(?:fmt|file)")
#: An overlay file of any session; group 1 is the session's 8 hex digits.
OVERLAY_FILE_PATTERN: Final = re.compile(r".*\.forge-([0-9a-f]{8})\.qcow2")


def session_tag(session_id: str) -> str:
    """The prefix of every node, job and fd name a session creates in QEMU (``fq<8 hex>``)."""
    return f"fq{session_id.replace('-', '')[:8]}"


def job_prefix(session_id: str, index: int) -> str:
    """What the names of disk ``index``'s nodes and jobs start with (``<tag>-<n>``)."""
    return f"{session_tag(session_id)}-{index}"


def file_node(session_id: str, index: int) -> str:
    """The overlay's protocol (file) node of disk ``index``."""
    return job_prefix(session_id, index) + _FILE_NODE_SUFFIX


def format_node(session_id: str, index: int) -> str:
    """The overlay's qcow2 format node of disk ``index`` (attached to the device)."""
    return job_prefix(session_id, index) + FORMAT_NODE_SUFFIX


def create_job(session_id: str, index: int) -> str:
    """The job formatting disk ``index``'s overlay (``blockdev-create``)."""
    return job_prefix(session_id, index) + "-create"


def undo_job(create: str) -> str:
    """The job that moves a disk back off the overlay an undone enable made with ``create``."""
    return f"{create}-undo"


def commit_job(overlay_node: str) -> str:
    """The commit job of the disk whose overlay's format node is ``overlay_node``: named after
    the overlay, so a record's node names give it (``<tag>-<n>-commit``)."""
    return f"{overlay_node.removesuffix(FORMAT_NODE_SUFFIX)}{COMMIT_JOB_SUFFIX}"


def throttle_group(session_id: str, index: int) -> str:
    """The I/O throttle group a commit bounds disk ``index``'s guest writes in while it merges
    (its own group: a group the device shares with others is left as it is)."""
    return job_prefix(session_id, index) + "-throttle"


def memory_fd_name(session_id: str) -> str:
    """The name the memory file's fd is passed under (``getfd``, ``fd:`` transport)."""
    return f"{session_tag(session_id)}-memory"


def fdset_opaque(session_id: str) -> str:
    """The ``opaque`` text of the fdset holding the memory file (how recover finds it)."""
    return f"forgeqmp {session_id}"


def memory_file_name(session_id: str) -> str:
    """The memory file's name in the state dir."""
    return f"memory-{session_id}.bin"


def overlay_file(base_file: str, session_id: str, overlay_dir: str | None = None) -> str:
    """The overlay of the image ``base_file``: next to it, or in ``overlay_dir``."""
    base_dir, base_name = os.path.split(base_file)
    directory = overlay_dir if overlay_dir is not None else base_dir
    return os.path.join(os.path.abspath(directory), f"{base_name}.forge-{session_id[:8]}.qcow2")
