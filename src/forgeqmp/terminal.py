"""What the CLI shows a person, in plain text: the steps and transfers of an operation as lines,
sizes in binary units (MiB, GiB), the state's label. Needs nothing but the standard library.

Only the human side of the CLI comes through here: with ``--json`` the CLI prints JSON lines; when
its output is not a terminal (a log file, a pipe, a platform's agent), :class:`PlainProgress`
writes plain lines, one per step and at most one a second per transfer. On a terminal the CLI
draws live bars and colours with :mod:`forgeqmp.liveview` when rich is installed (``pip install
forgeqmp[cli]``), and these plain lines otherwise.
"""

from __future__ import annotations

import time
import types
from collections.abc import Mapping
from typing import Any, TextIO

from forgeqmp.core.progress import ProgressEvent

__all__ = [
    "STEP_LABELS",
    "PlainProgress",
    "binary_size",
    "print_plain_report",
    "seconds_text",
    "state_label",
    "step_line",
    "transfer_key",
]

#: How steps of :class:`~forgeqmp.core.progress.ProgressEvent` read on a terminal.
STEP_LABELS: Mapping[tuple[str, str], str] = types.MappingProxyType(
    {
        ("enable", "planned"): "planned",
        ("enable", "overlays-created"): "overlays created",
        ("enable", "saving-memory"): "saving the memory state",
        ("enable", "converging"): "the save does not converge",
        ("enable", "snapshot-done"): "disks snapshotted",
        ("enable", "active"): "session active",
        ("commit", "offline"): "QEMU is not running: merging with qemu-img",
        ("commit", "disk-merged"): "disk merged",
        ("commit", "committed"): "committed",
        ("discard", "stopping-qemu"): "stopping QEMU",
        ("discard", "restoring-memory"): "restoring the memory state",
        ("discard", "cold-start"): "starting the VM cold",
        ("discard", "running"): "VM running",
        ("discard", "discarded"): "discarded",
    }
)


def binary_size(size: float) -> str:
    """``size`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``268.4 MiB``... (a disk of "1 GiB"
    reads 1.0 GiB, not 1.1 GB)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def state_label(state: str) -> str:
    """A state as people read it: ``Active``, ``Committing``... (``none``: ``no session``)."""
    return "no session" if state == "none" else state.capitalize()


def print_plain_report(stream: TextIO, text: str, state: str | None) -> None:
    """Print ``text`` as it is: the report without colours (``state`` is what the coloured
    version, :func:`forgeqmp.liveview.print_report`, colours)."""
    del state
    stream.write(text + "\n")
    stream.flush()


def _detail(detail: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for key, value in detail.items():
        if key == "disks" and isinstance(value, list):
            parts.append("disks " + ", ".join(str(v) for v in value))
        elif key == "disk":
            parts.append(f"disk {value}")
        elif key == "pause_ms" and value is not None:
            parts.append(f"guest paused {value:.1f} ms")
        elif key == "memory_bytes" and isinstance(value, int):
            parts.append(f"memory state {binary_size(value)}")
        elif key in ("save_seconds", "resume_seconds") and value is not None:
            parts.append(f"in {value:.2f} s")
        elif key == "digest_seconds" and value is not None:
            parts.append(f"digest in {value:.2f} s")
        elif key == "hashed_while_saving" and isinstance(value, int):
            if value:
                parts.append(f"{binary_size(value)} hashed while saving")
        elif key == "downtime_limit_ms":
            parts.append(f"final pass may pause the guest up to {value} ms")
        elif key == "guest_paused" and value:
            parts.append("guest paused until the save ends")
        elif key == "after_seconds":
            parts.append(f"{value:g} s after the first pass")
        elif key == "memory_restored":
            parts.append("resumed from memory" if value else "memory not restored")
        elif value is not None:
            parts.append(f"{key.replace('_', ' ')}: {value}")
    return ", ".join(parts)


def seconds_text(value: float) -> str:
    """A duration for people: ``0.4 s``, ``12 s``, ``3 min 20 s``."""
    if value < 10:
        return f"{value:.1f} s"
    if value < 120:
        return f"{value:.0f} s"
    minutes, secs = divmod(round(value), 60)
    return f"{minutes} min {secs} s"


def transfer_key(event: ProgressEvent) -> tuple[str, str]:
    """(key, what) of a ``progress`` event: the memory save, or one disk's merge."""
    disk = event.detail.get("disk")
    if disk is None:
        return "memory", "memory state"
    return f"disk:{disk}", f"disk {disk}"


def step_line(event: ProgressEvent) -> tuple[str, str]:
    """(``operation: label``, detail) of a step event, as both displays print it."""
    label = STEP_LABELS.get((event.operation, event.step), event.step.replace("-", " "))
    return f"{event.operation}: {label}", _detail(event.detail)


class PlainProgress:
    """Progress as plain text lines, for output that is not a terminal: each step once, with the
    seconds since the command started, and each transfer (the memory save, a disk's merge) at
    most once per ``interval`` seconds, and once more when it completes. No colours, no cursor
    movement: a log file or a pipe reads it as it comes.
    """

    def __init__(self, stream: TextIO, *, interval: float = 1.0) -> None:
        self.stream = stream
        self.interval = interval
        self._t0 = time.monotonic()
        self._last: dict[str, float] = {}
        self._done: set[str] = set()

    def update(self, event: ProgressEvent) -> None:
        """Print ``event`` if it is a step, or a transfer's news worth a line."""
        now = time.monotonic()
        if event.step != "progress":
            what, detail = step_line(event)
            self._write(now, what + (f" ({detail})" if detail else ""))
            return
        key, what = transfer_key(event)
        done, total = event.detail.get("done"), event.detail.get("total")
        if not isinstance(done, int) or key in self._done:
            return
        complete = isinstance(total, int) and total > 0 and done >= total
        if not complete and now - self._last.get(key, -self.interval) < self.interval:
            return
        self._last[key] = now
        if complete:
            self._done.add(key)
        text = f"{event.operation}: {what} {binary_size(done)}"
        if isinstance(total, int) and total > 0:
            text += f" of {binary_size(total)} ({100 * done // total}%)"
        rate = event.detail.get("bytes_per_second")
        if isinstance(rate, int | float) and rate > 0:
            text += f", {binary_size(rate)}/s"
        eta = event.detail.get("eta_s")
        if not complete and isinstance(eta, int | float):
            text += f", ETA {seconds_text(eta)}"
        self._write(now, text)

    def _write(self, now: float, text: str) -> None:
        self.stream.write(f"{now - self._t0:7.2f} s  {text}\n")
        self.stream.flush()

    def close(self) -> None:
        """Nothing to stop: every line is already written (same interface as ProgressView)."""
