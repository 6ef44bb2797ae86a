"""The examples in examples/ really run: each as a subprocess, against a guest booted by the
harness, on the newest installed QEMU only (the examples exercise no version-specific path that
the other integration tests do not already cover on every build)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forgeqmp
from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.testing import QemuBuild, QemuInstance, installed_builds

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TIMEOUT = 120


@pytest.fixture(autouse=True)
def _newest_build_only(qemu_build: QemuBuild) -> None:
    newest = installed_builds()[0]
    if qemu_build.name != newest.name:
        pytest.skip(f"the examples run on the newest QEMU build only ({newest.name})")


def run_example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def record_in(state_dir: Path) -> forgeqmp.SessionRecord:
    record = RecordStore(StateDir(state_dir)).load()
    assert record is not None
    return record


def test_forge_cycle_discards_then_commits(qemu_instance: QemuInstance, tmp_path: Path) -> None:
    vm = qemu_instance
    boot, at_start = vm.wait_counter()
    state = tmp_path / "state"
    script = str(EXAMPLES / "forge_cycle.py")

    out = run_example(script, vm.qmp_socket, "--state-dir", str(state)).stdout
    assert "enable] active" in out
    assert "memory restored: True" in out
    discarded = record_in(state)
    assert discarded.state is forgeqmp.State.DISCARDED
    assert discarded.memory_restored is True
    assert vm.wait_counter(since=time.monotonic())[0] == boot  # resumed, not rebooted

    out = run_example(script, vm.qmp_socket, "--state-dir", str(state), "--commit").stdout
    committed = record_in(state)
    assert committed.state is forgeqmp.State.COMMITTED
    assert "committed" in out
    assert all(d.merged for d in committed.disks)
    assert all(d.overlay_file and not os.path.exists(d.overlay_file) for d in committed.disks)
    assert vm.wait_counter(min_value=at_start + 1)[0] == boot  # the guest never stopped


def test_embedding_launcher_relaunches_through_the_platform(
    qemu_instance: QemuInstance, tmp_path: Path
) -> None:
    vm = qemu_instance
    boot, _ = vm.wait_counter()
    old_pid = vm.pid
    platform = tmp_path / "platform"

    out = run_example(
        str(EXAMPLES / "embedding_launcher.py"),
        vm.qmp_socket,
        "--vm",
        "vm1",
        "--platform-dir",
        str(platform),
        "--state-dir",
        str(tmp_path / "state"),
    ).stdout
    assert "memory restored: True" in out
    assert "platform launches: ['restore']" in out
    inventory = json.loads((platform / "inventory.json").read_text())
    assert inventory == {"vm1": vm.pid}  # the QEMU running now is the one the platform started
    assert vm.pid != old_pid
    assert vm.wait_counter(since=time.monotonic())[0] == boot  # resumed from memory
    assert (platform / "logs" / "vm1.log").exists()


def test_pytest_example_passes(qemu_build: QemuBuild) -> None:
    done = run_example(
        "-m",
        "pytest",
        str(EXAMPLES / "test_with_harness.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        env={"FORGEQMP_QEMU": qemu_build.name},
    )
    assert "1 passed" in done.stdout


def test_demo_runs_end_to_end(qemu_build: QemuBuild) -> None:
    """The main job (README's first command runs it through nox): every step, then its own checks."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--qemu", qemu_build.name, "--memory", "256"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"demo exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert "memory restored: True" in out
    assert "same boot: True" in out
    assert "the 'before' data" in out.split("== 4.")[1].split("== 5.")[0]
    assert "the 'keep' data" in out.split("== 7.")[1]
    assert "overlay or memory files left: none" in out
