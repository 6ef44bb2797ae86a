"""The ``forgeqmp`` command line. Its contract (commands, exit codes, JSON) is
shared/design/cli-contract.md; every exit code comes from the error's ``exit_code``.

Exit codes: 0 success; 2 usage error or invalid argument; 3 refused by a prerequisite or the guard;
4 the operation failed (``status`` tells what it left); 5 QEMU cannot be reached on the socket.

The exit code tells what really happened, whatever path led there: an operation that returns a
record short of where it was asked to go (a discard that recorded FAILED) exits 4, as does any
unexpected error (never a traceback and exit 1); a refusal (2, 3, 5) after which the session
record changed anyway becomes 4. With ``--json``, a failed or refused command's final object is
the session's status plus ``error_kind``, ``exit_code`` and ``next_step``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, NoReturn, Protocol, TextIO

import anyio

from forgeqmp._version import __version__
from forgeqmp.adapters.launcher import executable_launcher
from forgeqmp.adapters.livestatus import observe
from forgeqmp.adapters.recordstore import RecordStore, graph_sessions
from forgeqmp.adapters.statedir import InstanceLock, StateDir, default_state_dir
from forgeqmp.core.argv import start_argv
from forgeqmp.core.disks import check_disk_choice
from forgeqmp.core.graphsession import GraphSession
from forgeqmp.core.guard import (
    ALWAYS_ALLOWED,
    BLOCKED_OPERATIONS,
    Operation,
    check_graph_sessions,
    check_recorded,
    missing_overlays,
    overlays_missing_hint,
    parse_operation,
)
from forgeqmp.core.lifecycle import advance
from forgeqmp.core.plans.enable import Strategy
from forgeqmp.core.record import SessionRecord, no_session_status
from forgeqmp.core.states import FAILED_EVENT, WORKING, State
from forgeqmp.errors import (
    ForgeError,
    ForgeFailed,
    OperationBlocked,
    QEMUUnreachable,
    RecordError,
    describe_cause,
    error_kind,
    leaf_errors,
)
from forgeqmp.forge import (
    DEFAULT_COMMIT_TIMEOUT,
    DEFAULT_DISCARD_TIMEOUT,
    DEFAULT_ENABLE_TIMEOUT,
    Instance,
    ProgressEvent,
    connect,
    status_of,
)
from forgeqmp.ops.recover import DEFAULT_RECOVER_TIMEOUT, lock_held, stale
from forgeqmp.terminal import PlainProgress, print_plain_report, state_label

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED = 4
#: Interrupted by Ctrl-C (SIGINT), as shells report it: 128 + 2.
EXIT_INTERRUPTED = 130
#: Exit codes after which the contract says nothing changed.
_REFUSALS = frozenset({2, 3, 5})
#: Where each operation is asked to take the session; any other end state is a failure (exit 4).
_TARGETS = {"enable": State.ACTIVE, "commit": State.COMMITTED, "discard": State.DISCARDED}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on exit code 2 and a hint to --help."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


#: A number of seconds as people type it: ASCII digits, an optional fraction or exponent.
_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _seconds(text: str) -> float:
    # float() also takes "1_0", Arabic-Indic or full-width digits and surrounding spaces:
    # refuse what the contract does not mean rather than guess.
    if not _SECONDS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    value = float(text)
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
        "--launcher",
        metavar="PATH",
        default=os.environ.get("FORGEQMP_LAUNCHER") or None,
        help="an executable the platform provides that starts this VM's QEMU its own way when "
        "forgeqmp must relaunch it (discard, recover); needed, and accepted by enable, when "
        "QEMU's command line holds inherited fds or fd sets. Called as PATH ARGV0 ARG1 ... "
        "(the argv to run, with -incoming defer -S for a memory restore) with "
        "FORGEQMP_QMP_SOCKET, FORGEQMP_INCOMING=1|0, FORGEQMP_CWD and FORGEQMP_LOG_FILE set; "
        "it must exit 0 once QMP listens (see docs/platforms.md; default: $FORGEQMP_LAUNCHER)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="JSON lines: progress events, then one final object (default: human text)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every step forgeqmp takes (logger 'forgeqmp', INFO) on stderr",
    )
    verbosity.add_argument(
        "--debug",
        action="store_true",
        help="log everything, QMP traffic included ('forgeqmp.adapters.qmp' and qemu.qmp's 'qemu.qmp', "
        "DEBUG) on stderr",
    )
    verbosity.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and no report on success; errors still go to stderr and the exit code "
        "says what happened (with --json, only the final object)",
    )
    # --json is also accepted after the command (the contract puts it before).
    common = _Parser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="JSON lines, as the global --json (default: human text)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    enable = commands.add_parser(
        "enable", parents=[common], help="snapshot disks and memory while the VM runs"
    )
    enable.add_argument(
        "--disk",
        action="append",
        metavar="NAME",
        help="a disk to forge: qdev id, qdev path, drive id (legacy -drive id=) or node-name "
        "(repeatable; default: the primary disk)",
    )
    enable.add_argument(
        "--all-disks",
        action="store_true",
        help="forge every writable disk (default: only the primary disk, or those of --disk)",
    )
    enable.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        help="how memory is saved (default: mapped-ram where QEMU has it, else precopy)",
    )
    enable.add_argument(
        "--overlay-dir",
        metavar="DIR",
        help="where overlays go (default: beside each disk's image)",
    )
    enable.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_ENABLE_TIMEOUT,
        metavar="SECONDS",
        help=f"give up, undoing everything, after this many seconds (default {DEFAULT_ENABLE_TIMEOUT:g})",
    )

    commands.add_parser("status", parents=[common], help="show the session of this instance")

    commit = commands.add_parser(
        "commit", parents=[common], help="merge the overlays into the originals, live"
    )
    commit.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_COMMIT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this many seconds (default {DEFAULT_COMMIT_TIMEOUT:g}); a later "
        "commit finishes the rest",
    )

    discard = commands.add_parser(
        "discard", parents=[common], help="revert the disks and resume the VM from the memory state"
    )
    discard.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_DISCARD_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this many seconds (default {DEFAULT_DISCARD_TIMEOUT:g}); "
        "'forgeqmp status' then says what was left",
    )
    discard.add_argument(
        "--cold",
        action="store_true",
        help="start the VM cold on the reverted disks instead of from the memory state "
        "(default: resume from memory)",
    )

    recover = commands.add_parser(
        "recover",
        parents=[common],
        help="after a crash: reconcile the session with QEMU and the files, reach a true state",
    )
    recover.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_RECOVER_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this many seconds (default {DEFAULT_RECOVER_TIMEOUT:g}); recover "
        "can be run again",
    )

    check = commands.add_parser(
        "check",
        parents=[common],
        help="exit 0 if a platform operation is allowed now, 3 if a forge session blocks it",
        description="Reads the session record (in the state dir derived from --qmp, or "
        "--state-dir); when it shows no unfinished session, also QEMU's block graph if QEMU "
        "answers within 2 s (a session enabled through another state dir, or whose record was "
        "deleted, blocks too). It answers whether QEMU runs or not. Exit 0: allowed; 3: blocked "
        "(why and how to finish the session on stderr); 2: unknown operation.",
    )
    check.add_argument(
        "operation",
        metavar="OPERATION",
        help="blocked during a session: "
        + " ".join(op.value for op in BLOCKED_OPERATIONS)
        + "; always allowed: "
        + " ".join(op.value for op in ALWAYS_ALLOWED),
    )
    return parser


class _View(Protocol):
    def update(self, event: ProgressEvent) -> None: ...

    def close(self) -> None: ...


def _live_view() -> ModuleType | None:
    """:mod:`forgeqmp.liveview` (rich: live bars and colours), or None when rich is not
    installed (the optional ``cli`` extra): the CLI then prints plain lines and plain text."""
    try:
        from forgeqmp import liveview
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.partition(".")[0] == "rich":
            return None
        raise
    return liveview


class _Output:
    """Human text or JSON lines, on stdout; errors on stderr. Progress: JSON lines with --json,
    live bars and steps on a terminal (with rich installed), plain lines otherwise (a log, a
    pipe, or no rich)."""

    def __init__(self, as_json: bool, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.as_json = as_json
        #: -q: no progress, and no human report (errors still go to stderr).
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stdout
        self._view: _View | None = None

    def progress(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        if self.as_json:
            self._line(event.as_dict())
            return
        if self._view is None:
            live = _live_view() if self.stream.isatty() else None
            self._view = live.ProgressView(self.stream) if live else PlainProgress(self.stream)
        self._view.update(event)

    def close(self) -> None:
        """End the live progress display, if any (before anything else is printed)."""
        if self._view is not None:
            self._view.close()
            self._view = None

    def final(self, status: dict[str, Any], text: str) -> None:
        self.close()
        if self.as_json:
            self._line(status)
        elif not self.quiet:
            live = _live_view()
            report = live.print_report if live is not None else print_plain_report
            report(self.stream, text, status.get("state"))

    def _line(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj, sort_keys=False) + "\n")
        self.stream.flush()


def _describe(record: SessionRecord | None) -> str:
    """The session for people; its first line ends with the state label (coloured on a tty)."""
    if record is None:
        return "no forge session on this instance"
    lines = [f"forge session {record.session_id}: {state_label(record.state.value)}"]
    if record.activated_at:
        when = record.activated_at.isoformat(timespec="seconds")
        if record.state is State.ACTIVE:
            age = int((datetime.now(UTC) - record.activated_at).total_seconds())
            when += f" (active for {age // 3600}h{age % 3600 // 60:02d}m{age % 60:02d}s)"
        lines.append(f"  activated: {when}")
    if record.disks:
        lines.append("  forged disks:")
    for disk in record.disks:
        if disk.merged:
            overlay = "merged into the base" if disk.overlay_node is None else "being merged"
            if disk.overlay_node is not None and record.state is State.FAILED:
                overlay = "partly merged: the commit stopped; commit again to finish"
            overlay = f"{disk.overlay_file} ({overlay})" if disk.overlay_file else overlay
        elif record.state is State.DISCARDED or record.rolled_back:
            overlay = f"{disk.overlay_file} (removed)" if disk.overlay_file else "none"
        else:
            overlay = disk.overlay_file or "not created yet"
        lines.append(f"    {disk.name}: base {disk.base_file}")
        lines.append(f"    {' ' * len(disk.name)}  overlay {overlay}")
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
    # An explicit but empty --state-dir is refused (InvalidArgument), not taken as the default.
    given = args.state_dir
    return StateDir(given if given is not None else default_state_dir(args.qmp))


def _offline_allowed(args: argparse.Namespace) -> bool:
    """Whether the command may run while QEMU is provably stopped. commit and discard read the
    record first (an unreadable one is refused, exit 3): only a session they could act on lets
    them work offline, else an unreachable QEMU is exit 5 however the socket fails."""
    if args.command == "recover":
        return True
    if args.command not in ("commit", "discard"):
        return False
    record = RecordStore(_state_dir(args)).load()
    if record is None:
        return False
    status = status_of(record)
    if args.command == "commit":
        return status.can_commit
    return status.can_discard and not any(d.merged for d in record.disks)


async def _with_instance(
    args: argparse.Namespace, action: Callable[[Instance], Awaitable[SessionRecord | None]]
) -> SessionRecord | None:
    # The contract: commit, discard and recover also work on a stopped QEMU.
    offline = _offline_allowed(args)
    launcher = executable_launcher(args.launcher) if args.launcher else None
    try:
        async with connect(
            args.qmp, state_dir=_state_dir(args).path, allow_offline=offline, launcher=launcher
        ) as vm:
            return await action(vm)
    except QEMUUnreachable as exc:
        if args.command in ("commit", "discard") and not offline:
            raise QEMUUnreachable(
                exc.socket_path,
                f"{exc.reason} (and the state dir {_state_dir(args).path} holds no session "
                f"{args.command} could act on while QEMU is stopped)",
            ) from None
        raise


def _status(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``status``: the record, flagged stale when the operation it shows was interrupted."""
    state_dir = _state_dir(args)
    record = RecordStore(state_dir).load()
    status, text = _status_of(record), _describe(record)
    # QEMU's runstate, overlay sizes and free space, and advice on an io-error pause.
    observed = observe(args.qmp, record, busy=lock_held(state_dir))
    live = observed.update(status, record)
    text += f"\n{live}" if live else ""
    status["sessions_in_qemu"] = []
    if record is None or status_of(record).finished:
        if observed.block_nodes is not None:  # QEMU answered: its graph, from the same look
            found = graph_sessions(observed.block_nodes, state_dir.path, args.qmp)
        elif observed.qemu == "busy":  # not asked: another forgeqmp process holds the lock
            found = _graph_sessions(args) or ()
        else:  # QEMU does not answer: no graph to show
            found = ()
        status["sessions_in_qemu"] = [
            {"session": g.tag, "nodes": list(g.nodes), "files": list(g.files),
             "records": list(g.records)}
            for g in found
        ]  # fmt: skip
        if found:
            why = "; ".join(g.describe() for g in found)
            status["warnings"] = [*status.get("warnings", []), why]
            status["next_step"] = "finish that session through the state dir that enabled it"
            text += f"\n  warning: {why}"
    status["stale"] = False
    status["start_argv"] = None  # how to start the VM now without bypassing the forge
    if record is not None:
        reason = stale(state_dir, record)
        if reason is not None:
            status.update(stale=True, next_step=reason)
            text += f"\n  stale: {reason}"
        with contextlib.suppress(ForgeError):
            status["start_argv"] = list(start_argv(record))
    status["overlays_missing"], text = _missing_overlays(record, status, text)
    return status, text


#: How long ``check`` and ``status`` wait for QEMU to show its block graph (they answer from
#: the record alone when it does not: QEMU being down never makes them fail).
_GRAPH_TIMEOUT = 2.0


def _graph_sessions(args: argparse.Namespace) -> tuple[GraphSession, ...] | None:
    """Forge sessions QEMU's block graph shows (any state dir's), None if QEMU does not answer."""

    async def look() -> tuple[GraphSession, ...]:
        async with connect(args.qmp, state_dir=_state_dir(args).path, timeout=_GRAPH_TIMEOUT) as vm:
            return await vm.sessions_in_graph()

    try:
        return anyio.run(look)
    except (ForgeError, OSError):
        return None


def _check_graph(args: argparse.Namespace, record: SessionRecord | None, operation: Any) -> None:
    """Refuse ``operation`` when this state dir has no unfinished session but QEMU shows one."""
    if not operation.blocked_during_session:
        return
    if record is not None and not status_of(record).finished:
        return
    check_graph_sessions(record, operation, _graph_sessions(args))


def _missing_overlays(
    record: SessionRecord | None, status: dict[str, Any], text: str
) -> tuple[list[str], str]:
    """A deleted overlay of an unfinished session, seen now (not only once recover runs): the
    status's ``error`` and ``next_step`` say so."""
    gone = missing_overlays(record, os.path.exists) if record is not None else ()
    if record is None or not gone:
        return [], text
    hint = overlays_missing_hint(record, gone)
    status["error"] = f"{status['error']}; {hint}" if status.get("error") else hint
    status["next_step"] = hint
    return [d.name for d in gone], text + f"\n  problem: {hint}"


def _check(args: argparse.Namespace, out: _Output) -> int:
    """``check OPERATION``: from the session record; when that shows no unfinished session and
    the operation is one a session blocks, also from QEMU's block graph if QEMU answers within
    a moment (a session enabled through another state dir, or whose record was deleted). QEMU
    down or busy: the record's answer stands."""
    operation = parse_operation(args.operation)  # unknown: InvalidArgument, exit 2
    state_dir = _state_dir(args)
    try:
        record = check_recorded(RecordStore(state_dir).load, operation, exists=os.path.exists)
        _check_graph(args, record, operation)
    except OperationBlocked as exc:
        print(f"forgeqmp: {exc}", file=sys.stderr)
        if out.as_json:
            try:
                status = _status_of(RecordStore(state_dir).load())
            except ForgeError:
                status = _status_of(None)
            status.update(operation=operation.value, allowed=False, error=str(exc))
            status.update(
                error_kind=exc.error_kind, exit_code=exc.exit_code, next_step=exc.next_step
            )
            out.final(status, "")
        return exc.exit_code
    if record is None:
        why = "there is no forge session on this instance"
    elif status_of(record).finished:
        why = f"the last forge session is {record.state.value}, which is finished"
    else:
        why = f"it is safe during a forge session: {operation.why}"
        if operation in (Operation.START, Operation.RESTART):
            # The command line that keeps the forge, on the command line (not only in the API).
            with contextlib.suppress(ForgeError):
                why = (
                    f"it is safe during a forge session if QEMU is started with this command "
                    f"line, which keeps each forged disk on its overlay (the platform's own "
                    f"would bypass them):\n  {shlex.join(start_argv(record))}"
                )
    status = _status_of(record)
    status.update(operation=operation.value, allowed=True)
    out.final(status, f"{operation.value} is allowed: {why}")
    return EXIT_OK


def _run(args: argparse.Namespace, out: _Output) -> int:
    if args.command == "status":
        status, text = _status(args)
        if status["state"] == "none" and status.get("qemu") == "unreachable":
            # No session and nothing on the socket: a mistyped path must not read as "no
            # session here" (with a record, status reports it and says QEMU is unreachable).
            raise QEMUUnreachable(
                args.qmp, f"nothing answers QMP there, and {_state_dir(args).path} has no session"
            )
        out.final(status, text)
        return EXIT_OK
    if args.command == "check":
        return _check(args, out)

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
        return vm.discard(timeout=args.timeout, on_progress=out.progress, cold=args.cold)

    def recover(vm: Instance) -> Awaitable[SessionRecord | None]:
        return vm.recover(timeout=args.timeout, on_progress=out.progress)

    actions: dict[str, Callable[[Instance], Awaitable[SessionRecord | None]]] = {
        "enable": enable,
        "commit": commit,
        "discard": discard,
        "recover": recover,
    }
    if args.command == "enable":
        check_disk_choice(args.disk, all_disks=args.all_disks)
    record = anyio.run(_with_instance, args, actions[args.command])
    failure = _end_state_failure(args.command, record)
    status = _status_of(record)
    if failure is None:
        out.final(status, _describe(record))
        return EXIT_OK
    print(f"forgeqmp: {failure}", file=sys.stderr)
    status.update(
        error_kind=ForgeFailed.error_kind,
        exit_code=EXIT_FAILED,
        next_step=status.get("next_step") or "run 'forgeqmp status', then 'forgeqmp recover'",
    )
    out.final(status, _describe(record))
    return EXIT_FAILED


def _end_state_failure(command: str, record: SessionRecord | None) -> str | None:
    """Why the record an operation returned is not where the user asked it to go (exit 4), or
    None. A FAILED session is a failure whatever the operation, except a recover that found or
    left it rolled back (nothing is left to do)."""
    if record is None:
        return None  # recover without a session: nothing to do
    target = _TARGETS.get(command)
    state = record.state
    if target is not None and state is target:
        return None
    if target is None and (state is not State.FAILED or record.rolled_back):
        return None  # recover reached a true state that needs nothing more
    why = f"; {record.error}" if record.error else ""
    wanted = f", not {target.value}" if target is not None else ""
    return (
        f"{command} left session {record.session_id} {state.value}{wanted}{why}; "
        f"{record.next_step or 'run forgeqmp recover'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code of the contract."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required")
    if not args.qmp:
        parser.error("--qmp SOCKET (or FORGEQMP_QMP) is required")
    _set_up_logging(args)
    out = _Output(args.json, quiet=args.quiet)
    before = _record_bytes(args)
    try:
        return _run(args, out)
    except ForgeError as exc:
        code, message = exc.exit_code, _with_next_step(exc)
        changed = args.command not in ("status", "check") and _record_bytes(args) != before
        if code in _REFUSALS and changed:  # a refusal changes nothing: this was a failure
            code = EXIT_FAILED
            message += (
                "; the session record changed meanwhile, so this is reported as a failure: "
                "'forgeqmp status' shows the state it left"
            )
        return _report_error(args, out, exc, code, message, changed=changed)
    except KeyboardInterrupt:
        return _interrupted(args, out, before)
    except (Exception, BaseExceptionGroup) as exc:
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaf_errors(exc)):
            return _interrupted(args, out, before)
        # Not foreseen (a bug, or an error forgeqmp does not map): a failure with its cause,
        # recorded in the session if an operation was under way, never a traceback and exit 1.
        cause = describe_cause(exc)
        recorded = _record_unexpected(args, cause)
        message = f"{args.command} failed unexpectedly: {cause}" + (
            "; the session record says so"
            if recorded
            else "; 'forgeqmp status' shows the state it left and what to do next"
        )
        changed = _record_bytes(args) != before
        return _report_error(args, out, exc, EXIT_FAILED, message, changed=changed)


def _set_up_logging(args: argparse.Namespace) -> None:
    """-v: forgeqmp's steps (INFO); --debug: everything, QMP traffic and qemu.qmp's own logs
    (DEBUG); otherwise warnings only. On stderr, so stdout keeps the command's output."""
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in ("forgeqmp", "qemu.qmp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        # qemu.qmp's errors are reported by forgeqmp itself unless --debug asks for them.
        logger.setLevel(level if name == "forgeqmp" or args.debug else logging.CRITICAL + 1)


def _interrupted(args: argparse.Namespace, out: _Output, before: bytes | None) -> int:
    """Ctrl-C: the operation under way was undone or left as its record says; exit 130. The
    message sends the user to ``recover`` only when the record shows something to finish."""
    out.close()
    record = _load_quietly(args)
    if record is not None and record.state in WORKING:
        advice = (
            f"the session was left {record.state.value} at step {record.step.value}: "
            "'forgeqmp recover' finishes it"
        )
    elif record is not None and record.state is State.FAILED and not record.rolled_back:
        advice = f"the session is failed: {record.next_step or 'run forgeqmp recover'}"
    elif record is not None and not status_of(record).finished and not record.rolled_back:
        advice = f"the session is {record.state.value}, as before; nothing is left to recover"
    else:
        advice = "nothing was left changed; nothing to recover"
    if args.json:
        out.final(
            _error_object(
                args,
                record,
                message=f"interrupted; {advice}",
                kind="interrupted",
                code=EXIT_INTERRUPTED,
                next_step=advice,
                changed=_record_bytes(args) != before,
            ),
            "",
        )
    print(f"forgeqmp: interrupted; {advice}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _record_bytes(args: argparse.Namespace) -> bytes | None:
    """The session record's bytes now (None if there is none or it cannot be read)."""
    try:
        return _state_dir(args).read("session.json")
    except ForgeError:
        return None


def _report_error(
    args: argparse.Namespace,
    out: _Output,
    exc: BaseException,
    code: int,
    message: str,
    *,
    changed: bool,
) -> int:
    """Print a failed or refused command's error (stderr) and, with --json, its final object:
    the session's status (its own state) plus error, error_kind, exit_code and next_step, and
    which command failed and whether it changed the session record (``command``, ``changed``:
    a refused command's ``state`` is the session's own, left as it was)."""
    out.close()
    print(f"forgeqmp: {message}", file=sys.stderr)
    if args.json:
        record = _load_quietly(args)
        out.final(
            _error_object(
                args,
                record,
                message=message,
                kind=error_kind(exc),
                code=code,
                next_step=_next_step(exc, code, record),
                changed=changed,
            ),
            "",
        )
    return code


def _load_quietly(args: argparse.Namespace) -> SessionRecord | None:
    """The session record, or None when there is none or it cannot be read."""
    try:
        return RecordStore(_state_dir(args)).load()
    except ForgeError:
        return None


def _error_object(
    args: argparse.Namespace,
    record: SessionRecord | None,
    *,
    message: str,
    kind: str,
    code: int,
    next_step: str,
    changed: bool,
) -> dict[str, Any]:
    """The final ``--json`` object of a command that failed, was refused or was interrupted."""
    status = _status_of(record)
    status.update(
        error=message,
        error_kind=kind,
        exit_code=code,
        next_step=next_step,
        command=args.command,
        changed=changed,
    )
    return status


def _next_step(exc: BaseException, code: int, record: SessionRecord | None) -> str:
    hint = getattr(exc, "next_step", None)
    if isinstance(hint, str) and hint:
        return hint
    if code == EXIT_FAILED and record is not None and record.next_step:
        return record.next_step
    return {
        2: "fix the command line (see 'forgeqmp --help'); nothing was changed",
        3: "nothing was changed: do what the error says, then run the command again",
        5: "nothing was changed: start QEMU with its QMP socket on --qmp, or fix the path; "
        "'forgeqmp status' shows the session",
    }.get(code, "run 'forgeqmp status' to see the state it left, then 'forgeqmp recover'")


def _record_unexpected(args: argparse.Namespace, cause: str) -> bool:
    """After an unexpected error, record it in a session left in the middle of an operation
    (creating, committing, discarding) as FAILED in that phase, so that ``status`` tells the truth
    and ``recover`` (or the operation run again) finishes it. True if the record was updated."""
    if args.command not in _TARGETS and args.command != "recover":
        return False
    state_dir = _state_dir(args)
    try:
        with InstanceLock(state_dir, f"forgeqmp {args.command} (recording an error)"):
            store = RecordStore(state_dir)
            record = store.load()
            if record is None or record.state not in WORKING:
                return False
            store.save(
                advance(
                    record,
                    FAILED_EVENT[record.state],
                    failure_phase=record.state,
                    rolled_back=False,
                    error=f"{args.command} stopped at step {record.step.value}: {cause}",
                    next_step="run 'forgeqmp recover'",
                    updated_at=datetime.now(UTC),
                )
            )
            return True
    except (ForgeError, OSError):
        return False


def _with_next_step(exc: ForgeError) -> str:
    """The error's message; a failure (exit 4) that does not say where to look gets the
    contract's pointer to ``status``."""
    message = str(exc)
    if (
        exc.exit_code == EXIT_FAILED
        and not isinstance(exc, RecordError)  # its message has its own advice
        and "forgeqmp status" not in message
    ):
        message += "; 'forgeqmp status' shows the state it left and what to do next"
    return message
