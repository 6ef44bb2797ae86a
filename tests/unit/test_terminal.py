"""The CLI's human output: live progress on a terminal (rich), JSON lines with --json, silence
when stdout is not a terminal, and the state colours of control panels."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console

from forgeqmp.cli import _Output
from forgeqmp.forge import ProgressEvent
from forgeqmp.terminal import STATE_STYLES, ProgressView, state_label, styled_report

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

ENABLE = [
    ProgressEvent("enable", "planned", {"disks": ["d0", "d1"]}),
    ProgressEvent("enable", "overlays-created"),
    ProgressEvent("enable", "saving-memory"),
    ProgressEvent("enable", "progress", {"done": 0, "total": 256 << 20, "bytes_per_second": 0}),
    ProgressEvent(
        "enable", "progress", {"done": 128 << 20, "total": 256 << 20, "bytes_per_second": 1 << 30}
    ),
    ProgressEvent("enable", "converging", {"downtime_limit_ms": 50, "after_seconds": 1.0}),
    ProgressEvent("enable", "converging", {"guest_paused": True, "after_seconds": 6.0}),
    ProgressEvent("enable", "snapshot-done", {"pause_ms": 14.2}),
    ProgressEvent(
        "enable", "active", {"pause_ms": 14.2, "memory_bytes": 90_000_000, "save_seconds": 0.41}
    ),
]
COMMIT = [
    ProgressEvent("commit", "progress", {"disk": "d0", "done": 10 << 20, "total": 40 << 20}),
    ProgressEvent("commit", "progress", {"disk": "d1", "done": 5 << 20, "total": 20 << 20}),
    ProgressEvent("commit", "disk-merged", {"disk": "d0"}),
    ProgressEvent("commit", "disk-merged", {"disk": "d1"}),
    ProgressEvent("commit", "committed"),
]
DISCARD = [
    ProgressEvent("discard", "stopping-qemu"),
    ProgressEvent("discard", "restoring-memory"),
    ProgressEvent("discard", "running", {"memory_restored": True, "resume_seconds": 1.25}),
]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def render(events: list[ProgressEvent]) -> str:
    stream = Tty()
    view = ProgressView(stream, console=Console(file=stream, force_terminal=True, width=120))
    for event in events:
        view.update(event)
    view.close()
    view.close()  # idempotent
    return ANSI.sub("", stream.getvalue())


def test_enable_shows_steps_and_the_memory_bar() -> None:
    text = render(ENABLE)
    for label in (
        "enable: planned (disks d0, d1)",
        "enable: overlays created",
        "enable: saving the memory state",
        "enable: the save does not converge (final pass may pause the guest up to 50 ms, 1 s "
        "after the first pass)",
        "enable: the save does not converge (guest paused until the save ends, 6 s after the "
        "first pass)",
        "enable: disks snapshotted (guest paused 14.2 ms)",
        "enable: session active (guest paused 14.2 ms, memory state 90.0 MB, in 0.41 s)",
    ):
        assert label in text
    assert "enable: memory state" in text
    assert "268.4/268.4 MB" in text  # the bar completes once the snapshot is done


def test_commit_shows_a_bar_per_disk() -> None:
    text = render(COMMIT)
    assert "commit: disk d0" in text
    assert "commit: disk d1" in text
    assert "41.9/41.9 MB" in text
    assert "21.0/21.0 MB" in text
    assert "commit: disk merged (disk d0)" in text
    assert "commit: committed" in text


def test_discard_shows_its_steps() -> None:
    text = render(DISCARD)
    assert "discard: stopping QEMU" in text
    assert "discard: restoring the memory state" in text
    assert "discard: VM running (resumed from memory, in 1.25 s)" in text


def test_json_lines_keep_their_shape() -> None:
    stream = Tty()
    out = _Output(True, stream)
    for event in ENABLE:
        out.progress(event)
    out.final({"state": "active"}, "ignored")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[:-1] == [e.as_dict() for e in ENABLE]
    assert lines[3] == {
        "event": "progress",
        "operation": "enable",
        "step": "progress",
        "done": 0,
        "total": 256 << 20,
        "bytes_per_second": 0,
    }
    assert lines[-1] == {"state": "active"}


def test_no_progress_when_not_a_terminal() -> None:
    stream = io.StringIO()
    out = _Output(False, stream)
    for event in ENABLE + COMMIT + DISCARD:
        out.progress(event)
    assert stream.getvalue() == ""
    out.final({"state": "committed"}, "forge session x: Committed")
    assert stream.getvalue() == "forge session x: Committed\n"


def test_progress_on_a_terminal_then_the_final_text() -> None:
    stream = Tty()
    out = _Output(False, stream)
    for event in DISCARD:
        out.progress(event)
    out.final({"state": "discarded"}, "forge session x: Discarded")
    text = ANSI.sub("", stream.getvalue())
    assert "discard: VM running" in text
    assert text.rstrip().endswith("forge session x: Discarded")


def test_state_colours() -> None:
    assert {s: STATE_STYLES[s].split()[-1] for s in STATE_STYLES} == {
        "creating": "blue",
        "committing": "blue",
        "discarding": "blue",
        "active": "yellow",
        "committed": "green",
        "discarded": "grey50",
        "failed": "red",
        "none": "dim",
    }
    text = styled_report("forge session x: Failed\n  error: Failed to x", "failed")
    assert [(span.start, span.end, str(span.style)) for span in text.spans] == [
        (17, 23, "bold red")
    ]
    assert state_label("none") == "no session"
    assert styled_report("no forge session", None).spans == []
