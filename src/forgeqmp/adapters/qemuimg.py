"""``qemu-img`` for the offline commit: merging overlays while QEMU is not running.

``commit`` of a session whose QEMU is stopped merges each overlay with ``qemu-img commit``
(:func:`qemu_img_commit_argv`), after checking the overlay is the one forgeqmp created.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import anyio

from forgeqmp.core.record import DiskRecord, SessionRecord
from forgeqmp.errors import FeatureMissing, ForgeFailed

__all__ = [
    "commit_overlay",
    "find_qemu_img",
    "overlay_problem",
    "qemu_img_commit_argv",
    "qemu_img_info_argv",
]


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
