"""Security on a real guest (every installed QEMU): whatever the umask, the state dir is 0700 and
every file in it 0600 (the memory file holds guest RAM), overlays are readable by their owner only;
memory files are gone when the session ends, by commit or discard, also from QEMU's descriptors;
a symlinked state dir, or a symlink planted where the record, the lock, the memory file or an
overlay goes, is refused with a typed error and never followed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import forgeqmp
import forgeqmp.ops.enable
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.cli import main
from forgeqmp.core.states import State
from forgeqmp.errors import ForgeFailed, RecordError
from forgeqmp.testing import DiskSpec

from .helpers import block_graph, commit, discard, enable, files_under, run

pytestmark = pytest.mark.qemu

TWO_DISKS = [DiskSpec("d0", "qcow2", 32), DiskSpec("d1", "raw", 32)]
SESSION_ID = "0badc0de-1111-4222-8333-444455556666"


@pytest.fixture
def vm(qemu_factory):  # type: ignore[no-untyped-def]
    return qemu_factory(disks=TWO_DISKS, memory_mib=128)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {
        name: stat.S_IMODE(os.lstat(directory / name).st_mode) for name in os.listdir(directory)
    }


def qemu_holds(vm: Any, needle: str) -> list[str]:
    """The files of the running QEMU's open descriptors whose path contains ``needle``."""
    found = []
    for fd in os.listdir(f"/proc/{vm.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{vm.pid}/fd/{fd}")
            if needle in target:
                found.append(target)
    return found


def test_private_files_and_memory_gone_when_the_session_ends(vm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Under umask 0 (everything the process creates would be world-writable by default)."""
    state = tmp_path / "state"
    overlay_dir = tmp_path / "overlays"
    overlay_dir.mkdir()
    with umask(0):
        for end in (commit, discard):
            record = run(enable, vm.qmp_socket, state, all_disks=True, overlay_dir=overlay_dir)
            assert record.memory is not None
            assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
            files = modes(state)
            assert Path(record.memory.path).name in files
            assert files == dict.fromkeys(files, 0o600), files
            for disk in record.disks:
                assert disk.overlay_file is not None
                mode = stat.S_IMODE(os.stat(disk.overlay_file).st_mode)
                assert mode & 0o077 == 0, f"{disk.overlay_file} has mode {mode:o}"

            done = run(end, vm.qmp_socket, state)
            assert done.state in (State.COMMITTED, State.DISCARDED)
            assert not os.path.exists(record.memory.path)
            assert not [n for n in os.listdir(state) if n.startswith("memory-")]
            assert files_under(overlay_dir) == set()
            # Not deleted in name only: the running QEMU holds no descriptor of it either.
            assert qemu_holds(vm, "memory-") == []
            files = modes(state)  # the archived record, and qemu.log after a discard
            assert files == dict.fromkeys(files, 0o600), files
    assert "qemu.log" in files  # discard relaunched QEMU through the default launcher


def test_symlinks_in_state_paths_are_refused_and_never_followed(
    vm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    graph = block_graph(vm.qmp_socket)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")

    def untouched() -> None:
        assert victim.read_text() == "precious\n"
        assert files_under(elsewhere) == set()
        assert block_graph(vm.qmp_socket) == graph

    # A symlinked state dir: nothing is created behind it, by the API or the CLI.
    linked = tmp_path / "linked-state"
    linked.symlink_to(elsewhere)
    with pytest.raises(RecordError, match="symlink"):
        run(enable, vm.qmp_socket, linked)
    for command in ("enable", "status", "commit", "discard"):
        capsys.readouterr()
        # UnsafeStateDir: refused (3), nothing changed.
        assert main(["--qmp", vm.qmp_socket, "--state-dir", str(linked), command]) == 3, command
        assert "symlink" in capsys.readouterr().err
    untouched()

    # Symlinks planted at the record's and the lock's paths, in a good state dir.
    state = tmp_path / "state"
    with InstanceLock(StateDir(state)):
        pass
    for name in ("session.json", "lock"):
        (state / name).unlink(missing_ok=True)
        (state / name).symlink_to(victim)
        with pytest.raises(RecordError, match="symlink"):
            run(enable, vm.qmp_socket, state)
        os.unlink(state / name)
        untouched()
    with InstanceLock(StateDir(state)):
        pass

    # Where the memory file and an overlay will go (the session id is made predictable here;
    # it is random, so an attacker would have to guess it): refused, the enable undone.
    monkeypatch.setattr(forgeqmp.ops.enable, "new_session_id", lambda: SESSION_ID)
    memory = state / f"memory-{SESSION_ID}.bin"
    memory.symlink_to(victim)
    with pytest.raises(ForgeFailed, match="already exists"):
        run(enable, vm.qmp_socket, state)
    record = forgeqmp.RecordStore(StateDir(state)).load()
    assert record is not None
    assert (record.state, record.rolled_back) == (State.FAILED, True)
    assert os.readlink(memory) == str(victim)  # left for the owner to inspect
    memory.unlink()
    untouched()

    overlay = Path(f"{vm.disks[0].path}.forge-{SESSION_ID[:8]}.qcow2")
    overlay.symlink_to(victim)
    before = files_under(state)
    with pytest.raises(ForgeFailed, match="already exists"):
        run(enable, vm.qmp_socket, state)
    assert files_under(state) == before  # refused before anything was written
    overlay.unlink()
    untouched()

    # And with nothing planted, the same state dir works.
    assert run(enable, vm.qmp_socket, state).state is State.ACTIVE
    assert run(discard, vm.qmp_socket, state).memory_restored is True
    untouched()
