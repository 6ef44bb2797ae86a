"""Every end state of enable, commit, discard and recover through the CLI, on real QEMU: the exit
code and the ``--json`` final object (state, error, error_kind, exit_code, next_step) tell what
really happened. Success 0, refusals 3 (nothing changed), failures 4 (``status`` says what was
left), QEMU unreachable 5. Never a traceback, never exit 1.

Failures are made real, in test-only ways: QEMU started through a symlink that is removed before
discard (the relaunch cannot run), the originals' file system filled up during commit (a small
tmpfs, root only), QEMU SIGKILLed during commit (the crash-point hook), a commit deadline shorter
than the merge of two large overlays, another process holding an original's image lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import forgeqmp
from forgeqmp.adapters.crashpoints import ENABLE_ENV as CRASH_ENABLE
from forgeqmp.adapters.crashpoints import ENV as CRASH_ENV
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.testing import DiskSpec, QemuBuild, QemuInstance

from .helpers import qmp, run
from .test_enable import tmpfs
from .test_recover import host_md5

pytestmark = pytest.mark.qemu

MIB = 1 << 20
STATUS_KEYS = {"state", "activated_at", "disks", "memory_file", "memory_restored", "error"}
ERROR_KEYS = {"error_kind", "exit_code", "next_step"}

needs_root = pytest.mark.usefixtures("root")  # tests/integration/conftest.py


@attrs.frozen
class Result:
    code: int
    lines: list[dict[str, Any]]
    err: str

    @property
    def final(self) -> dict[str, Any]:
        assert self.lines, f"no JSON on stdout; stderr: {self.err}"
        last = self.lines[-1]
        assert set(last) >= STATUS_KEYS, last
        return last


def cli(
    build: QemuBuild, socket_path: str, state: Path, *args: str, env: dict[str, str] | None = None
) -> Result:
    """``forgeqmp --qmp SOCKET --state-dir STATE --json ARGS`` in a subprocess, as an agent runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "forgeqmp", "--qmp", socket_path, "--state-dir", str(state),
         "--json", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**build.environ(), **(env or {})},
        check=False,
    )  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    # Whatever happened: a contract exit code, and no Python traceback.
    assert proc.returncode in (0, 2, 3, 4, 5), (args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "TaskGroup" not in proc.stderr, proc.stderr
    return Result(proc.returncode, lines, proc.stderr)


def assert_error(result: Result, code: int, state: str, kind: str) -> dict[str, Any]:
    """A failed or refused command: its exit code, and a final object shaped like status whose
    state is the session's own, with error, error_kind, exit_code and next_step."""
    final = result.final
    assert result.code == code, (result.code, final, result.err)
    assert set(final) >= ERROR_KEYS, final
    assert (final["state"], final["exit_code"], final["error_kind"]) == (state, code, kind), final
    assert final["error"], final
    assert final["next_step"], final
    assert "TaskGroup" not in final["error"]
    return final


def assert_ok(result: Result, state: str) -> dict[str, Any]:
    final = result.final
    assert result.code == 0, (final, result.err)
    assert final["state"] == state, final
    assert "error_kind" not in final, final
    return final


def record_bytes(state: Path) -> bytes | None:
    return StateDir(state).read("session.json")


def runstate(vm: QemuInstance) -> str:
    return str(run(qmp, vm.qmp_socket, "query-status")["status"])


def zeros_md5(mib: int) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for _ in range(mib):
        digest.update(bytes(MIB))
    return digest.hexdigest()


def write_zeros(vm: QemuInstance, disk: str, mib: int, offset_mib: int = 0) -> None:
    """``mib`` MiB of (non-sparse) data through the guest: dd of zeros, direct I/O."""
    device = vm.device_of(disk)
    vm.check(
        f"dd if=/dev/zero of={device} bs=1M count={mib} seek={offset_mib} oflag=direct "
        "2>/dev/null && sync",
        timeout=900,
    )


@contextlib.contextmanager
def not_qmp_peer(path: str) -> Iterator[None]:
    """Something listening on ``path`` that is not QMP: it greets with garbage and hangs up."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with client, contextlib.suppress(OSError):
                client.sendall(b"hello, I am not QEMU\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def started(vm: QemuInstance) -> Iterator[QemuInstance]:
    try:
        yield vm.start()
    finally:
        vm.cleanup()


# --- every end state ------------------------------------------------------------------------------


#: What the fake QEMU of a failing relaunch prints before it exits (libvirt's case, issue 12).
DYING = (
    "qemu-system-x86_64: -chardev socket,id=charmonitor,fd=33: File descriptor '33' is not a socket"
)


def test_every_end_state_has_its_exit_code(qemu_build: QemuBuild, tmp_path: Path) -> None:
    """enable/commit/discard/recover through the CLI: success 0, refusals 3 and unreachable 5
    (both with the record unchanged), a discard whose relaunch cannot run 4 (it used to exit 0
    with the VM down), a recover that leaves it failed 4, the discard run again 0."""
    # QEMU runs through a symlink to the build's binary: removing it makes the recorded argv
    # unrunnable without touching the installed QEMU.
    link = tmp_path / "bin" / "qemu-system-x86_64"
    link.parent.mkdir()
    link.symlink_to(qemu_build.system)
    build = attrs.evolve(qemu_build, system=link)
    with started(QemuInstance(build, tmp_path / "vm", memory_mib=256)) as vm:
        state = tmp_path / "state"

        def forgeqmp_(*args: str, socket_path: str = vm.qmp_socket) -> Result:
            return cli(build, socket_path, state, *args)

        # No session yet: commit/discard refused (3), recover has nothing to do (0).
        assert_error(forgeqmp_("commit"), 3, "none", "no-session")
        assert_error(forgeqmp_("discard"), 3, "none", "no-session")
        assert_ok(forgeqmp_("recover"), "none")
        assert_error(forgeqmp_("enable", "--disk", "nope"), 2, "none", "unknown-disk")

        assert_ok(forgeqmp_("enable"), "active")
        saved = record_bytes(state)
        assert_error(forgeqmp_("enable"), 3, "active", "session-active")
        assert_ok(forgeqmp_("recover"), "active")  # nothing to do
        assert record_bytes(state) == saved

        # QEMU unreachable while the session is active: 5, whether the socket is missing (QEMU
        # still runs, so it is never taken for stopped) or does not speak QMP.
        for command in ("commit", "discard"):
            missing = forgeqmp_(command, socket_path=str(tmp_path / "missing.sock"))
            assert_error(missing, 5, "active", "qemu-unreachable")
            with not_qmp_peer(str(tmp_path / "other.sock")):
                garbage = forgeqmp_(command, socket_path=str(tmp_path / "other.sock"))
            assert_error(garbage, 5, "active", "not-qmp")
        assert record_bytes(state) == saved
        assert runstate(vm) == "running"

        # discard, and the relaunched "QEMU" dies at once with a message, as a QEMU given an fd
        # it does not have does: the VM is down, so exit 4 (it was 0), with QEMU's own words.
        link.unlink()
        link.write_text(f'#!/bin/sh\necho "{DYING}" >&2\nexit 1\n')
        link.chmod(0o755)
        failed = assert_error(forgeqmp_("discard"), 4, "failed", "forge-failed")
        assert "discard could not start the VM" in failed["error"], failed
        assert DYING in failed["error"], failed  # from <state dir>/qemu.log
        assert failed["failure_phase"] == "discarding"
        # The binary gone altogether: the same, and the error names it.
        link.unlink()
        failed = assert_error(forgeqmp_("discard"), 4, "failed", "forge-failed")
        assert str(link) in failed["error"], failed
        status = forgeqmp_("status").final
        # status says the recorded cause; the failed command's error is that cause and its advice.
        assert status["state"] == "failed"
        assert failed["error"].startswith(status["error"]), (status["error"], failed["error"])
        assert str(link) in status["error"]
        # recover leaves it failed (QEMU is not running: it says how to start it): exit 4.
        assert_error(forgeqmp_("recover"), 4, "failed", "forge-failed")
        # The binary back: discard again finishes it (0), from memory; recover has nothing to do.
        link.symlink_to(qemu_build.system)
        done = assert_ok(forgeqmp_("discard"), "discarded")
        assert done["memory_restored"] is True, done
        assert done["error"] is None, done
        assert done["next_step"] is None, done  # nothing outdated from Active or Failed
        assert runstate(vm) == "running"
        assert_ok(forgeqmp_("recover"), "discarded")

        # A new session, committed: 0; then nothing to commit or discard: 3, record unchanged.
        assert_ok(forgeqmp_("enable"), "active")
        committed = assert_ok(forgeqmp_("commit"), "committed")
        assert committed["next_step"] is None, committed  # nothing outdated from Active
        saved = record_bytes(state)
        assert_error(forgeqmp_("commit"), 3, "committed", "no-session")
        assert_error(forgeqmp_("discard"), 3, "committed", "no-session")
        assert_ok(forgeqmp_("recover"), "committed")
        assert record_bytes(state) == saved
        assert runstate(vm) == "running"


@needs_root
def test_enable_that_fails_is_exit_4_and_rolled_back(qemu_build: QemuBuild, tmp_path: Path) -> None:
    with started(QemuInstance(qemu_build, tmp_path / "vm", memory_mib=256)) as vm:
        state = tmp_path / "state"
        with tmpfs(tmp_path / "ro", "ro,size=128m") as readonly:
            result = cli(qemu_build, vm.qmp_socket, state, "enable", "--overlay-dir", str(readonly))
        final = assert_error(result, 4, "failed", "forge-failed")
        assert "Read-only file system" in final["error"], final
        assert final["rolled_back"] is True
        assert runstate(vm) == "running"
        # Rolled back: recover has nothing to do (0), a new enable works.
        assert_ok(cli(qemu_build, vm.qmp_socket, state, "recover"), "failed")
        assert_ok(cli(qemu_build, vm.qmp_socket, state, "enable"), "active")


# --- commit failures ----------------------------------------------------------------------------


@needs_root
def test_commit_when_the_originals_file_system_fills_up(
    qemu_build: QemuBuild, tmp_path: Path
) -> None:
    """The original lives on a 24 MiB file system, the guest wrote 48 MiB since enable: the
    commit job fails with ENOSPC. Exit 4 (it crashed with a traceback and exit 1, recording
    "ExceptionGroup: ..."), the record says QEMU's error and what to do; the guest runs on its
    overlay; with space added, commit again finishes and every write is in the original."""
    with tmpfs(tmp_path / "small", "size=24m,mode=0755") as small:
        vm = QemuInstance(
            qemu_build, small / "vm", [DiskSpec("disk0", "qcow2", 128)], memory_mib=256
        )
        with started(vm):
            state = tmp_path / "state"
            overlays = tmp_path / "overlays"
            overlays.mkdir()
            assert_ok(cli(qemu_build, vm.qmp_socket, state, "enable", "--overlay-dir",
                          str(overlays)), "active")  # fmt: skip
            expected = vm.write_disk("disk0", 48, seed="full")
            result = cli(qemu_build, vm.qmp_socket, state, "commit")
            final = assert_error(result, 4, "failed", "forge-failed")
            assert "No space left on device" in final["error"], final
            assert "ExceptionGroup" not in final["error"], final
            assert "free space" in final["next_step"], final
            assert final["failure_phase"] == "committing"
            assert [(d["merged"], d["original_written"]) for d in final["disks"]] == [(False, True)]
            assert runstate(vm) == "running"
            assert run(qmp, vm.qmp_socket, "query-jobs") == []
            assert vm.disk_md5("disk0", 48) == expected  # on its overlay, every write there
            # Discard is refused now (the original holds part of the writes): 3, unchanged.
            saved = record_bytes(state)
            assert_error(
                cli(qemu_build, vm.qmp_socket, state, "discard"), 3, "failed", "no-session"
            )
            assert record_bytes(state) == saved

            subprocess.run(["mount", "-o", "remount,size=512m", str(small)], check=True)
            done = assert_ok(cli(qemu_build, vm.qmp_socket, state, "commit"), "committed")
            assert done["error"] is None, done
            assert done["next_step"] is None, done
            assert vm.disk_md5("disk0", 48) == expected
            assert runstate(vm) == "running"


@pytest.mark.parametrize("step", ["job-started", "pivoting"])
def test_qemu_killed_during_commit_is_exit_4_and_recoverable(
    qemu_build: QemuBuild, tmp_path: Path, step: str
) -> None:
    """QEMU SIGKILLed while a commit job runs, or while the guest is paused for the switch: the
    CLI exits 4 (6 of 10 such commits crashed it with exit 1), the record says QEMU exited;
    recover then leaves it to be committed offline (4), and commit merges offline (0) with every
    write in the original."""
    disks = [DiskSpec("d0", "qcow2", 64), DiskSpec("d1", "raw", 64)]
    with started(QemuInstance(qemu_build, tmp_path / "vm", disks, memory_mib=256)) as vm:
        state = tmp_path / "state"
        assert_ok(cli(qemu_build, vm.qmp_socket, state, "enable", "--all-disks"), "active")
        expected = {d: vm.write_disk(d, 8, seed=f"kill-{d}") for d in ("d0", "d1")}
        for d in ("d0", "d1"):  # durable, as a guest that wants it: a QEMU crash may lose the rest
            vm.check(f"dd if=/dev/null of={vm.device_of(d)} conv=fsync 2>/dev/null")
        pid = vm.pid
        result = cli(qemu_build, vm.qmp_socket, state, "commit",
                     env={CRASH_ENV: f"commit:{step}:qemu", CRASH_ENABLE: "1"})  # fmt: skip
        final = assert_error(result, 4, "failed", "forge-failed")
        assert f"QEMU (pid {pid}) exited" in final["error"], final
        assert final["failure_phase"] == "committing"
        assert (
            not os.path.exists(f"/proc/{pid}/cmdline")
            or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        )

        recovered = cli(qemu_build, vm.qmp_socket, state, "recover")
        assert_error(recovered, 4, "failed", "forge-failed")
        assert "offline" in recovered.final["next_step"], recovered.final
        done = assert_ok(cli(qemu_build, vm.qmp_socket, state, "commit"), "committed")
        assert all(d["merged"] for d in done["disks"]), done
        for image in vm.disks:
            assert host_md5(vm, image.name, 0, 8, tmp_path) == expected[image.name], image.name


# --- a commit that stops: the record says exactly what was merged -------------------------------


def test_timed_out_commit_records_exactly_what_was_merged(
    qemu_build: QemuBuild, tmp_path: Path
) -> None:
    """512 MiB on each of two overlays, ``commit --timeout 0.5``: exit 4, and for every disk
    the record's ``merged`` is what QEMU's block graph shows (the device back on its original
    node), never a disk whose switch back did not complete; the disks whose job ran are
    ``original_written`` (so discard is refused, 3). A second commit finishes the rest."""
    mib = 512
    disks = [DiskSpec("d0", "qcow2", mib + 16), DiskSpec("d1", "qcow2", mib + 16)]
    with started(QemuInstance(qemu_build, tmp_path / "vm", disks, memory_mib=256)) as vm:
        state = tmp_path / "state"
        assert_ok(cli(qemu_build, vm.qmp_socket, state, "enable", "--all-disks"), "active")
        for name in ("d0", "d1"):
            write_zeros(vm, name, mib)
        result = cli(qemu_build, vm.qmp_socket, state, "commit", "--timeout", "0.5")
        final = assert_error(result, 4, "failed", "forge-failed")
        assert "deadline (0.5 s) passed" in final["error"], final
        record = forgeqmp.RecordStore(StateDir(state)).load()
        assert record is not None
        blocks = run(qmp, vm.qmp_socket, "query-block")
        attached = {b["qdev"]: b["inserted"]["node-name"] for b in blocks if b.get("inserted")}
        truth = {d.name: attached[d.qdev] == d.device_node for d in record.disks}
        shown = {d["name"]: d["merged"] for d in final["disks"]}
        assert shown == truth, (shown, truth, final["error"])
        assert not all(truth.values()), "both disks merged within 0.5 s: the deadline did not bite"
        for d in record.disks:  # not merged: still on the overlay QEMU runs it on
            if not truth[d.name]:
                assert attached[d.qdev] == d.overlay_node
                assert d.overlay_file
                assert os.path.exists(d.overlay_file)
                assert f"{d.name}" in final["error"]
        assert runstate(vm) == "running"
        # The jobs still copying are left running in QEMU (not cancelled: their progress would
        # be lost), each recorded on its disk; nothing else of the commit is left.
        jobs = {j["id"] for j in run(qmp, vm.qmp_socket, "query-jobs")}
        left = {d.commit_job for d in record.disks if d.overlay_node is not None and d.commit_job}
        assert jobs == left, (jobs, left)
        if left:
            assert "continues in QEMU" in final["next_step"], final
        written = [d["name"] for d in final["disks"] if d["original_written"]]
        assert written, final  # the jobs started within 0.5 s: their originals got data
        saved = record_bytes(state)
        assert_error(cli(qemu_build, vm.qmp_socket, state, "discard"), 3, "failed", "no-session")
        assert record_bytes(state) == saved

        assert_ok(cli(qemu_build, vm.qmp_socket, state, "commit"), "committed")
        for name in ("d0", "d1"):  # the first and last MiBs written are in the originals now
            for offset in (0, mib - 8):
                assert vm.disk_md5(name, 8, offset_mib=offset) == zeros_md5(8), (name, offset)
        assert runstate(vm) == "running"


def test_commit_retried_with_short_timeouts_continues_where_it_stopped(
    qemu_build: QemuBuild, tmp_path: Path
) -> None:
    """768 MiB on each of two overlays, ``commit --timeout 0.5`` again and again: each stopped
    try leaves its jobs running in QEMU and says so (``status`` shows each disk's bytes done),
    the next try continues them (their progress never goes back to zero), and the tries end
    committed, with the writes flushed before the commit in the originals."""
    mib = 768
    disks = [DiskSpec("d0", "qcow2", mib + 16), DiskSpec("d1", "qcow2", mib + 16)]
    with started(QemuInstance(qemu_build, tmp_path / "vm", disks, memory_mib=256)) as vm:
        state = tmp_path / "state"
        assert_ok(cli(qemu_build, vm.qmp_socket, state, "enable", "--all-disks"), "active")
        sums: dict[tuple[str, int], str] = {}
        for name in ("d0", "d1"):
            write_zeros(vm, name, mib - 16, offset_mib=8)
            for offset in (0, mib - 8):  # marked data at both ends of what the overlay holds
                sums[name, offset] = vm.write_disk(name, 8, seed=f"{name}r", offset_mib=offset)
        seen: dict[str, int] = {}  # disk → the most bytes done seen so far
        stopped = 0
        for _try in range(40):
            result = cli(qemu_build, vm.qmp_socket, state, "commit", "--timeout", "0.5")
            for line in result.lines:  # a continued job reports from where it was
                if line.get("step") == "progress":
                    assert line["done"] >= seen.get(line["disk"], 0), (line, seen)
                    seen[line["disk"]] = line["done"]
            if result.code == 0:
                assert result.final["state"] == "committed", result.final
                break
            final = assert_error(result, 4, "failed", "forge-failed")
            stopped += 1
            status = assert_ok(cli(qemu_build, vm.qmp_socket, state, "status"), "failed")
            for disk in status["disks"]:
                job = disk["commit_job"]
                if disk["merged"] or job is None:
                    continue
                assert "continues in QEMU" in final["next_step"], final
                assert job["status"] in ("running", "ready"), job
                assert job["done"] >= seen.get(disk["name"], 0), (job, seen)
                seen[disk["name"]] = job["done"]
        else:
            pytest.fail(f"40 tries of commit --timeout 0.5 did not finish: {seen}")
        assert stopped, "the first commit finished within 0.5 s: the deadline did not bite"
        assert run(qmp, vm.qmp_socket, "query-jobs") == []
        assert runstate(vm) == "running"
        for (name, offset), expected in sums.items():
            assert vm.disk_md5(name, 8, offset_mib=offset) == expected, (name, offset)


def test_commit_refused_by_qemu_leaves_discard_possible(
    qemu_build: QemuBuild, tmp_path: Path
) -> None:
    """Another process holds the original image (read-only, not sharing writes), so QEMU refuses
    to start the commit job: exit 4, the record says no original was written (``merged`` and
    ``original_written`` false, it is not marked past its point of no return), and discard then
    works (0) and restores the memory."""
    with started(QemuInstance(qemu_build, tmp_path / "vm", memory_mib=256)) as vm:
        state = tmp_path / "state"
        assert_ok(cli(qemu_build, vm.qmp_socket, state, "enable"), "active")
        vm.write_disk("disk0", 4, seed="refused")
        base = vm.disks[0].path
        holder = subprocess.Popen(
            [str(qemu_build.img.with_name("qemu-io")), "-r", "-f", "qcow2", base],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=qemu_build.environ(),
        )
        try:
            wait_holding(holder.pid, base)
            result = cli(qemu_build, vm.qmp_socket, state, "commit")
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(30)
        final = assert_error(result, 4, "failed", "forge-failed")
        assert "lock" in final["error"], final  # QEMU's own reason
        assert [(d["merged"], d["original_written"]) for d in final["disks"]] == [(False, False)]
        assert "discard" in final["next_step"], final
        assert runstate(vm) == "running"
        boot, _n = vm.wait_counter()
        done = assert_ok(cli(qemu_build, vm.qmp_socket, state, "discard"), "discarded")
        assert done["memory_restored"] is True, done
        assert vm.wait_counter(since=time.monotonic())[0] == boot  # same boot: memory restored


def wait_holding(pid: int, path: str, timeout: float = 60.0) -> None:
    """Wait until process ``pid`` has ``path`` open (it then holds the image's locks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{pid}/fd")
            for fd in fds:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                        return
        time.sleep(0.02)
    raise TimeoutError(f"process {pid} did not open {path} within {timeout:g} s")


# --- a deleted overlay ---------------------------------------------------------------------------


def test_a_deleted_overlay_shows_in_status_and_blocks_stopping_qemu(
    qemu_build: QemuBuild, tmp_path: Path
) -> None:
    """The overlay file of an active session deleted while QEMU runs on it: status says so at
    once (exit 0, ``overlays_missing``, ``error``, ``next_step``), stop/restart/kill are refused (3:
    QEMU's open file is the only copy of the writes since enable), and commit still merges them
    live (0) from the file QEMU holds open."""
    with started(QemuInstance(qemu_build, tmp_path / "vm", memory_mib=256)) as vm:
        state = tmp_path / "state"
        active = assert_ok(cli(qemu_build, vm.qmp_socket, state, "enable"), "active")
        expected = vm.write_disk("disk0", 4, seed="deleted")
        status = assert_ok(cli(qemu_build, vm.qmp_socket, state, "status"), "active")
        assert (status["overlays_missing"], status["error"]) == ([], None)
        for operation in ("stop", "restart", "kill"):
            assert cli(qemu_build, vm.qmp_socket, state, "check", operation).code == 0

        overlay = active["disks"][0]["overlay"]
        os.unlink(overlay)
        saved = record_bytes(state)
        status = assert_ok(cli(qemu_build, vm.qmp_socket, state, "status"), "active")
        assert status["overlays_missing"] == ["disk0"], status
        assert overlay in status["error"], status
        assert "'forgeqmp commit'" in status["next_step"], status
        for operation in ("stop", "restart", "kill"):
            refused = cli(qemu_build, vm.qmp_socket, state, "check", operation)
            assert_error(refused, 3, "active", "operation-blocked")
        assert cli(qemu_build, vm.qmp_socket, state, "check", "console").code == 0
        assert record_bytes(state) == saved

        assert_ok(cli(qemu_build, vm.qmp_socket, state, "commit"), "committed")
        assert vm.disk_md5("disk0", 4) == expected
        assert runstate(vm) == "running"
