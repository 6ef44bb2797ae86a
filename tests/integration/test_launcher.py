"""VMs a platform starts its own way, on real QEMU (every installed build), through the CLI.

The guest is started the way libvirt starts it: the test creates the QMP monitor socket and QEMU
inherits it (``-chardev socket,id=charmonitor,fd=N,server=on,wait=off -mon
chardev=charmonitor,...``). forgeqmp cannot start such a command line again, so enable without a
launcher is refused (exit 3, nothing changed); with a launcher script that recreates the socket
and passes it as an fd exactly like libvirt, enable -> discard (memory restored, the counter goes
on) and enable -> commit work. A launcher that fails is a typed failure quoting it, and the
memory state is kept for a second discard; recover finishes an interrupted discard through the
launcher. A relaunched QEMU killed while it loads the memory state is started again and the
memory is restored, not thrown away. A ``-daemonize`` QEMU needs no launcher.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import forgeqmp
from forgeqmp.adapters.crashpoints import ENABLE_ENV as CRASH_ENABLE
from forgeqmp.adapters.crashpoints import ENV as CRASH_ENV
from forgeqmp.core.states import State

from .helpers import qmp, run

pytestmark = pytest.mark.qemu

#: The platform's launcher, as a platform would write it: it binds the monitor socket at
#: FORGEQMP_QMP_SOCKET, passes it to QEMU as an inherited fd (a new number: the one in the argv
#: was the previous QEMU's), starts QEMU detached and exits 0 once the socket listens.
LAUNCHER = """\
#!{python}
import json, os, socket, subprocess, sys

calls = {calls!r}
fail = {fail!r}
argv = sys.argv[1:]
with open(calls, "a") as f:
    f.write(json.dumps({{
        "argv": argv,
        "incoming": os.environ["FORGEQMP_INCOMING"],
        "cwd": os.environ["FORGEQMP_CWD"],
        "pwd": os.getcwd(),
        "socket": os.environ["FORGEQMP_QMP_SOCKET"],
        "log": os.environ["FORGEQMP_LOG_FILE"],
    }}) + "\\n")
if fail and os.path.exists(fail):
    print("launcher: bridge br-test is down, not starting the VM", file=sys.stderr)
    sys.exit(7)
path = os.environ["FORGEQMP_QMP_SOCKET"]
try:
    os.unlink(path)
except FileNotFoundError:
    pass
monitor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
monitor.bind(path)
monitor.listen(8)
fd = monitor.fileno()
out = []
for arg in argv:
    if arg.startswith("socket,id=charmonitor,"):
        arg = ",".join("fd=%d" % fd if p.startswith("fd=") else p for p in arg.split(","))
    out.append(arg)
env = {{k: v for k, v in os.environ.items() if not k.startswith("FORGEQMP_")}}
subprocess.Popen(out, pass_fds=(fd,), start_new_session=True, stdin=subprocess.DEVNULL, env=env)
sys.exit(0)
"""


def write_launcher(tmp_path: Path, *, fail: Path | None = None) -> tuple[Path, Path]:
    """The launcher script and the file where it logs its calls (JSON lines)."""
    calls = tmp_path / "launcher-calls.jsonl"
    script = tmp_path / "launch-vm"
    script.write_text(
        LAUNCHER.format(python=sys.executable, calls=str(calls), fail=str(fail) if fail else "")
    )
    script.chmod(0o755)
    return script, calls


def calls_of(calls: Path) -> list[dict[str, Any]]:
    if not calls.exists():
        return []
    return [json.loads(line) for line in calls.read_text().splitlines()]


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]], str]:
    """``forgeqmp ARGS``: (exit code, JSON lines of stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "forgeqmp", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines, proc.stderr


def observe(vm: Any, state: Path) -> dict[str, Any]:
    """What a refusal must leave as it was: QEMU's block graph, jobs, run state, migration
    settings and fd sets, the process, and the files in the state dir and beside the disks."""

    async def ask() -> dict[str, Any]:
        async with forgeqmp.QMPConnection(vm.qmp_socket) as conn:
            names = ["query-named-block-nodes", "query-jobs", "query-status", "query-fdsets"]
            names += ["query-migrate", "query-migrate-capabilities", "query-migrate-parameters"]
            replies = {name: await conn.execute(name) for name in names}
            blocks = await conn.execute("query-block")
        replies["query-named-block-nodes"] = sorted(
            n["node-name"] for n in replies["query-named-block-nodes"]
        )
        replies["query-block"] = sorted(
            (b["qdev"], b["inserted"]["node-name"]) for b in blocks if b.get("inserted")
        )
        replies["query-status"] = replies["query-status"]["status"]
        return replies

    files: dict[str, Any] = {}
    for top in (state, vm.workdir):
        for root, _dirs, names in os.walk(top):
            for name in names:
                path = Path(root, name)
                info = path.lstat()
                if top == state and stat.S_ISREG(info.st_mode):
                    files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:  # images and logs change on their own: the names must not
                    files[str(path)] = stat.S_IFMT(info.st_mode)
    return {"qemu": run(ask), "pid": vm.pid, "files": files, "state_exists": state.exists()}


def final(lines: list[dict[str, Any]]) -> dict[str, Any]:
    assert lines, "no JSON on stdout"
    return lines[-1]


def test_inherited_monitor_fd_is_refused_without_a_launcher(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=256, monitor_fd=True)
    monitor = [a for a in vm.argv if a.startswith("socket,id=charmonitor,fd=")]
    assert len(monitor) == 1, vm.argv
    assert not [a for a in vm.argv if a.startswith("unix:")]  # no -qmp: only the inherited fd
    state = tmp_path / "state"
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]
    before = observe(vm, state)
    assert before["state_exists"] is False

    code, lines, err = cli(*base, "enable", "--all-disks")
    assert code == 3, err
    assert f"-chardev {monitor[0]}" in err  # the argument, as on the command line
    assert "--launcher PATH" in err  # and the remedy
    assert "nothing was changed" in err
    out = final(lines)
    assert (out["state"], out["exit_code"]) == ("none", 3)
    assert observe(vm, state) == before  # no state dir, no overlay, no node, no fd set
    # The API says the same, with the findings attached.
    with pytest.raises(forgeqmp.NotRelaunchable) as refused:
        run(enable_api, vm.qmp_socket, state)
    assert [f.item for f in refused.value.findings] == [  # type: ignore[attr-defined]
        monitor[0].split(",")[2]
    ]
    assert observe(vm, state) == before
    # The guest still runs.
    since = time.monotonic()
    vm.wait_counter(since=since)


async def enable_api(socket: str, state: Path) -> forgeqmp.SessionRecord:
    async with forgeqmp.connect(socket, state_dir=state) as vm:
        return await vm.enable()


def test_launcher_script_gives_full_cycles(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=256, monitor_fd=True)
    script, calls = write_launcher(tmp_path)
    state = tmp_path / "state"
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]

    # enable with the launcher: accepted; the launcher is not called yet.
    data_a = vm.write_disk("disk0", 8, seed="A")
    at_enable = vm.wait_counter()
    code, lines, err = cli("--launcher", str(script), *base, "enable")
    assert code == 0, err
    assert final(lines)["state"] == "active"
    assert calls_of(calls) == []
    assert vm.write_disk("disk0", 8, seed="B") != data_a
    vm.wait_counter(min_value=at_enable[1] + 15)

    # discard without a launcher would kill the VM for good: refused, nothing changed.
    before = observe(vm, state)
    code, lines, err = cli(*base, "discard")
    assert code == 3, err
    assert "-chardev socket,id=charmonitor,fd=" in err
    assert final(lines)["state"] == "active"
    assert observe(vm, state) == before

    # discard with it (FORGEQMP_LAUNCHER stands in for --launcher): memory restored.
    old_pid = vm.pid
    latest = vm.counter()
    asked = time.monotonic()
    code, lines, err = cli(*base, "discard", env={"FORGEQMP_LAUNCHER": str(script)})
    assert code == 0, err
    status = final(lines)
    assert (status["state"], status["memory_restored"], status["error"]) == (
        "discarded",
        True,
        None,
    )
    _last, resumed = vm.wait_counter_rewind(since=asked)
    assert resumed[0] == at_enable[0]  # the same boot goes on, from about the enable
    assert at_enable[1] <= resumed[1] < latest[1]
    assert vm.pid != old_pid
    assert vm.disk_md5("disk0", 8) == data_a
    (call,) = calls_of(calls)
    assert call["incoming"] == "1"
    assert call["argv"][-3:] == ["-incoming", "defer", "-S"]
    assert call["argv"][:-3] == list(vm.argv)  # the recorded argv, as it was
    assert call["cwd"] == call["pwd"] == str(vm.workdir)
    assert call["socket"] == vm.qmp_socket
    assert call["log"] == str(state / "qemu.log")
    # The relaunched QEMU got its monitor the libvirt way too.
    relaunched = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
    assert any(a.startswith(b"socket,id=charmonitor,fd=") for a in relaunched)
    assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"

    # enable -> commit through the launcher-started QEMU: every write kept, the VM running.
    code, lines, err = cli("--launcher", str(script), *base, "enable")
    assert code == 0, err
    data_c = vm.write_disk("disk0", 8, seed="C")
    code, lines, err = cli("--launcher", str(script), *base, "commit")
    assert code == 0, err
    assert final(lines)["state"] == "committed"
    assert vm.disk_md5("disk0", 8) == data_c
    assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"
    assert len(calls_of(calls)) == 1  # commit never restarts QEMU


def test_failing_launcher_keeps_the_memory_for_another_discard(
    qemu_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=256, monitor_fd=True)
    broken = tmp_path / "bridge-down"
    script, calls = write_launcher(tmp_path, fail=broken)
    state = tmp_path / "state"
    base = ["--launcher", str(script), "--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]
    at_enable = vm.wait_counter()
    code, _lines, err = cli(*base, "enable")
    assert code == 0, err
    vm.wait_counter(min_value=at_enable[1] + 10)

    broken.write_text("")
    _code, _lines, err = cli(*base, "discard")
    record = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    assert record is not None
    assert record.state is State.FAILED, record
    assert record.error is not None
    assert "exited with status 7" in record.error
    assert "bridge br-test is down" in record.error  # the launcher's own words
    assert record.next_step is not None
    assert "'forgeqmp discard' again" in record.next_step
    assert record.memory is not None
    assert os.path.exists(record.memory.path)
    # The cold-start command line in next_step can be pasted into a shell as it is.
    pasted = record.next_step.split("start the VM cold with: cd ", 1)[1].split(", then run")[0]
    words = shlex.split(pasted)
    assert words[0] == str(vm.workdir)
    assert words[1] == "&&"
    assert tuple(words[2:]) == forgeqmp.cold_argv(record.qemu.argv)
    assert all(c["incoming"] == "1" for c in calls_of(calls))
    assert len(calls_of(calls)) == 3  # every restore attempt, then the failure

    broken.unlink()  # the platform fixed its side: the same discard now restores the memory
    code, lines, err = cli(*base, "discard")
    assert code == 0, err
    status = final(lines)
    assert (status["state"], status["memory_restored"]) == ("discarded", True)
    resumed = vm.wait_counter(since=time.monotonic())
    assert resumed[0] == at_enable[0]
    assert resumed[1] >= at_enable[1]


def test_discard_retries_the_restore_when_qemu_dies_loading(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=256)
    state = tmp_path / "state"
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]
    data_a = vm.write_disk("disk0", 8, seed="A")
    at_enable = vm.wait_counter()
    code, _lines, err = cli(*base, "enable")
    assert code == 0, err
    vm.write_disk("disk0", 8, seed="B")
    latest = vm.wait_counter(min_value=at_enable[1] + 15)

    # The relaunched QEMU is SIGKILLed once, just after it started waiting for the memory state.
    asked = time.monotonic()
    code, lines, err = cli(
        *base, "discard", env={CRASH_ENV: "discard:qemu-launched:qemu", CRASH_ENABLE: "1"}
    )
    assert code == 0, err
    status = final(lines)
    assert (status["state"], status["memory_restored"], status["error"]) == (
        "discarded",
        True,
        None,
    )
    retries = [
        line for line in lines if line.get("step") == "restoring-memory" and line.get("attempt")
    ]
    assert len(retries) == 1, lines
    assert retries[0]["attempt"] == 2
    assert "loading the memory state failed" in retries[0]["after"]
    _last, resumed = vm.wait_counter_rewind(since=asked)
    assert resumed[0] == at_enable[0]  # not a cold boot
    assert at_enable[1] <= resumed[1] < latest[1]
    assert vm.boot_ids().count(at_enable[0]) == 1
    assert vm.disk_md5("disk0", 8) == data_a


def test_recover_finishes_an_interrupted_discard_through_the_launcher(
    qemu_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=256, monitor_fd=True)
    script, calls = write_launcher(tmp_path)
    state = tmp_path / "state"
    base = ["--launcher", str(script), "--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]
    at_enable = vm.wait_counter()
    code, _lines, err = cli(*base, "enable")
    assert code == 0, err
    vm.wait_counter(min_value=at_enable[1] + 10)

    # The controller is SIGKILLed once the old QEMU is gone: the VM is down, mid-discard.
    code, _lines, _err = cli(
        *base, "discard", env={CRASH_ENV: "discard:qemu-stopped", CRASH_ENABLE: "1"}
    )
    assert code == -9
    assert calls_of(calls) == []
    code, lines, err = cli(*base, "recover")
    assert code == 0, err
    status = final(lines)
    assert (status["state"], status["memory_restored"]) == ("discarded", True), status
    (call,) = calls_of(calls)
    assert call["incoming"] == "1"
    resumed = vm.wait_counter(since=time.monotonic())
    assert resumed[0] == at_enable[0]
    assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"


def test_a_daemonized_qemu_is_relaunched_without_a_launcher(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # -daemonize is reproducible: the relaunch analysis finds nothing, enable accepts it and the
    # default launcher restores the memory into a QEMU that daemonizes again.
    vm = qemu_factory(memory_mib=256, extra_args=["-daemonize"])
    assert forgeqmp.relaunch_findings(vm.argv) == ()
    state = tmp_path / "state"
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]
    at_enable = vm.wait_counter()
    code, _lines, err = cli(*base, "enable")
    assert code == 0, err
    vm.wait_counter(min_value=at_enable[1] + 10)
    old_pid = vm.pid
    code, lines, err = cli(*base, "discard")
    assert code == 0, err
    assert (final(lines)["state"], final(lines)["memory_restored"]) == ("discarded", True)
    assert vm.wait_counter(since=time.monotonic())[0] == at_enable[0]
    assert vm.pid != old_pid
    relaunched = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-daemonize" in relaunched
