"""Recover and the guest's pause, on real QEMU (issue 12 item 3), and the temporary files a killed
record write leaves (item 4).

- The controller is SIGKILLed by the crash-point machinery right after a disk's pivot recorded
  ``committing`` and before the guest was resumed (``commit:disk-recorded``): the guest is paused
  by forgeqmp, and the record said so before the pause (``paused_by_forgeqmp``); recover must
  resume it and exit 0 with the session committed and every write kept.
- A guest paused by someone else (a QMP ``stop`` left behind) when a commit is killed: recover
  must see the runstate and that forgeqmp did not pause it, leave it paused and say so in
  ``status``.
- A writer killed between creating the record's temporary file and renaming it: recover and the
  next operations remove that file, and only that file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from forgeqmp.core.states import State
from forgeqmp.testing import DiskSpec, QemuBuild, QemuInstance

from .helpers import block_graph, commit, enable, qmp, run
from .test_recover import cli, controller, load, write

pytestmark = pytest.mark.qemu

DISKS = (DiskSpec("d0", "qcow2", 32), DiskSpec("d1", "raw", 32))

#: A record writer SIGKILLed between creating its temporary file and renaming it over the record.
KILLED_WRITER = """
import os, signal, sys
from forgeqmp.adapters.statedir import StateDir
os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
StateDir(sys.argv[1]).atomic_write("session.json", b"{}")
"""
#: Files in the state dir that look like forgeqmp's temporary files but are not (kept).
FOREIGN = (".session.json.0123456789ab.tmp.keep", ".session.json.notmine.tmp", ".notes.tmp")


def runstate(vm: QemuInstance) -> str:
    return str(run(qmp, vm.qmp_socket, "query-status")["status"])


def plant_temp_file(state: Path) -> str:
    """What a record write killed before its rename leaves: returns the temp file's name."""
    before = set(os.listdir(state))
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(state)], check=False)
    assert done.returncode == -signal.SIGKILL
    (new,) = set(os.listdir(state)) - before
    assert new.startswith(".session.json.")
    assert new.endswith(".tmp")
    return new


def test_commit_killed_between_its_pivot_record_and_the_resume_resumes_the_guest(
    qemu_build: QemuBuild, qemu_factory: Callable[..., QemuInstance], tmp_path: Path
) -> None:
    vm = qemu_factory(disks=DISKS, memory_mib=256)
    state = tmp_path / "state"
    run(enable, vm.qmp_socket, state, all_disks=True)
    written = {d: write(vm, d, f"pivot-{d}", 0) for d in ("d0", "d1")}

    code, err = controller(qemu_build, "commit", vm, state, "commit:disk-recorded")
    assert code == -signal.SIGKILL, f"the controller was not killed at commit:disk-recorded: {err}"
    assert "crash point commit:disk-recorded:self: SIGKILL" in err
    record = load(state)
    # The moment of the issue: the record names no pause step, the guest is paused by us.
    assert record.state is State.COMMITTING
    assert record.step == "committing"
    assert record.paused_by_forgeqmp
    assert any(d.merged and d.overlay_node is None for d in record.disks)
    assert runstate(vm) == "paused"

    code, status = cli(qemu_build, vm, state, "recover")
    assert code == 0, status
    assert runstate(vm) == "running", "recover left the guest paused by forgeqmp"
    record = load(state)
    assert not record.paused_by_forgeqmp
    assert not record.warnings, record.warnings
    if record.state is not State.COMMITTED:  # a disk still pending: commit it
        code, status = cli(qemu_build, vm, state, "commit")
        assert code == 0, status
        record = load(state)
    assert record.state is State.COMMITTED
    assert runstate(vm) == "running"
    vm.check("true")  # the guest's shell answers: it runs, not only its runstate
    for name, digest in written.items():
        assert vm.disk_md5(name, 2) == digest, name
    assert not [n for n in block_graph(vm.qmp_socket)[1] if n.startswith("fq")]
    for d in record.disks:
        assert d.overlay_file is None or not os.path.exists(d.overlay_file)


def test_a_guest_paused_by_someone_else_stays_paused_and_status_says_so(
    qemu_build: QemuBuild, qemu_factory: Callable[..., QemuInstance], tmp_path: Path
) -> None:
    vm = qemu_factory(disks=DISKS, memory_mib=256)
    state = tmp_path / "state"
    run(enable, vm.qmp_socket, state, all_disks=True)
    for name in FOREIGN:
        (state / name).write_bytes(b"not forgeqmp's")
    run(qmp, vm.qmp_socket, "stop")  # the user's pause, not forgeqmp's

    code, _err = controller(qemu_build, "commit", vm, state, "commit:committing")
    assert code == -signal.SIGKILL
    assert not load(state).paused_by_forgeqmp
    temp = plant_temp_file(state)
    code, status = cli(qemu_build, vm, state, "status")
    assert status["stale"] is True
    assert (state / temp).exists()  # status takes no lock: it leaves the file alone

    code, status = cli(qemu_build, vm, state, "recover")
    assert code == 0, status
    assert runstate(vm) == "paused", "recover resumed a guest forgeqmp had not paused"
    record = load(state)
    assert record.state is State.ACTIVE  # nothing was merged: the forge is intact
    code, status = cli(qemu_build, vm, state, "status")
    assert code == 0
    assert any("not by forgeqmp" in w and "'paused'" in w for w in status["warnings"]), status
    # item 4: the killed writer's temporary file is gone, the look-alikes are kept
    assert not (state / temp).exists()
    for name in FOREIGN:
        assert (state / name).read_bytes() == b"not forgeqmp's"

    run(qmp, vm.qmp_socket, "cont")
    temp = plant_temp_file(state)
    record = run(commit, vm.qmp_socket, state)
    assert record.state is State.COMMITTED
    assert not (state / temp).exists(), "commit left a killed writer's temporary file"
    temp = plant_temp_file(state)
    record = run(enable, vm.qmp_socket, state, all_disks=True)
    assert record.state is State.ACTIVE
    assert not (state / temp).exists(), "enable left a killed writer's temporary file"
    code, status = cli(qemu_build, vm, state, "discard")
    assert code == 0, status
    assert status["state"] == "discarded"
    assert sorted(n for n in os.listdir(state) if n.endswith(".tmp")) == sorted(
        n for n in FOREIGN if n.endswith(".tmp")
    )
