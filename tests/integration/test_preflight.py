"""Enable's preflight and status during a session, on real QEMU (every installed build): no room
for the memory file or an overlay, a migration blocker (refused, exit 3, nothing changed);
persistent dirty bitmaps (merged by commit, intact after discard); an overlay whose file system
fills up (QEMU pauses the guest with io-error, status says so and what to do)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from forgeqmp import connect
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.core.preflight import MEMORY_MARGIN, OVERLAY_MINIMUM
from forgeqmp.core.states import State
from forgeqmp.errors import MigrationBlocked
from forgeqmp.testing import DiskSpec

from .helpers import block_graph, commit, discard, enable, files_under, qmp, run
from .test_cli import cli, final
from .test_enable import needs_root, tmpfs

pytestmark = pytest.mark.qemu

MiB = 1 << 20
RAM_MIB = 256


def observed(vm: Any, *dirs: Path) -> tuple[Any, set[str], Any]:
    """What a refused enable must leave as it was: block graph, files, migration state."""
    return (
        block_graph(vm.qmp_socket),
        files_under(os.path.dirname(vm.disks[0].path), *dirs),
        run(qmp, vm.qmp_socket, "query-migrate").get("status"),
    )


def wait_for(predicate: Any, what: str, deadline_s: float = 300.0) -> Any:
    """Poll ``predicate`` until it returns a true value, or fail after a generous deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what} did not happen within {deadline_s:g} s")


def locked_state_dir(path: Path) -> Path:
    with InstanceLock(StateDir(path)):  # the lock file exists before "before" is taken
        pass
    return path


@needs_root
def test_no_room_for_the_memory_file_is_refused(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=RAM_MIB)
    # Room for half the guest's RAM: an idle guest's stream would fit, a busy one's would not.
    with tmpfs(tmp_path / "state", f"size={RAM_MIB // 2}m,mode=0700") as state:
        locked_state_dir(state)
        before = observed(vm, state)
        code, lines, err = cli(
            "--qmp", vm.qmp_socket, "--state-dir", str(state), "--json", "enable"
        )
        assert code == 3, err
        assert "not enough free space" in err, err
        assert "--state-dir" in err, err
        assert f"{RAM_MIB} MiB of guest RAM" in err, err
        assert final(lines)["state"] == "none"
        assert observed(vm, state) == before
        assert not (state / "session.json").exists()
        assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"

        # With room for RAM + margin, the same enable goes through.
        size = (RAM_MIB * MiB + MEMORY_MARGIN) // MiB + 8
        subprocess.run(["mount", "-o", f"remount,size={size}m", str(state)], check=True)
        code, lines, err = cli(
            "--qmp", vm.qmp_socket, "--state-dir", str(state), "--json", "enable"
        )
        assert code == 0, err
        assert final(lines)["state"] == "active"
        assert run(discard, vm.qmp_socket, state).state is State.DISCARDED


@needs_root
def test_no_room_for_an_overlay_is_refused(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=RAM_MIB)
    state = locked_state_dir(tmp_path / "state")
    small = OVERLAY_MINIMUM // MiB // 2
    with tmpfs(tmp_path / "overlays", f"size={small}m") as overlays:
        before = observed(vm, state, overlays)
        base = ["--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]
        code, lines, err = cli(*base, "enable", "--overlay-dir", str(overlays))
        assert code == 3, err
        assert "overlay of disk disk0" in err, err
        assert "--overlay-dir" in err, err
        assert final(lines)["state"] == "none"
        assert observed(vm, state, overlays) == before
        assert os.listdir(overlays) == []
        assert not (state / "session.json").exists()

        subprocess.run(["mount", "-o", f"remount,size={small * 4}m", str(overlays)], check=True)
        code, lines, err = cli(*base, "enable", "--overlay-dir", str(overlays))
        assert code == 0, err
        assert run(discard, vm.qmp_socket, state).state is State.DISCARDED


@needs_root
def test_memory_file_and_overlay_on_one_file_system_add_up(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each need alone fits, both together do not: refused."""
    vm = qemu_factory(memory_mib=RAM_MIB)
    memory_need = (RAM_MIB * MiB + MEMORY_MARGIN) // MiB
    size = memory_need + OVERLAY_MINIMUM // MiB // 2
    with tmpfs(tmp_path / "fs", f"size={size}m,mode=0700") as fs:
        state = locked_state_dir(fs / "state")
        before = observed(vm, fs)
        code, _lines, err = cli(
            "--qmp", vm.qmp_socket, "--state-dir", str(state), "enable", "--overlay-dir", str(fs)
        )
        assert code == 3, err
        assert "the memory file" in err, err
        assert "the overlay of disk disk0" in err, err
        assert observed(vm, fs) == before


def test_migration_blocker_is_refused_before_any_overlay(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """ivshmem-plain without master=on blocks migration on both builds; QEMU says why in
    query-migrate's blocked-reasons, and enable refuses with those words."""
    shared = tmp_path / "ivshmem"
    with open(shared, "wb") as f:
        f.truncate(MiB)
    vm = qemu_factory(
        memory_mib=RAM_MIB,
        extra_args=[
            "-object",
            f"memory-backend-file,id=shm0,share=on,mem-path={shared},size=1M",
            "-device",
            "ivshmem-plain,memdev=shm0,id=shm0dev",
        ],
    )
    reasons = run(qmp, vm.qmp_socket, "query-migrate").get("blocked-reasons")
    assert reasons, reasons
    assert "ivshmem" in reasons[0], reasons
    state = locked_state_dir(tmp_path / "state")
    before = observed(vm, state)
    with pytest.raises(MigrationBlocked) as refused:
        run(enable, vm.qmp_socket, state)
    assert refused.value.reasons == tuple(reasons)
    assert reasons[0] in str(refused.value)
    assert observed(vm, state) == before
    assert not (state / "session.json").exists()

    code, lines, err = cli("--qmp", vm.qmp_socket, "--state-dir", str(state), "--json", "enable")
    assert code == 3, err
    assert "ivshmem" in err, err
    assert "Nothing was changed" in err, err
    assert final(lines)["state"] == "none"
    assert observed(vm, state) == before
    assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"


def _bitmap(socket: str, node: str, name: str) -> dict[str, Any]:
    nodes = run(qmp, socket, "query-named-block-nodes")
    found = [
        b
        for n in nodes
        if n["node-name"] == node
        for b in n.get("dirty-bitmaps", ())
        if b["name"] == name
    ]
    assert len(found) == 1, nodes
    return dict(found[0])


def _stored_bitmaps(vm: Any, workdir: Path) -> dict[str, int]:
    """The bitmaps stored in the first disk's image, as a fresh QEMU (no guest) loads them."""
    info = subprocess.run(
        [str(vm.build.img), "info", "--output=json", vm.disks[0].path],
        capture_output=True,
        text=True,
        check=True,
        env=vm.build.environ(),
    ).stdout
    assert "in-use" not in info, info  # stored consistently by whoever closed the image last
    socket = str(workdir / "inspect.sock")
    argv = vm.build.system_argv(
        "-machine", "none", "-nodefaults", "-display", "none",
        "-blockdev", f"driver=file,filename={vm.disks[0].path},node-name=f",
        "-blockdev", "driver=qcow2,file=f,node-name=q",
        "-qmp", f"unix:{socket},server=on,wait=off",
    )  # fmt: skip
    inspector = subprocess.Popen(argv, env=vm.build.environ())
    try:
        wait_for(lambda: os.path.exists(socket), "the inspecting QEMU's QMP socket", 60)
        nodes = run(qmp, socket, "query-named-block-nodes")
    finally:
        inspector.terminate()
        inspector.wait(60)
    return {
        str(b["name"]): int(b["count"])
        for n in nodes
        if n["node-name"] == "q"
        for b in n.get("dirty-bitmaps", ())
    }


async def _offline_commit(socket: str, state: Path) -> Any:
    async with connect(socket, state_dir=state, allow_offline=True) as instance:
        assert not instance.online
        return await instance.commit()


@pytest.mark.parametrize("end", ["commit", "discard", "offline-commit"])
def test_persistent_dirty_bitmaps_survive_the_session(
    qemu_factory, tmp_path: Path, end: str
) -> None:  # type: ignore[no-untyped-def]
    """An incremental-backup user's persistent bitmap on the forged qcow2: after commit (live, or
    with qemu-img once QEMU stopped) it shows the writes made since enable (the commit marks what
    it merges into the base), after discard it is as it was at enable (reloaded from the image by
    the relaunched QEMU); in each case it is stored in the image."""
    vm = qemu_factory(disks=[DiskSpec("disk0", "qcow2", 64)], memory_mib=RAM_MIB)
    socket = vm.qmp_socket
    run(
        qmp,
        socket,
        "block-dirty-bitmap-add",
        {"node": "disk0-fmt", "name": "backup0", "persistent": True},
    )
    vm.write_disk("disk0", 1, offset_mib=0)
    at_enable = _bitmap(socket, "disk0-fmt", "backup0")
    assert at_enable["count"] == 1 * MiB
    state = tmp_path / "state"
    record = run(enable, socket, state)
    assert record.state is State.ACTIVE
    vm.write_disk("disk0", 2, offset_mib=10, seed="session")
    assert _bitmap(socket, "disk0-fmt", "backup0")["count"] == 1 * MiB  # the base is only read
    if end == "commit":
        assert run(commit, socket, state).state is State.COMMITTED
        expected = 3 * MiB
    elif end == "discard":
        record = run(discard, socket, state)
        assert record.state is State.DISCARDED
        assert record.memory_restored
        expected = 1 * MiB
    else:
        vm.stop()
        assert run(_offline_commit, socket, state).state is State.COMMITTED
        expected = 3 * MiB
    if end != "offline-commit":
        after = _bitmap(socket, "disk0-fmt", "backup0")
        assert after["count"] == expected, after
        assert after["persistent"], after
        assert after.get("recording", True), after
        vm.stop()
    assert _stored_bitmaps(vm, tmp_path) == {"backup0": expected}


@needs_root
def test_full_overlay_file_system_pauses_the_guest_and_status_says_what_to_do(
    qemu_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=[DiskSpec("disk0", "qcow2", 256)], memory_mib=RAM_MIB)
    state = tmp_path / "state"
    size_mib = OVERLAY_MINIMUM // MiB + 8
    with tmpfs(tmp_path / "overlays", f"size={size_mib}m") as overlays:
        base = ["--qmp", vm.qmp_socket, "--state-dir", str(state), "--json"]
        code, _lines, err = cli(*base, "enable", "--overlay-dir", str(overlays))
        assert code == 0, err

        code, lines, err = cli(*base, "status")
        assert code == 0, err
        status = final(lines)
        assert status["qemu"] == "running"
        assert status["qemu_advice"] is None
        disk = status["disks"][0]
        assert 0 < disk["overlay_bytes"] < 4 * MiB, disk
        statvfs = os.statvfs(overlays)
        assert abs(disk["overlay_free_bytes"] - statvfs.f_bavail * statvfs.f_frsize) < 4 * MiB
        assert disk["io_status"] == "ok", disk

        # Fill the overlay's file system from the guest (in the background: the guest pauses).
        device = vm.device_of("disk0")
        vm.check(
            f"(dd if=/dev/urandom of={device} bs=1M count={size_mib * 2} oflag=direct "
            ">/dev/null 2>&1 &)"
        )
        wait_for(
            lambda: run(qmp, vm.qmp_socket, "query-status")["status"] == "io-error",
            "the io-error pause",
        )
        code, lines, err = cli(*base, "status")
        assert code == 0, err
        status = final(lines)
        assert status["state"] == "active"
        assert status["qemu"] == "io-error"
        assert status["disks"][0]["io_status"] == "nospace", status
        assert status["disks"][0]["overlay_free_bytes"] < MiB, status
        advice = status["qemu_advice"]
        assert "io-error" in advice, advice
        assert "forgeqmp discard" in advice, advice
        assert "'cont'" in advice, advice
        assert str(overlays) in advice, advice
        # The human text says the same.
        proc = subprocess.run(
            [*_forgeqmp(), "--qmp", vm.qmp_socket, "--state-dir", str(state), "status"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "qemu: io-error" in proc.stdout, proc.stdout
        assert "forgeqmp discard" in proc.stdout, proc.stdout

        # The first way out: free space, then resume with cont; the guest runs on.
        subprocess.run(["mount", "-o", f"remount,size={size_mib * 4}m", str(overlays)], check=True)
        run(qmp, vm.qmp_socket, "cont")
        wait_for(lambda: vm.run("true", timeout=30)[0] == 0, "the guest's shell answering")
        code, lines, _ = cli(*base, "status")
        status = final(lines)
        assert status["qemu"] == "running", status
        assert status["qemu_advice"] is None, status
        # The other: discard, back to the moment of enable.
        record = run(discard, vm.qmp_socket, state)
        assert record.state is State.DISCARDED
        assert record.memory_restored
        assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"


def _forgeqmp() -> list[str]:
    import sys

    return [sys.executable, "-m", "forgeqmp"]
