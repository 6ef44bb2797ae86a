"""The executable launcher (the CLI's --launcher PATH) without QEMU: how the platform's program is
called (argv, environment, working directory, log), and every way it can fail is a typed error
quoting it."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import anyio
import pytest

from forgeqmp.adapters.launcher import LaunchSpec, executable_launcher
from forgeqmp.cli import main
from forgeqmp.errors import ForgeFailed, InvalidArgument


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "launch"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return path


def spec(tmp_path: Path, *, incoming: bool = True) -> LaunchSpec:
    return LaunchSpec(
        argv=("/usr/bin/qemu-system-x86_64", "-name", "vm 1", "-incoming", "defer", "-S"),
        cwd=str(tmp_path),
        env={"PATH": os.environ.get("PATH", os.defpath), "QEMU_ENV": "yes"},
        qmp_socket=str(tmp_path / "qmp.sock"),
        incoming=incoming,
        log_file=str(tmp_path / "qemu.log"),
    )


def test_the_program_gets_the_argv_environment_and_cwd(tmp_path: Path) -> None:
    # (It exits 5 so that no QEMU is needed: the call is the same; the success path, exit 0 and
    # QMP answering, runs on real QEMU in tests/integration/test_launcher.py.)
    calls = tmp_path / "calls.json"
    sock = tmp_path / "qmp.sock"
    program = script(
        tmp_path,
        f"""
json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
           "stdin": sys.stdin.read(), "stale": os.path.lexists({str(sock)!r})}},
          open({str(calls)!r}, "w"))
print("launcher was here")
sys.exit(5)
""",
    )
    # The stale socket file of the previous QEMU is removed before the call.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    with pytest.raises(ForgeFailed) as failed:
        anyio.run(executable_launcher(program), spec(tmp_path))
    assert "exited with status 5" in str(failed.value)
    assert "launcher was here" in str(failed.value)
    seen = json.loads(calls.read_text())
    assert seen["argv"] == list(spec(tmp_path).argv)
    assert seen["cwd"] == str(tmp_path)
    assert seen["stdin"] == ""
    assert seen["stale"] is False
    env = seen["env"]
    assert env["QEMU_ENV"] == "yes"  # QEMU's recorded environment
    assert env["FORGEQMP_QMP_SOCKET"] == str(sock)
    assert env["FORGEQMP_INCOMING"] == "1"
    assert env["FORGEQMP_CWD"] == str(tmp_path)
    assert env["FORGEQMP_LOG_FILE"] == str(tmp_path / "qemu.log")
    assert "launcher was here" in (tmp_path / "qemu.log").read_text()


def test_a_failing_program_is_a_typed_failure_quoting_it(tmp_path: Path) -> None:
    (tmp_path / "qemu.log").write_text("an older QEMU's message\n")
    program = script(tmp_path, 'print("no bridge br0", file=sys.stderr); sys.exit(3)')
    with pytest.raises(ForgeFailed) as failed:
        anyio.run(executable_launcher(program), spec(tmp_path, incoming=False))
    message = str(failed.value)
    assert "exited with status 3" in message
    assert "no bridge br0" in message
    assert "older QEMU" not in message  # only what the launcher wrote


def test_a_program_that_does_not_exit_is_killed(tmp_path: Path) -> None:
    program = script(tmp_path, 'print("waiting forever", flush=True); time.sleep(3600)')
    with pytest.raises(ForgeFailed) as failed:
        anyio.run(executable_launcher(program, timeout=1.0), spec(tmp_path))
    assert "did not exit within 1 s" in str(failed.value)
    assert "waiting forever" in str(failed.value)


def test_exit_0_without_qmp_is_a_failure(tmp_path: Path) -> None:
    program = script(tmp_path, "sys.exit(0)")
    with pytest.raises(ForgeFailed) as failed:
        anyio.run(executable_launcher(program, timeout=1.0), spec(tmp_path))
    assert "did not answer" in str(failed.value)
    assert "after the launcher" in str(failed.value)


def test_a_path_that_is_not_an_executable_is_an_invalid_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    for path in (plain, tmp_path / "missing", tmp_path):
        with pytest.raises(InvalidArgument):
            executable_launcher(path)
    # Through the CLI: exit 2, before anything (no state dir is created).
    state = tmp_path / "state"
    args = ["--launcher", str(plain), "--qmp", str(tmp_path / "none.sock")]
    assert main([*args, "--state-dir", str(state), "discard"]) == 2
    assert "not an executable" in capsys.readouterr().err
    assert not state.exists()
