"""The ``forgeqmp`` command line. Its contract (commands, exit codes, JSON) is
shared/design/cli-contract.md; every exit code comes from the error's ``exit_code``.

Exit codes: 0 success; 2 usage error or invalid argument; 3 refused by a prerequisite or the guard;
4 the operation failed (``status`` tells what it left); 5 QEMU cannot be reached on the socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TextIO

import anyio

from forgeqmp._version import __version__
from forgeqmp.errors import ForgeError, InvalidArgument
from forgeqmp.forge import DEFAULT_COMMIT_TIMEOUT, Instance, ProgressEvent, connect
from forgeqmp.plans.enable import Strategy
from forgeqmp.record import RecordStore, SessionRecord, no_session_status
from forgeqmp.statedir import StateDir, default_state_dir

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED = 4


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on exit code 2 and a hint to --help."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = _Parser(
        prog="forgeqmp",
        description="Try-before-you-keep live snapshots (disks + memory) of a running QEMU VM.",
        epilog="Exit codes: 0 ok, 2 usage/invalid argument, 3 refused (prerequisite or guard), "
        "4 failed (see status), 5 QEMU unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"forgeqmp {__version__}")
    parser.add_argument(
        "--qmp",
        metavar="SOCKET",
        default=os.environ.get("FORGEQMP_QMP"),
        help="QEMU's QMP unix socket (default: $FORGEQMP_QMP)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the session record, memory file and lock live (default: derived from the "
        "socket path under $FORGEQMP_STATE_HOME, $XDG_STATE_HOME/forgeqmp or "
        "~/.local/state/forgeqmp)",
    )
    parser.add_argument(
        "--json", action="store_true", help="JSON lines: progress events, then one final object"
    )
    # --json is also accepted after the command (the contract puts it before).
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON lines")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    enable = commands.add_parser(
        "enable", parents=[common], help="snapshot disks and memory while the VM runs"
    )
    enable.add_argument(
        "--disk",
        action="append",
        metavar="NAME",
        help="a disk to forge: qdev id, qdev path or node-name (repeatable; default: the "
        "primary disk)",
    )
    enable.add_argument("--all-disks", action="store_true", help="forge every writable disk")
    enable.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        help="how memory is saved (default: precopy, the smallest pause)",
    )
    enable.add_argument("--overlay-dir", metavar="DIR", help="where overlays go (default: beside)")
    enable.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS")

    commands.add_parser("status", parents=[common], help="show the session of this instance")

    commit = commands.add_parser(
        "commit", parents=[common], help="merge the overlays into the originals, live"
    )
    commit.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_COMMIT_TIMEOUT,
        metavar="SECONDS",
        help="give up after this many seconds (default 3600); a later commit finishes the rest",
    )

    discard = commands.add_parser(
        "discard", parents=[common], help="revert the disks and resume the VM from the memory state"
    )
    discard.add_argument("--timeout", type=_seconds, default=300.0, metavar="SECONDS")
    return parser


class _Output:
    """Human text or JSON lines, on stdout; errors on stderr."""

    def __init__(self, as_json: bool, stream: TextIO = sys.stdout) -> None:
        self.as_json = as_json
        self.stream = stream

    def progress(self, event: ProgressEvent) -> None:
        if self.as_json:
            self._line(event.as_dict())
        elif self.stream.isatty():
            detail = " ".join(f"{k}={v}" for k, v in event.detail.items())
            print(f"{event.operation}: {event.step} {detail}".rstrip(), file=self.stream)

    def final(self, status: dict[str, Any], text: str) -> None:
        if self.as_json:
            self._line(status)
        else:
            print(text, file=self.stream)

    def _line(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj, sort_keys=False) + "\n")
        self.stream.flush()


def _describe(record: SessionRecord | None) -> str:
    if record is None:
        return "no forge session"
    lines = [f"session {record.session_id}: {record.state.value}"]
    if record.activated_at:
        lines.append(f"  active since {record.activated_at.isoformat(timespec='seconds')}")
    for disk in record.disks:
        where = disk.overlay_file or ("merged" if disk.merged else "-")
        lines.append(f"  disk {disk.name}: {disk.base_file} -> {where}")
    if record.pause_ms is not None:
        lines.append(f"  guest pause at enable: {record.pause_ms:.1f} ms")
    if record.memory_restored is not None:
        lines.append(f"  memory restored: {'yes' if record.memory_restored else 'no'}")
    if record.resume_seconds is not None:
        lines.append(f"  discard to running VM: {record.resume_seconds:.2f} s")
    lines.extend(f"  warning: {w}" for w in record.warnings)
    if record.error:
        lines.append(f"  error: {record.error}")
    if record.next_step:
        lines.append(f"  next: {record.next_step}")
    return "\n".join(lines)


def _status_of(record: SessionRecord | None) -> dict[str, Any]:
    return record.status_dict() if record is not None else no_session_status()


def _state_dir(args: argparse.Namespace) -> StateDir:
    return StateDir(args.state_dir or default_state_dir(args.qmp))


async def _with_instance(
    args: argparse.Namespace, action: Callable[[Instance], Awaitable[SessionRecord]]
) -> SessionRecord:
    async with connect(args.qmp, state_dir=_state_dir(args).path) as vm:
        return await action(vm)


def _run(args: argparse.Namespace, out: _Output) -> int:
    if args.command == "status":
        record = RecordStore(_state_dir(args)).load()
        out.final(_status_of(record), _describe(record))
        return EXIT_OK

    def enable(vm: Instance) -> Awaitable[SessionRecord]:
        return vm.enable(
            args.disk,
            all_disks=args.all_disks,
            strategy=args.strategy,
            overlay_dir=args.overlay_dir,
            timeout=args.timeout,
            on_progress=out.progress,
        )

    def commit(vm: Instance) -> Awaitable[SessionRecord]:
        return vm.commit(timeout=args.timeout, on_progress=out.progress)

    def discard(vm: Instance) -> Awaitable[SessionRecord]:
        return vm.discard(timeout=args.timeout, on_progress=out.progress)

    actions = {"enable": enable, "commit": commit, "discard": discard}
    if args.command == "enable" and args.disk and args.all_disks:
        raise InvalidArgument("give --disk or --all-disks, not both")
    record = anyio.run(_with_instance, args, actions[args.command])
    out.final(_status_of(record), _describe(record))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code of the contract."""
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # we report its errors ourselves
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required")
    if not args.qmp:
        parser.error("--qmp SOCKET (or FORGEQMP_QMP) is required")
    out = _Output(args.json)
    try:
        return _run(args, out)
    except ForgeError as exc:
        print(f"forgeqmp: {exc}", file=sys.stderr)
        if args.json:
            try:
                record = RecordStore(_state_dir(args)).load()
            except ForgeError:
                record = None
            status = _status_of(record)
            status["error"] = str(exc)
            status["exit_code"] = exc.exit_code
            out.final(status, "")
        return exc.exit_code
    except KeyboardInterrupt:
        print("forgeqmp: interrupted", file=sys.stderr)
        return EXIT_FAILED
