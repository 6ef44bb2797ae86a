"""Power operations during an Active session, on real QEMU: a guest reset is harmless; a stopped
VM restarted with ``Instance.start_spec()`` stays on the forge (and discard still restores the
memory of enable); with QEMU stopped, ``commit`` merges offline and ``discard`` starts the VM
(cold by choice here); a restart with the original command line is reported as a bypassed
forge."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import forgeqmp
from forgeqmp.adapters.launcher import LaunchSpec, detached_launcher
from forgeqmp.adapters.process import wait_gone
from forgeqmp.core.states import State
from forgeqmp.testing import DiskSpec, QemuInstance

from .helpers import block_graph, files_under, qmp, run, sha256_of

pytestmark = pytest.mark.qemu

MIB = 1 << 20
DISKS = [DiskSpec("d0", "qcow2", 32), DiskSpec("d1", "raw", 32)]


def write(vm: QemuInstance, disk: str, seed: str, offset_mib: int = 0) -> str:
    digest = vm.write_disk(disk, 2, seed=seed, offset_mib=offset_mib)
    vm.check(f"dd if=/dev/null of={vm.device_of(disk)} conv=fsync 2>/dev/null")
    return digest


def stop_qemu(vm: QemuInstance) -> None:
    """Power the VM off the way a platform does: QMP quit, then wait for the process to go."""
    pid = vm.pid
    run(qmp, vm.qmp_socket, "quit")
    assert wait_gone(pid, 30)


def cli(vm: QemuInstance, state: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """``forgeqmp --json ...``: the exit code and the final JSON object."""
    command = [sys.executable, "-m", "forgeqmp", "--qmp", vm.qmp_socket]
    command += ["--state-dir", str(state), "--json", *args]
    done = subprocess.run(
        command, env=vm.build.environ(), capture_output=True, text=True, timeout=600, check=False
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines, done.stderr
    return done.returncode, lines[-1]


async def _open(vm: QemuInstance, state: Path, what: str, **kw: Any) -> Any:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state, allow_offline=True) as inst:
        if what == "start_spec":
            return inst.start_spec()
        return await getattr(inst, what)(**kw)


def start(vm: QemuInstance, spec: LaunchSpec) -> None:
    since = time.monotonic()
    run(detached_launcher, spec)
    vm.wait_ready(since=since, timeout=180)


def original_spec(vm: QemuInstance) -> LaunchSpec:
    return LaunchSpec(
        argv=vm.argv,
        cwd=str(vm.workdir),
        env=vm.build.environ(),
        qmp_socket=vm.qmp_socket,
        incoming=False,
        log_file=str(vm.workdir / "qemu.log"),
    )


def host_md5(vm: QemuInstance, name: str, offset_mib: int, scratch: Path) -> str:
    image = next(d for d in vm.disks if d.name == name)
    path = image.path
    if image.format == "qcow2":
        path = str(scratch / f"{name}.raw")
        subprocess.run(
            [str(vm.build.img), "convert", "-f", "qcow2", "-O", "raw", image.path, path],
            check=True,
            env=vm.build.environ(),
        )
    with open(path, "rb") as f:
        f.seek(offset_mib * MIB)
        return hashlib.md5(f.read(2 * MIB), usedforsecurity=False).hexdigest()


def test_reset_and_restart_with_the_start_spec_keep_the_forge(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=DISKS, memory_mib=256)
    state = tmp_path / "state"
    a = {d: write(vm, d, f"{d}A") for d in ("d0", "d1")}
    at_enable = vm.wait_counter()
    record = run(_open, vm, state, "enable", all_disks=True)
    originals = {d.name: sha256_of(d.base_file) for d in record.disks}
    b = {d: write(vm, d, f"{d}B") for d in ("d0", "d1")}

    # A guest reset reboots the guest; the disks stay on the overlays.
    since = time.monotonic()
    run(qmp, vm.qmp_socket, "system_reset")
    vm.wait_ready(since=since, timeout=180)
    assert {d: vm.disk_md5(d, 2) for d in b} == b
    attached, _nodes = block_graph(vm.qmp_socket)
    assert all(node.startswith("fq") for _q, node, _d in attached)
    assert run(_open, vm, state, "recover").state is State.ACTIVE

    # Powered off: still Active (stopped), and status gives the command line that keeps the forge.
    stop_qemu(vm)
    code, status = cli(vm, state, "status")
    assert code == 0
    assert status["state"] == "active"
    assert status["stale"] is False
    recovered = run(_open, vm, state, "recover")
    assert recovered.state is State.ACTIVE
    assert "start" in (recovered.next_step or "")
    spec = run(_open, vm, state, "start_spec")
    assert list(spec.argv) == status["start_argv"]
    assert spec.argv != vm.argv

    start(vm, spec)
    assert {d: vm.disk_md5(d, 2) for d in b} == b  # the writes since enable are there
    for d in record.disks:
        assert sha256_of(d.base_file) == originals[d.name]  # the originals untouched
    assert run(_open, vm, state, "recover").state is State.ACTIVE

    # Discard after the restart: the memory of enable, on the originals.
    done = run(_open, vm, state, "discard")
    assert done.state is State.DISCARDED
    assert done.memory_restored is True, done.error
    assert vm.wait_counter(since=time.monotonic())[0] == at_enable[0]
    assert {d: vm.disk_md5(d, 2) for d in a} == a
    for d in record.disks:
        assert sha256_of(d.base_file) == originals[d.name]


def test_commit_merges_offline_while_qemu_is_stopped(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=DISKS, memory_mib=256)
    state = tmp_path / "state"
    run(_open, vm, state, "enable", all_disks=True)
    b = {(d, o): write(vm, d, f"{d}B{o}", o) for d in ("d0", "d1") for o in (0, 16)}
    stop_qemu(vm)

    code, final = cli(vm, state, "commit")
    assert code == 0, final
    assert final["state"] == "committed"
    record = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    assert record is not None
    assert all(d.merged and d.overlay_node is None for d in record.disks)
    for d in record.disks:
        assert d.overlay_file is not None
        assert not Path(d.overlay_file).exists()
    assert record.memory is not None
    assert not Path(record.memory.path).exists()
    for (d, o), digest in b.items():
        assert host_md5(vm, d, o, tmp_path) == digest


def test_discard_while_qemu_is_stopped_can_boot_cold(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=DISKS, memory_mib=256)
    state = tmp_path / "state"
    a = {d: write(vm, d, f"{d}A") for d in ("d0", "d1")}
    record = run(_open, vm, state, "enable", all_disks=True)
    originals = {d.name: sha256_of(d.base_file) for d in record.disks}
    for d in ("d0", "d1"):
        write(vm, d, f"{d}B")
    stop_qemu(vm)

    since = time.monotonic()
    code, final = cli(vm, state, "discard", "--cold")
    assert code == 0, final
    assert final["state"] == "discarded"
    assert final["memory_restored"] is False
    assert "cold start was asked for" in final["error"]
    vm.wait_ready(since=since, timeout=180)
    assert {d: vm.disk_md5(d, 2) for d in a} == a
    for d in record.disks:
        assert sha256_of(d.base_file) == originals[d.name]


def test_a_restart_on_the_originals_is_a_bypassed_forge_and_discard_is_refused(
    qemu_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=DISKS, memory_mib=256)
    state = tmp_path / "state"
    run(_open, vm, state, "enable", all_disks=True)
    stop_qemu(vm)
    start(vm, original_spec(vm))  # what a platform unaware of the forge would do
    # The guest writes to its originals now: the memory state of enable no longer matches them.
    bypassed = {d: write(vm, d, f"{d}bypass") for d in ("d0", "d1")}

    # Discard before recover: QEMU shows the disks on their originals, so it is refused already.
    pid = vm.pid
    saved = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    code, final = cli(vm, state, "discard")
    assert code == 3, final
    assert "bypassed" in final["error"]
    assert forgeqmp.RecordStore(forgeqmp.StateDir(state)).load() == saved
    assert vm.pid == pid
    assert {d: vm.disk_md5(d, 2) for d in bypassed} == bypassed

    recovered = run(_open, vm, state, "recover")
    assert recovered.state is State.FAILED
    assert recovered.failure_phase is State.ACTIVE
    assert not recovered.rolled_back
    assert "do not discard" in (recovered.next_step or "")
    # Nothing the guest may have written was deleted.
    for d in recovered.disks:
        assert d.overlay_file is not None
        assert Path(d.overlay_file).exists()
    assert recovered.memory is not None
    assert Path(recovered.memory.path).exists()
    status = run(qmp, vm.qmp_socket, "query-status")
    assert status["status"] == "running"

    # Discard is refused, through the CLI as an operator runs it: exit 3, the reason and the safe
    # way out, and nothing changed (same QEMU, still running on the originals, same files, same
    # record).
    pid = vm.pid
    session_files = files_under(state) | {d.overlay_file for d in recovered.disks if d.overlay_file}
    files_before = {f: sha256_of(f) for f in session_files}
    assert str(state / "session.json") in files_before
    code, final = cli(vm, state, "discard")
    assert code == 3, final
    assert final["exit_code"] == 3
    assert "bypassed" in final["error"]
    assert "Safe way out" in final["error"]
    assert final["state"] == "failed"
    assert vm.pid == pid
    assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"
    attached, nodes = block_graph(vm.qmp_socket)
    assert [node for _q, node, _d in attached] == ["d0-fmt", "d1-fmt"]
    assert not [n for n in nodes if n.startswith("fq")]
    assert {d: vm.disk_md5(d, 2) for d in bypassed} == bypassed
    assert {f: sha256_of(f) for f in files_under(state) | session_files} == files_before
    again = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    assert again == recovered
    # The API refuses it the same way (a typed error, exit code 3).
    with pytest.raises(forgeqmp.PrerequisiteError, match="bypassed") as refused:
        run(_open, vm, state, "discard")
    assert refused.value.exit_code == 3
    assert vm.pid == pid
