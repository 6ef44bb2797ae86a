"""The CLI's live display on a terminal, drawn with rich (the optional ``cli`` extra:
``pip install forgeqmp[cli]``): each step on its own line, a spinner on the step under way, bars
with bytes, rate and ETA for the memory save and each disk's merge, and the session's state in the
colours control panels use. The library never imports this module; the CLI does when rich is
installed, and falls back to :class:`forgeqmp.terminal.PlainProgress` otherwise.
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

from forgeqmp.core.progress import ProgressEvent
from forgeqmp.terminal import binary_size, seconds_text, state_label, step_line, transfer_key

__all__ = ["STATE_STYLES", "ProgressView", "print_report", "styled_report"]

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
        return Text(f"ETA {seconds_text(eta)}", style="progress.remaining")


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
        description, detail = step_line(event)
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
        key, what = transfer_key(event)
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
