"""The CLI's human output: live progress on a terminal (rich), JSON lines with --json, plain
progress lines when stdout is not a terminal, binary units, and the state colours of control
panels."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
from rich.console import Console

import forgeqmp
from forgeqmp import cli, terminal
from forgeqmp.cli import _Output
from forgeqmp.forge import ProgressEvent
from forgeqmp.liveview import STATE_STYLES, ProgressView, styled_report
from forgeqmp.terminal import PlainProgress, binary_size, state_label

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
        "enable",
        "active",
        {
            "pause_ms": 14.2,
            "memory_bytes": 90_000_000,
            "save_seconds": 0.41,
            "digest_seconds": 0.02,
            "hashed_while_saving": 64 << 20,
        },
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
        "enable: session active (guest paused 14.2 ms, memory state 85.8 MiB, in 0.41 s, "
        "digest in 0.02 s, 64.0 MiB hashed while saving)",
    ):
        assert label in " ".join(text.split())  # a long line wraps at the console's width
    assert "enable: memory state" in text
    assert "256.0 MiB/256.0 MiB" in text  # the bar completes once the snapshot is done


def test_a_save_not_hashed_while_saving_says_nothing_of_it() -> None:
    """mapped-ram (or no spare CPU): 0 bytes hashed ahead is no news."""
    active = ProgressEvent("enable", "active", {"digest_seconds": 0.2, "hashed_while_saving": 0})
    assert "enable: session active (digest in 0.20 s)" in " ".join(render([active]).split())


def test_commit_shows_a_bar_per_disk() -> None:
    text = render(COMMIT)
    assert "commit: disk d0" in text
    assert "commit: disk d1" in text
    assert "40.0 MiB/40.0 MiB" in text
    assert "20.0 MiB/20.0 MiB" in text
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


def test_plain_progress_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every event at the same instant, so the one-a-second throttle decides the same on any host.
    monkeypatch.setattr(terminal.time, "monotonic", lambda: 1000.0)
    stream = io.StringIO()
    out = _Output(False, stream)
    for event in ENABLE + COMMIT + DISCARD:
        out.progress(event)
    out.final({"state": "committed"}, "forge session x: Committed")
    lines = stream.getvalue().splitlines()
    assert "\x1b" not in stream.getvalue()  # no colours, no cursor movement
    text = [re.sub(r"^ *[0-9]+\.[0-9]{2} s  ", "", line) for line in lines]
    assert all(re.match(r"^ *[0-9]+\.[0-9]{2} s  ", line) for line in lines[:-1])
    assert text == [
        "enable: planned (disks d0, d1)",
        "enable: overlays created",
        "enable: saving the memory state",
        "enable: memory state 0 B of 256.0 MiB (0%)",
        # the next save report came within a second of the last: no line for it
        "enable: the save does not converge (final pass may pause the guest up to 50 ms, 1 s "
        "after the first pass)",
        "enable: the save does not converge (guest paused until the save ends, 6 s after the "
        "first pass)",
        "enable: disks snapshotted (guest paused 14.2 ms)",
        "enable: session active (guest paused 14.2 ms, memory state 85.8 MiB, in 0.41 s, "
        "digest in 0.02 s, 64.0 MiB hashed while saving)",
        "commit: disk d0 10.0 MiB of 40.0 MiB (25%)",
        "commit: disk d1 5.0 MiB of 20.0 MiB (25%)",
        "commit: disk merged (disk d0)",
        "commit: disk merged (disk d1)",
        "commit: committed",
        "discard: stopping QEMU",
        "discard: restoring the memory state",
        "discard: VM running (resumed from memory, in 1.25 s)",
        "forge session x: Committed",
    ]


def test_plain_progress_throttles_each_transfer_and_always_shows_its_end() -> None:
    stream = io.StringIO()
    view = PlainProgress(stream, interval=3600)
    total = 4 << 30
    for done in range(0, total + 1, total // 8):
        view.update(
            ProgressEvent("commit", "progress", {"disk": "d0", "done": done, "total": total})
        )
    view.update(ProgressEvent("commit", "progress", {"disk": "d0", "done": total, "total": total}))
    lines = [re.sub(r"^ *[0-9.]+ s  ", "", line) for line in stream.getvalue().splitlines()]
    assert lines == [
        "commit: disk d0 0 B of 4.0 GiB (0%)",
        "commit: disk d0 4.0 GiB of 4.0 GiB (100%)",
    ]
    every = io.StringIO()
    view = PlainProgress(every, interval=0)
    for done in (0, 1 << 20, 2 << 20):
        view.update(
            ProgressEvent(
                "enable", "progress", {"done": done, "total": 4 << 20, "bytes_per_second": 3 << 20}
            )
        )
    assert every.getvalue().count("memory state") == 3
    assert "2.0 MiB of 4.0 MiB (50%), 3.0 MiB/s" in every.getvalue()


def test_binary_size() -> None:
    assert binary_size(0) == "0 B"
    assert binary_size(1023) == "1023 B"
    assert binary_size(1536) == "1.5 KiB"
    assert binary_size(1 << 30) == "1.0 GiB"
    assert binary_size(90_000_000) == "85.8 MiB"
    assert binary_size(5 << 40) == "5.0 TiB"
    assert binary_size(5000 << 40) == "5000.0 TiB"


def test_plain_progress_shows_the_eta_until_the_transfer_is_done() -> None:
    stream = io.StringIO()
    view = PlainProgress(stream, interval=0)
    for done, eta in ((0, None), (1 << 30, 12.0), (2 << 30, 0.0)):
        view.update(
            ProgressEvent(
                "commit",
                "progress",
                {"disk": "d0", "done": done, "total": 2 << 30, "eta_s": eta},
            )
        )
    lines = [re.sub(r"^ *[0-9.]+ s  ", "", line) for line in stream.getvalue().splitlines()]
    assert lines == [
        "commit: disk d0 0 B of 2.0 GiB (0%)",
        "commit: disk d0 1.0 GiB of 2.0 GiB (50%), ETA 12 s",
        "commit: disk d0 2.0 GiB of 2.0 GiB (100%)",
    ]


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


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_rich_the_cli_prints_plain_lines_and_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich is the optional ``cli`` extra: without it, even on a terminal, progress is the plain
    lines and the report plain text, and nothing fails."""
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")] + ["rich"]:
        monkeypatch.setitem(sys.modules, name, None)  # import rich... -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "forgeqmp.liveview", raising=False)
    monkeypatch.delattr(forgeqmp, "liveview", raising=False)
    assert cli._live_view() is None
    stream = _Tty()
    out = _Output(False, stream)
    for event in ENABLE:
        out.progress(event)
    out.final({"state": "active"}, "forge session x: Active")
    text = stream.getvalue()
    assert not ANSI.search(text)
    assert "enable: session active" in text
    assert text.endswith("forge session x: Active\n")


def test_the_library_does_not_import_rich() -> None:
    """``import forgeqmp`` (the library, and the CLI module) loads no terminal-rendering package:
    an embedding program installs only the core dependencies."""
    code = (
        "import sys, forgeqmp, forgeqmp.cli, forgeqmp.sync, forgeqmp.testing; "
        "bad = sorted(m for m in sys.modules if m == 'rich' or m.startswith('rich.')); "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
