"""Bad input through the CLI, run in process (no QEMU needed): whatever the arguments, the exit code
is one of the contract's and a refusal changes nothing; sockets that are not QMP give exit 5 within
the connect deadline; corrupted, truncated or hand-edited session records are refused
(RecordUnreadable or UnsafeStateDir, 3), never a crash, and are left as they were.

Every example runs against one prepared tree (a state dir holding a finished session, a socket path
nothing listens on) and checks that the whole tree is unchanged, so one example cannot hide what
another changed. The working directory is inside that tree: relative paths land there too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from records import make_disk, make_record  # tests/unit is on sys.path

from forgeqmp.adapters.qmp import DEFAULT_CONNECT_TIMEOUT
from forgeqmp.adapters.recordstore import RECORD_FILE, RecordStore
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.cli import main
from forgeqmp.core.guard import ALWAYS_ALLOWED, BLOCKED_OPERATIONS
from forgeqmp.core.plans.enable import Strategy
from forgeqmp.core.record import (
    SessionRecord,
)
from forgeqmp.core.states import State
from forgeqmp.errors import RecordError

CONTRACT_CODES = {0, 2, 3, 4, 5}
#: Exit codes after which the contract says nothing changed.
REFUSALS = {2, 3, 5}
STATUS_KEYS = {"state", "activated_at", "disks", "memory_file", "memory_restored", "error"}
COMMANDS = ("enable", "status", "commit", "discard", "recover", "check")
OPERATIONS = tuple(op.value for op in (*BLOCKED_OPERATIONS, *ALWAYS_ALLOWED))
#: hypothesis and pytest's function-scoped fixtures: the tree is meant to survive every example.
SHARED_TREE = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@attrs.frozen
class Tree:
    root: Path
    state: Path
    socket: str

    def base(self, *extra: str) -> list[str]:
        return ["--qmp", self.socket, "--state-dir", str(self.state), *extra]


def tree_record(root: Path, state: State = State.DISCARDED, **changes: Any) -> SessionRecord:
    """A session record (finished, by default) whose files are all inside ``root`` and whose QEMU
    is a program that does not exist, so nothing a test runs can ever start a real process or
    touch a real file."""
    values: dict[str, Any] = {"disks": (make_disk(root=root / "images"),)}
    if state is State.DISCARDED:
        values.update(pause_ms=12.5, memory_restored=True, resume_seconds=1.5)
    values.update(changes)
    return make_record(state, root=root, **values)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tree:
    root = tmp_path / "tree"
    (root / "cwd").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "images" / "disk0.qcow2").write_bytes(b"not really an image")
    state = root / "state"
    with InstanceLock(StateDir(state)):
        pass
    RecordStore(StateDir(state)).save(tree_record(root))
    monkeypatch.chdir(root / "cwd")
    monkeypatch.setenv("FORGEQMP_STATE_HOME", str(root / "home"))
    monkeypatch.delenv("FORGEQMP_QMP", raising=False)
    return Tree(root=root, state=state, socket=str(root / "qmp.sock"))


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every entry below ``root``: its mode and content (file bytes, link target)."""
    found: dict[str, tuple[int, bytes | str | None]] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            st_ = os.lstat(path)
            content: bytes | str | None = None
            if stat.S_ISLNK(st_.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st_.st_mode):
                content = Path(path).read_bytes()
            found[path] = (st_.st_mode, content)
    return found


@attrs.frozen
class Result:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Result:
    """``forgeqmp ARGV`` in process; any exception but SystemExit is a crash and fails the test."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors, --help, --version
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return Result(code, out, err)


# --- strategies ----------------------------------------------------------------------------------

#: Any text the command line can carry (no lone surrogates: argv is bytes decoded by the OS),
#: NUL bytes included: an in-process caller can pass them.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
#: Text that, taken as a path, stays inside the working directory (so inside the tree).
local_text = any_text.filter(lambda t: not t.startswith(("/", "~")) and ".." not in t)
weird = st.sampled_from(
    ["", " ", "\0", "a\0b", "-", "--", "—timeout", "١", "𝟙", "½", "\u202e", "ﬀ", "e", "0x10", "∞"]
)
bad_timeouts = st.one_of(
    st.sampled_from(
        [
            *("0", "-1", "-0", "nan", "NaN", "inf", "-inf", "1e400", "", " ", "1s", "1,5"),
            *("1_0", "١", "٣٠", "𝟙", "１０", " 10", "10 ", "+5", "0x10"),
        ]
    ),
    st.floats(max_value=0).map(repr),
    any_text.filter(lambda t: not _positive_number(t)),
)
unknown_commands = st.one_of(weird, any_text).filter(lambda t: t not in COMMANDS)
unknown_options = st.one_of(weird, any_text).map(lambda t: "--x-" + t)
bad_operations = st.one_of(weird, any_text).filter(
    lambda t: t.strip().lower().replace("_", "-") not in OPERATIONS
)
bad_strategies = st.one_of(weird, any_text).filter(lambda t: t not in {s.value for s in Strategy})


def _positive_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return value > 0 and value != float("inf")


@st.composite
def usage_errors(draw: st.DrawFn, tree: Tree) -> list[str]:
    """A command line with one thing wrong that the contract calls a usage error."""
    kind = draw(
        st.sampled_from(
            [
                "command",
                "option",
                "timeout",
                "strategy",
                "operation",
                "no-command",
                "no-qmp",
                "empty-state-dir",
                "nul-path",
                "both-disk-options",
            ]
        )
    )
    base = tree.base()
    if kind == "command":
        return [*base, draw(unknown_commands)]
    if kind == "option":
        command = draw(st.sampled_from(COMMANDS[:-1]))
        return [*base, command, draw(unknown_options)]
    if kind == "timeout":
        command = draw(st.sampled_from(["enable", "commit", "discard", "recover"]))
        return [*base, command, "--timeout", draw(bad_timeouts)]
    if kind == "strategy":
        return [*base, "enable", "--strategy", draw(bad_strategies)]
    if kind == "operation":
        return [*base, "check", draw(bad_operations)]
    if kind == "no-command":
        return base
    if kind == "no-qmp":
        return ["--state-dir", str(tree.state), draw(st.sampled_from(COMMANDS[:-1]))]
    if kind == "empty-state-dir":
        return ["--qmp", tree.socket, "--state-dir", "", draw(st.sampled_from(COMMANDS[:-1]))]
    if kind == "nul-path":
        where = draw(st.sampled_from(["qmp", "state-dir"]))
        nul = draw(local_text) + "\0" + draw(local_text)
        if where == "qmp":
            # status and check read the state dir only: with --state-dir they never use SOCKET.
            command = draw(st.sampled_from(["enable", "commit", "discard", "recover"]))
            return ["--qmp", nul, "--state-dir", str(tree.state), command]
        command = draw(st.sampled_from(COMMANDS[:-1]))
        return ["--qmp", tree.socket, "--state-dir", nul, command]
    return [*base, "enable", "--disk", draw(local_text), "--all-disks"]


# --- arguments -----------------------------------------------------------------------------------


@settings(max_examples=150, suppress_health_check=SHARED_TREE)
@given(data=st.data())
def test_usage_errors_exit_2_and_change_nothing(
    tree: Tree, capsys: pytest.CaptureFixture[str], data: st.DataObject
) -> None:
    before = snapshot(tree.root)
    argv = data.draw(usage_errors(tree), label="argv")
    result = run_cli(capsys, argv)
    assert result.code == 2, (argv, result)
    assert result.err.strip(), "a usage error says what is wrong"
    assert snapshot(tree.root) == before


vocabulary = st.one_of(
    st.sampled_from(
        [
            *COMMANDS,
            *OPERATIONS,
            "--json",
            "--timeout",
            "--disk",
            "--all-disks",
            "--strategy",
            "--overlay-dir",
            "--cold",
            "--qmp",
            "--state-dir",
            "precopy",
            "mapped-ram",
            "1",
            "0.5",
        ]
    ),
    weird,
    local_text,
)


@settings(max_examples=300, suppress_health_check=SHARED_TREE)
@given(data=st.data())
def test_any_command_line_gets_a_contract_exit_code(
    tree: Tree, capsys: pytest.CaptureFixture[str], data: st.DataObject
) -> None:
    """Random words in random order: never a crash, always a contract exit code, and a refusal
    (2, 3, 5) leaves everything as it was. The session in the tree is finished and its QEMU is a
    program that does not exist, so even a valid command cannot start anything."""
    before = snapshot(tree.root)
    head = data.draw(st.sampled_from([tree.base(), tree.base("--json"), []]), label="head")
    argv = head + data.draw(st.lists(vocabulary, max_size=6), label="words")
    # --help and --version print and exit 0: fine, but nothing to check.
    assume(not {"-h", "--help", "--version"} & set(argv))
    result = run_cli(capsys, argv)
    assert result.code in CONTRACT_CODES, (argv, result)
    if result.code in REFUSALS:
        assert snapshot(tree.root) == before, argv
    if "--json" in argv and result.code != 2 and result.out:
        lines = result.json_lines()  # every line of stdout is JSON
        assert set(lines[-1]) >= STATUS_KEYS, lines[-1]
        if result.code != 0:  # failed or refused: it says so plainly, for a platform to branch on
            final = lines[-1]
            assert final["exit_code"] == result.code, (argv, final)
            assert isinstance(final["error_kind"], str), final
            assert final["error_kind"], final
            assert final["next_step"], final
            assert final["command"] in argv, final
            if result.code in REFUSALS:
                assert final["changed"] is False, final


def test_help_and_version_exit_0(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["--version"], [*tree.base(), "enable", "--help"]):
        assert run_cli(capsys, argv).code == 0


# --- sockets that are not QMP --------------------------------------------------------------------


@contextlib.contextmanager
def peer(path: str, handler: Callable[[socket.socket], None]) -> Iterator[None]:
    """A unix socket server at ``path`` running ``handler`` on each client, in a thread."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(0.05)
    stop = threading.Event()
    clients: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            clients.append(client)
            with contextlib.suppress(OSError):
                handler(client)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        for client in clients:
            client.close()
        server.close()
        os.unlink(path)


GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}\r\n'


def _garbage(c: socket.socket) -> None:
    c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\xfe garbage {{{\n")


def _flood(c: socket.socket) -> None:
    c.settimeout(5)
    with contextlib.suppress(OSError):
        for _ in range(64):
            c.sendall(b"x" * 65536)  # one endless line, never a newline


def _json_not_qmp(c: socket.socket) -> None:
    c.sendall(b'{"hello": "world"}\r\n')


def _refuses_capabilities(c: socket.socket) -> None:
    c.sendall(GREETING)
    c.settimeout(5)
    with contextlib.suppress(OSError):
        c.recv(4096)
        c.sendall(b'{"error": {"class": "GenericError", "desc": "go away"}}\r\n')


def _greets_then_hangs(c: socket.socket) -> None:
    c.sendall(GREETING)  # and never answers qmp_capabilities


@pytest.mark.parametrize(
    "handler",
    [_garbage, _json_not_qmp, _refuses_capabilities, lambda c: c.close()],
    ids=["garbage", "json-not-qmp", "refuses-capabilities", "hangs-up"],
)
def test_peers_that_are_not_qmp_exit_5_at_once(
    tree: Tree, capsys: pytest.CaptureFixture[str], handler: Callable[[socket.socket], None]
) -> None:
    before = snapshot(tree.root)
    with peer(tree.socket, handler):
        for command in ("enable", "commit", "discard", "recover"):
            result = run_cli(capsys, [*tree.base("--json"), command])
            assert result.code == 5, (command, result)
            # Ended by what the peer said, not by the connect deadline (no wall clock: the
            # deadline path is the only one that reports a missing greeting).
            assert "no QMP greeting within" not in result.err, (command, result.err)
            assert "QMP" in result.err, (command, result.err)
            assert tree.socket in result.err
            final = result.json_lines()[-1]
            assert (final["exit_code"], final["state"]) == (5, "discarded")
    assert snapshot(tree.root) == before


@pytest.mark.parametrize(
    ("handler", "command"),
    [(lambda c: None, "enable"), (_greets_then_hangs, "commit"), (_flood, "discard")],
    ids=["silent-enable", "greets-then-hangs-commit", "flood-discard"],
)
def test_peers_that_hang_exit_5_within_the_connect_deadline(
    tree: Tree,
    capsys: pytest.CaptureFixture[str],
    handler: Callable[[socket.socket], None],
    command: str,
) -> None:
    """A peer that accepts and then says nothing, greets and then nothing, or sends one endless
    line (qemu.qmp drops what exceeds its line limit and reads on): exit 5 once the connect
    deadline passes, not later. commit and discard may work offline, but a socket somebody
    listens on is never taken for a stopped QEMU."""
    before = snapshot(tree.root)
    with peer(tree.socket, handler):
        result = run_cli(capsys, [*tree.base(), command])
    assert result.code == 5, result
    # Ended by the connect deadline (anyio.fail_after), and the message names it; how long that
    # took on the wall clock is no test's business.
    assert f"no QMP greeting within {DEFAULT_CONNECT_TIMEOUT:g} s" in result.err, result.err
    assert snapshot(tree.root) == before


# --- session records that are damaged ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def damaged_records(draw: st.DrawFn, good: bytes) -> bytes:
    """The record's bytes flipped, truncated, or its JSON hand-edited somewhere."""
    how = draw(st.sampled_from(["flip", "truncate", "edit", "garbage"]))
    if how == "flip":
        raw = bytearray(good)
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    if how == "truncate":
        return good[: draw(st.integers(0, len(good) - 1))]
    if how == "garbage":
        return draw(st.binary(max_size=200))
    obj = json.loads(good)
    node: Any = obj
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        deeper = [k for k in keys if isinstance(node[k], dict | list) and node[k]]
        if not deeper or draw(st.booleans()):
            break
        node = node[draw(st.sampled_from(deeper))]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if keys and draw(st.booleans()):
        node[draw(st.sampled_from(keys))] = draw(json_values)
    elif keys and draw(st.booleans()):
        del node[draw(st.sampled_from(keys))]
    elif isinstance(node, dict):
        node[draw(any_text)] = draw(json_values)
    return json.dumps(obj).encode()


@settings(max_examples=150, suppress_health_check=SHARED_TREE)
@given(data=st.data())
def test_damaged_records_are_record_errors_and_stay_as_they_are(
    tree: Tree, capsys: pytest.CaptureFixture[str], data: st.DataObject
) -> None:
    store = RecordStore(StateDir(tree.state))
    active = tree_record(tree.root, State.ACTIVE)
    good = data.draw(st.sampled_from([active, store.load()]), label="record").to_json()
    damaged = data.draw(damaged_records(good), label="damaged")
    try:
        parsed: SessionRecord | None = SessionRecord.from_json(damaged)
    except RecordError:
        parsed = None
    # A damaged record that still parses is a different, valid record: status must show it; the
    # commands that act on a session are only run on records forgeqmp refuses to read.
    path = tree.state / RECORD_FILE
    original = path.read_bytes()
    StateDir(tree.state).atomic_write(RECORD_FILE, damaged)
    try:
        before = snapshot(tree.root)
        status = run_cli(capsys, [*tree.base("--json"), "status"])
        final = status.json_lines()[-1]
        assert set(final) >= STATUS_KEYS
        if parsed is None:
            # Refused (3: nothing changed), whatever reads it; enable talks to QEMU first.
            assert status.code == 3, status
            assert (final["exit_code"], final["error_kind"]) == (3, "record-unreadable")
            assert str(path) in status.err
            assert run_cli(capsys, [*tree.base(), "status"]).code == 3
            expected = {"commit": 3, "discard": 3, "enable": 5, "check destroy": 3}
        else:
            assert status.code == 0, status
            assert final["state"] == parsed.state.value
            expected = {"check start": 0}
        expected["check console"] = 0  # always allowed, even when the record is unreadable
        for words, code in expected.items():
            result = run_cli(capsys, [*tree.base(), *words.split()])
            assert result.code == code, (words, result)
        assert snapshot(tree.root) == before
    finally:
        StateDir(tree.state).atomic_write(RECORD_FILE, original)


@pytest.mark.parametrize("command", ["status", "commit", "discard", "check destroy", "enable"])
def test_a_record_that_is_not_a_file_is_refused(
    tree: Tree, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A FIFO, a directory or a symlink at the record's path: refused without blocking or
    following (a FIFO opened for reading would hang a naive reader forever)."""
    path = tree.state / RECORD_FILE
    target = tree.root / "elsewhere.json"
    target.write_bytes(path.read_bytes())
    plants: list[Callable[[Path], None]] = [os.mkfifo, os.mkdir, lambda p: os.symlink(target, p)]
    for plant in plants:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
        plant(path)
        before = snapshot(tree.root)
        result = run_cli(capsys, [*tree.base(), *command.split()])
        expected = {"enable": 5}.get(command, 3)  # refused: nothing changed
        assert result.code == expected, (plant, result)
        assert snapshot(tree.root) == before


@pytest.mark.parametrize("command", ["commit", "discard"])
def test_no_session_is_refused_without_creating_the_state_dir(
    tree: Tree, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A mistyped --state-dir while nothing listens on the socket: QEMU unreachable (5, as for a
    socket that does not speak QMP: there is no session to act on offline), the message says the
    state dir holds no session, and no directory (with a lock in it) appears there."""
    typo = tree.root / "cwd" / "typo" / "state"
    before = snapshot(tree.root)
    result = run_cli(capsys, ["--qmp", tree.socket, "--state-dir", str(typo), command])
    assert result.code == 5, result
    assert f"the state dir {typo} holds no session {command} could act on" in result.err
    assert snapshot(tree.root) == before
