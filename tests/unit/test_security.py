"""Security properties that need no QEMU: no shell and no ``exec:`` migration URI anywhere in the
source (read with ``ast``, not grepped), QEMU's log private and never reached through a symlink, and
paths that cannot name a socket refused as invalid arguments."""

from __future__ import annotations

import ast
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import forgeqmp
from forgeqmp.adapters.launcher import LaunchSpec, detached_launcher
from forgeqmp.adapters.qmp import QMPConnection
from forgeqmp.errors import ForgeFailed, InvalidArgument

SRC = Path(forgeqmp.__file__).parent

#: Calls that always run a shell, by their full dotted name.
SHELL_FUNCTIONS = frozenset(
    {
        "os.system",
        "os.popen",
        "subprocess.getoutput",
        "subprocess.getstatusoutput",
        "asyncio.create_subprocess_shell",
    }
)
#: Methods that always run a shell, whatever object they are called on (``loop.subprocess_shell``).
SHELL_METHODS = frozenset({"create_subprocess_shell", "subprocess_shell"})
#: Calls that run a shell when given one string instead of an argv list.
STRING_MEANS_SHELL = frozenset({"anyio.run_process", "anyio.open_process"})


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _is_text(node: ast.expr) -> bool:
    """A string literal, an f-string, or a concatenation or %-format of one."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _is_text(node.left) or _is_text(node.right)
    return False


def _starts_with_exec(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.strip().lower().startswith("exec:")
    if isinstance(node, ast.JoinedStr) and node.values:
        return _starts_with_exec(node.values[0])
    if isinstance(node, ast.BinOp):
        return _starts_with_exec(node.left)
    return False


def violations(source: str, filename: str = "<src>") -> Iterator[str]:
    """What in ``source`` would run a shell or migrate to ``exec:``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            for keyword in node.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    yield f"{where}: {name or 'a call'}(..., shell=...)"
            if name in SHELL_FUNCTIONS:
                yield f"{where}: {name}() runs a shell"
            if isinstance(node.func, ast.Attribute) and node.func.attr in SHELL_METHODS:
                yield f"{where}: .{node.func.attr}() runs a shell"
            if name in STRING_MEANS_SHELL:
                command = node.args[0] if node.args else None
                for keyword in node.keywords:
                    if keyword.arg == "command":
                        command = keyword.value
                if command is not None and _is_text(command):
                    yield f"{where}: {name}() with a string runs it through a shell"
        elif isinstance(node, ast.Constant | ast.JoinedStr | ast.BinOp) and _starts_with_exec(node):
            yield f"{where}: an exec: migration URI runs a shell command"


def source_files() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"found only {files} under {SRC}"
    return files


def test_the_source_never_runs_a_shell_or_an_exec_migration() -> None:
    found = [v for path in source_files() for v in violations(path.read_text(), str(path))]
    assert found == []


def test_the_checker_finds_what_it_looks_for() -> None:
    """The scan above would pass on an empty tree; here each forbidden form must be found."""
    snippet = """
import os, subprocess, asyncio, anyio
from subprocess import run as go
from os import system
go("ls", shell=True)
subprocess.Popen(["ls"], shell=flag)
system("ls")
os.popen("ls")
subprocess.getoutput("ls")
asyncio.create_subprocess_shell("ls")
loop.subprocess_shell(factory, "ls")
anyio.run_process("ls -l")
anyio.open_process(command=f"ls {x}")
uri = "exec:cat > /tmp/x"
uri2 = f"exec:{cmd}"
uri3 = " EXEC:" + cmd
"""
    found = list(violations(snippet))
    lines = sorted({int(v.split(":")[1]) for v in found})
    assert lines == list(range(5, 17)), found
    harmless = """
import subprocess, anyio
subprocess.run(["qemu-img", "info", path], shell=False)
anyio.run_process([binary, "commit", overlay])
uri = "fd:forgeqmp-save"
doc = "never an exec: URI"
"""
    assert list(violations(harmless)) == []


# --- QEMU's log ----------------------------------------------------------------------------------


def _spec(tmp_path: Path, log: Path) -> LaunchSpec:
    """A "QEMU" that prints a line and exits: the launcher gives up waiting for its socket."""
    return LaunchSpec(
        argv=(sys.executable, "-c", "print('hello from qemu')"),
        cwd=str(tmp_path),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        qmp_socket=str(tmp_path / "qmp.sock"),
        incoming=False,
        log_file=str(log),
    )


def test_qemu_log_is_private_whatever_the_umask(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    old = os.umask(0)
    try:
        with pytest.raises(ForgeFailed, match="hello from qemu"):
            anyio.run(lambda: detached_launcher(_spec(tmp_path, log), timeout=1.0))
    finally:
        os.umask(old)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_qemu_log_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    os.chmod(target, 0o644)
    log = tmp_path / "qemu.log"
    log.symlink_to(target)
    with pytest.raises(ForgeFailed, match="cannot open QEMU's log"):
        anyio.run(lambda: detached_launcher(_spec(tmp_path, log), timeout=1.0))
    assert target.read_text() == "precious\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


# --- socket paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "\0", "/run/vm\0/qmp.sock"])
def test_a_socket_path_that_cannot_exist_is_an_invalid_argument(path: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid QMP socket path") as info:
        QMPConnection(path)
    assert info.value.exit_code == 2
