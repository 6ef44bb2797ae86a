"""With QEMU stopped, on real QEMU images and the real qemu-img of every build, through the CLI as
an operator runs it. The offline commit (``qemu-img commit`` of each overlay):

- a missing overlay: refused (exit 3), nothing changed;
- a damaged overlay: the commit fails (exit 4) before anything is written into the original, the
  disk stays pending, and once the overlay is back the commit finishes;
- qemu-img failing: the same (exit 4, qemu-img's message passed on, the original untouched);
- the controller killed at each offline crash point (``committing``, ``disk-marked``,
  ``disk-merged``), each time followed by ``recover``; then ``commit`` finishes and the originals
  hold every write made during the session.

And a discard whose cold start fails (the recorded QEMU cannot start): exit 4 (it exited 0 before),
recorded Failed with the command line to start the VM, the revert intact; once QEMU can start
again, recover and discard finish it.

qemu-img is made to fail with a wrapper: the VM is started through a symlink to its QEMU binary
in a directory of the test's, so the session's recorded QEMU is that path and the offline commit
uses the ``qemu-img`` next to it: a script running the build's real qemu-img, except for
``commit`` while a flag file exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import forgeqmp
from forgeqmp.adapters.process import wait_gone
from forgeqmp.core.states import State
from forgeqmp.testing import DiskSpec, QemuBuild, QemuInstance

from .helpers import commit_killed_at, enable, files_under, qmp, run, sha256_of
from .test_recover import host_md5

pytestmark = pytest.mark.qemu

MIB = 1 << 20
DISKS = (DiskSpec("d0", "qcow2", 32), DiskSpec("d1", "raw", 32))


@pytest.fixture
def vm(qemu_build: QemuBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuInstance]:
    tools = tmp_path_factory.mktemp("tools")
    (tools / "qemu-system-x86_64").symlink_to(qemu_build.system)
    wrapper = tools / "qemu-img"
    flag = tools / "fail-commit"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = commit ] && [ -e {flag} ]; then\n'
        '    echo "qemu-img: Could not open the base image: injected failure" >&2\n'
        "    exit 1\n"
        "fi\n"
        f'exec {qemu_build.img} "$@"\n'
    )
    wrapper.chmod(0o755)
    build = attrs.evolve(qemu_build, system=tools / "qemu-system-x86_64")
    instance = QemuInstance(build, tmp_path_factory.mktemp("qemu") / "vm", DISKS, memory_mib=256)
    try:
        yield instance.start()
    finally:
        instance.cleanup()


def cli(vm: QemuInstance, state: Path, *args: str) -> tuple[int, Any]:
    command = [sys.executable, "-m", "forgeqmp", "--qmp", vm.qmp_socket]
    command += ["--state-dir", str(state), "--json", *args]
    done = subprocess.run(
        command, env=vm.build.environ(), capture_output=True, text=True, timeout=600, check=False
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines, done.stderr
    return done.returncode, {**lines[-1], "stderr": done.stderr[-3000:]}


def load(state: Path) -> forgeqmp.SessionRecord:
    record = forgeqmp.RecordStore(forgeqmp.StateDir(state)).load()
    assert record is not None
    return record


def everything(state: Path, record: forgeqmp.SessionRecord) -> dict[str, str]:
    paths = files_under(state) | {d.base_file for d in record.disks}
    paths |= {d.overlay_file for d in record.disks if d.overlay_file}
    return {p: sha256_of(p) for p in sorted(paths) if os.path.exists(p)}


def stopped_session(vm: QemuInstance, state: Path) -> tuple[forgeqmp.SessionRecord, dict[str, str]]:
    """An Active session whose guest wrote data B (flushed), with QEMU then stopped."""
    record = run(enable, vm.qmp_socket, state, all_disks=True)
    assert Path(record.qemu.argv[0]).parent.name.startswith("tools"), record.qemu.argv[0]
    data = {d: vm.write_disk(d, 2, seed=f"{d}B") for d in ("d0", "d1")}
    for d in ("d0", "d1"):
        vm.check(f"dd if=/dev/null of={vm.device_of(d)} conv=fsync 2>/dev/null")
    pid = vm.pid
    run(qmp, vm.qmp_socket, "quit")
    assert wait_gone(pid, 30)
    return record, data


def finish_and_check(vm: QemuInstance, state: Path, data: dict[str, str], scratch: Path) -> None:
    if load(state).state is not State.COMMITTED:
        code, final = cli(vm, state, "commit")
        assert code == 0, final.get("stderr", final)
    done_record = load(state)
    assert done_record.state is State.COMMITTED
    for disk in done_record.disks:
        assert disk.overlay_file is not None
        assert not Path(disk.overlay_file).exists()
    assert {d: host_md5(vm, d, 0, 2, scratch) for d in data} == data


def test_the_offline_commit_refuses_a_missing_overlay_and_finishes_after_each_crash(  # type: ignore[no-untyped-def]
    vm: QemuInstance, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    record, data = stopped_session(vm, state)
    d0 = next(d for d in record.disks if d.name == "d0")
    assert d0.overlay_file is not None
    overlay = Path(d0.overlay_file)

    # A missing overlay: refused, nothing changed.
    overlay.rename(tmp_path / "overlay.away")
    before = everything(state, record)
    code, final = cli(vm, state, "commit")
    assert code == 3, final.get("stderr", final)
    assert str(overlay) in final["error"]
    assert everything(state, record) == before
    (tmp_path / "overlay.away").rename(overlay)

    # The controller killed at each crash point of the offline commit, then recover.
    for step in ("committing", "disk-marked", "disk-merged"):
        done = commit_killed_at(vm.qmp_socket, state, step, vm.build.environ(), allow_offline=True)
        assert f"crash point commit:{step}:self: SIGKILL" in done.stderr
        code, final = cli(vm, state, "recover")
        after = load(state)
        # 0 when recover reached a state that needs nothing more; 4 when it left a failed session
        # for the next command (here: commit again, offline).
        unfinished = after.state is State.FAILED and not after.rolled_back
        assert code == (4 if unfinished else 0), (step, final.get("stderr", final))
        assert after.state not in (State.CREATING, State.COMMITTING, State.DISCARDING), after
        for disk in after.disks:  # every disk not merged keeps its overlay
            if disk.overlay_node is not None:
                assert disk.overlay_file is not None
                assert Path(disk.overlay_file).exists(), (step, disk)
        if after.state is State.COMMITTED:
            break
    finish_and_check(vm, state, data, tmp_path)


def test_the_offline_commit_fails_safely_on_a_damaged_overlay_or_a_failing_qemu_img(  # type: ignore[no-untyped-def]
    vm: QemuInstance, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    record, data = stopped_session(vm, state)
    originals = {d.name: sha256_of(d.base_file) for d in record.disks}
    d0 = next(d for d in record.disks if d.name == "d0")
    assert d0.overlay_file is not None
    overlay = Path(d0.overlay_file)
    saved = tmp_path / "overlay.saved"
    shutil.copyfile(overlay, saved)

    def failed_safely(why: str) -> None:
        code, final = cli(vm, state, "commit")
        assert code == 4, final.get("stderr", final)
        assert why in final["error"], final["error"]
        failed = load(state)
        assert failed.state is State.FAILED
        assert failed.failure_phase is State.COMMITTING
        assert "d0" in [d.name for d in failed.disks if d.overlay_node is not None]  # pending
        assert sha256_of(d0.base_file) == originals["d0"]  # nothing written into the original

    # A damaged overlay (its qcow2 header overwritten): refused by the check before the merge.
    with open(overlay, "r+b") as f:
        f.write(b"\0" * 512)
    failed_safely("is not a qcow2 overlay of")
    shutil.copyfile(saved, overlay)

    # qemu-img failing: its message is passed on.
    flag = Path(record.qemu.argv[0]).parent / "fail-commit"
    flag.touch()
    failed_safely("injected failure")
    flag.unlink()
    finish_and_check(vm, state, data, tmp_path)


def test_a_cold_start_that_fails_is_recorded_reported_and_recoverable(  # type: ignore[no-untyped-def]
    vm: QemuInstance, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    before_enable = {d: vm.write_disk(d, 2, seed=f"{d}A") for d in ("d0", "d1")}
    record = run(enable, vm.qmp_socket, state, all_disks=True)
    originals = {d.name: sha256_of(d.base_file) for d in record.disks}
    for d in ("d0", "d1"):
        vm.write_disk(d, 2, seed=f"{d}B")
    pid = vm.pid
    run(qmp, vm.qmp_socket, "quit")
    assert wait_gone(pid, 30)

    # The recorded QEMU binary cannot start any more (what a broken upgrade does).
    binary = Path(record.qemu.argv[0])
    real = binary.resolve()
    binary.unlink()
    binary.write_text(
        "#!/bin/sh\necho 'qemu-system-x86_64: injected failure: cannot start' >&2\nexit 1\n"
    )
    binary.chmod(0o755)
    code, final = cli(vm, state, "discard", "--cold")
    assert code == 4, final  # never 0 with no VM running
    assert final["state"] == "failed"
    failed = load(state)
    assert failed.state is State.FAILED
    assert failed.failure_phase is State.DISCARDING
    assert failed.error
    assert "discard could not start the VM" in failed.error
    assert failed.next_step
    assert str(binary) in failed.next_step
    for d in failed.disks:
        assert sha256_of(d.base_file) == originals[d.name]  # the revert itself is intact

    # Repaired: recover re-examines it, and discard (again) finishes the revert.
    binary.unlink()
    binary.symlink_to(real)
    code, final = cli(vm, state, "recover")
    recovered = load(state)
    unfinished = recovered.state is State.FAILED and not recovered.rolled_back
    assert code == (4 if unfinished else 0), final.get("stderr", final)
    assert recovered.state not in (State.CREATING, State.COMMITTING, State.DISCARDING)
    since = time.monotonic()
    if load(state).state is not State.DISCARDED:
        code, final = cli(vm, state, "discard")
        assert code == 0, final.get("stderr", final)
    done = load(state)
    assert done.state is State.DISCARDED, done
    if not done.memory_restored:
        vm.wait_ready(since=since, timeout=180)
    assert {d: vm.disk_md5(d, 2) for d in before_enable} == before_enable
    for d in done.disks:
        assert sha256_of(d.base_file) == originals[d.name]
