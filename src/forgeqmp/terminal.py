"""What the CLI shows a person at a terminal: live progress and the session state in the colours
control panels use, rendered with rich.

Only the human side of the CLI comes through here: with ``--json`` the CLI prints JSON lines; on a
terminal, :class:`ProgressView` draws live bars; when its output is not a terminal (a log file, a
pipe, a platform's agent), :class:`PlainProgress` writes plain lines, one per step and at most one a
second per transfer (rich also drops colours there). Sizes are in binary units (MiB, GiB).
"""

from __future__ import annotations

import time
import types
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from forgeqmp.forge import ProgressEvent

__all__ = [
    "STATE_STYLES",
    "PlainProgress",
    "ProgressView",
    "binary_size",
    "print_report",
    "state_label",
    "styled_report",
]

#: The rich style of each state (``status --json``'s ``state``): working states blue, active
#: yellow, committed green, discarded grey, failed red.
STATE_STYLES: Mapping[str, str] = types.MappingProxyType(
    {
        "creating": "bold blue",
        "committing": "bold blue",
        "discarding": "bold blue",
        "active": "bold yellow",
        "committed": "bold green",
        "discarded": "grey50",
        "failed": "bold red",
        "none": "dim",
    }
)

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


def styled_report(text: str, state: str | None) -> Text:
    """``text`` (the CLI's description of a session) with the state label on its first line in
    the state's colour."""
    out = Text(text)
    style = STATE_STYLES.get(state or "")
    if style is not None and state is not None:
        label = state_label(state)
        at = text.split("\n", 1)[0].rfind(label)
        if at >= 0:
            out.stylize(style, at, at + len(label))
    return out


def print_report(stream: TextIO, text: str, state: str | None) -> None:
    """Print ``text`` with its state coloured (plain when ``stream`` is not a terminal)."""
    console = Console(file=stream, highlight=False, soft_wrap=True)
    console.print(styled_report(text, state))


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


class _BytesOnly(ProgressColumn):
    """A column shown for byte-counting tasks only (the step spinner has none)."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self._column = column

    def render(self, task: Task) -> Any:
        if not task.fields.get("bytes"):
            return Text("")
        return self._column.render(task)


class _Bytes(ProgressColumn):
    """``done/total`` of a byte-counting task, in binary units."""

    def render(self, task: Task) -> Any:
        total = "?" if task.total is None else binary_size(task.total)
        return Text(f"{binary_size(task.completed)}/{total}", style="progress.download")


class _Rate(ProgressColumn):
    """The transfer rate of a byte-counting task, in binary units a second."""

    def render(self, task: Task) -> Any:
        speed = task.finished_speed or task.speed
        return Text(
            "?" if speed is None else f"{binary_size(speed)}/s", style="progress.data.speed"
        )


class _Eta(ProgressColumn):
    """The time left of a byte-counting task, as the event's ``eta_s`` says (from the rate
    measured so far); empty when it is not known."""

    def render(self, task: Task) -> Any:
        eta = task.fields.get("eta_s")
        if task.finished or not isinstance(eta, int | float):
            return Text("")
        return Text(f"ETA {_seconds(eta)}", style="progress.remaining")


def _seconds(value: float) -> str:
    """A duration for people: ``0.4 s``, ``12 s``, ``3 min 20 s``."""
    if value < 10:
        return f"{value:.1f} s"
    if value < 120:
        return f"{value:.0f} s"
    minutes, secs = divmod(round(value), 60)
    return f"{minutes} min {secs} s"


def _transfer_key(event: ProgressEvent) -> tuple[str, str]:
    """(key, what) of a ``progress`` event: the memory save, or one disk's merge."""
    disk = event.detail.get("disk")
    if disk is None:
        return "memory", "memory state"
    return f"disk:{disk}", f"disk {disk}"


def _step_line(event: ProgressEvent) -> tuple[str, str]:
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
            what, detail = _step_line(event)
            self._write(now, what + (f" ({detail})" if detail else ""))
            return
        key, what = _transfer_key(event)
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
            text += f", ETA {_seconds(eta)}"
        self._write(now, text)

    def _write(self, now: float, text: str) -> None:
        self.stream.write(f"{now - self._t0:7.2f} s  {text}\n")
        self.stream.flush()

    def close(self) -> None:
        """Nothing to stop: every line is already written (same interface as ProgressView)."""


class ProgressView:
    """Live progress of one CLI command: each step on its own line with the time it was reached,
    a spinner on the step under way, and a bar with bytes and rate for the memory save (enable)
    and for each disk (commit).

    Feed it the command's :class:`~forgeqmp.core.progress.ProgressEvent` with :meth:`update`, and call
    :meth:`close` once the command ended (successfully or not).
    """

    def __init__(self, stream: TextIO, *, console: Console | None = None) -> None:
        self.console = console or Console(file=stream, highlight=False)
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}"),
            _BytesOnly(BarColumn(bar_width=30)),
            _BytesOnly(_Bytes()),
            _BytesOnly(_Rate()),
            _BytesOnly(_Eta()),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._started = False
        self._t0 = time.monotonic()
        self._bars: dict[str, TaskID] = {}
        self._step: TaskID | None = None

    def update(self, event: ProgressEvent) -> None:
        """Show ``event``."""
        if not self._started:
            self._progress.start()
            self._started = True
        if event.step == "progress":
            self._advance(event)
            return
        if event.step == "disk-merged":
            self._finish_bar(f"disk:{event.detail.get('disk')}")
        elif event.operation == "enable" and event.step in ("snapshot-done", "active"):
            self._finish_bar("memory")
        description, detail = _step_line(event)
        elapsed = time.monotonic() - self._t0
        line = Text(f"{elapsed:7.2f} s  ", style="dim")
        line.append(description)
        if detail:
            line.append(f" ({detail})", style="dim")
        self._progress.console.print(line)
        if self._step is None:
            self._step = self._progress.add_task(description, total=None)
        else:
            self._progress.update(self._step, description=description)

    def _advance(self, event: ProgressEvent) -> None:
        key, what = _transfer_key(event)
        total, done = event.detail.get("total"), event.detail.get("done")
        if key not in self._bars:
            self._bars[key] = self._progress.add_task(
                f"{event.operation}: {what}", total=total or None, bytes=True
            )
        self._progress.update(
            self._bars[key],
            total=total or None,
            completed=done or 0,
            eta_s=event.detail.get("eta_s"),
        )

    def _finish_bar(self, key: str) -> None:
        task = self._bars.get(key)
        if task is not None:
            total = self._progress.tasks[self._index(task)].total
            self._progress.update(task, completed=total or 0, total=total or 1)

    def _index(self, task: TaskID) -> int:
        return next(i for i, t in enumerate(self._progress.tasks) if t.id == task)

    def close(self) -> None:
        """Stop the live display (idempotent); the lines printed stay on the terminal."""
        if not self._started:
            return
        self._started = False
        if self._step is not None:
            self._progress.update(self._step, total=1, completed=1)
        self._progress.stop()
