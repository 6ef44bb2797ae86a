"""Discard over the fake QMP peer: the real operation (``Instance.discard``) with QEMU not running
(as ``connect(..., allow_offline=True)`` opens it), a launcher injected the way
``connect(launcher=...)`` allows, and the relaunched QEMU scripted. No process is started: the
recorded QEMU and every relaunched one have a pid no process can have.

A memory restore that goes through, and the ways one does not: the relaunched QEMU never
listening, ``migrate-incoming`` failing, the memory file not matching its digest or missing
(each a cold boot saying why), and a cold start that fails too. Each time: the typed error (if
any), what the record says afterwards, what was launched and what was sent to QEMU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from fakeqmp import Fail, FakeQMP, Reply, migration_event  # tests/unit is on sys.path
from records import DEAD_PID, SID, make_memory, make_record

from forgeqmp.adapters import memhash
from forgeqmp.adapters.launcher import LaunchSpec
from forgeqmp.adapters.recordstore import RecordStore
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.core.plans.discard import RESTORE_MULTIFD_CHANNELS
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import State
from forgeqmp.errors import ForgeFailed, QEMUUnreachable
from forgeqmp.forge import Instance

#: The guest RAM saved at enable.
MEMORY = b"guest RAM at enable" * 64


class Launches:
    """The injected launcher: records what it was asked to start, and can fail."""

    def __init__(self, *, fail_cold: bool = False) -> None:
        self.specs: list[LaunchSpec] = []
        self.fail_cold = fail_cold

    async def __call__(self, spec: LaunchSpec) -> None:
        await anyio.lowlevel.checkpoint()
        self.specs.append(spec)
        if self.fail_cold and not spec.incoming:
            raise ForgeFailed("the platform could not start the VM: out of memory")

    @property
    def kinds(self) -> list[str]:
        return ["incoming" if s.incoming else "cold" for s in self.specs]


def setup(tmp_path: Path, **memory: Any) -> tuple[Instance, FakeQMP, SessionRecord]:
    """An Active session whose QEMU is not running; its memory file holds MEMORY (the record's
    digest is that of MEMORY unless ``memory`` says otherwise)."""
    state = StateDir(tmp_path / "state")
    state.ensure()
    path = state.path / f"memory-{SID}.bin"
    path.write_bytes(MEMORY)
    digest, size = memhash.hash_file(str(path))
    values: dict[str, Any] = {
        "path": str(path),
        "sha256": None,
        "digest": digest,
        "digest_algorithm": memhash.ALGORITHM,
        "size": size,
    }
    values.update(memory)
    record = make_record(State.ACTIVE, root=tmp_path, memory=make_memory(**values))
    for d in record.disks:
        Path(d.base_file).write_bytes(b"original")
        Path(str(d.overlay_file)).write_bytes(b"overlay")
    RecordStore(state).save(record)
    peer = FakeQMP(
        {
            "migrate-set-capabilities": {},
            "add-fd": {"fdset-id": 3, "fd": 30},
            "migrate-incoming": Reply({}, events=[migration_event("completed")]),
            "remove-fd": {},
            "query-migrate": {"status": "failed", "error-desc": "load of migration failed"},
            "query-status": {"status": "running", "running": True},
            "cont": {},
            "quit": Reply({}, disconnect=True),
        },
        pid=DEAD_PID,
        connected=False,
        socket_path=record.qemu.qmp_socket,
    ).script_connect(DEAD_PID)
    return Instance(peer.as_connection(), state), peer, record


def discard(vm: Instance, launcher: Launches, **kw: Any) -> SessionRecord:
    return anyio.run(lambda: vm.discard(launcher=launcher, **kw), backend="asyncio")


def saved(vm: Instance) -> SessionRecord:
    record = vm.session()
    assert record is not None
    return record


def files_left(record: SessionRecord) -> dict[str, bool]:
    assert record.memory is not None
    files = [record.memory.path, *(str(d.overlay_file) for d in record.disks)]
    return {f: Path(f).exists() for f in files}


def restored_despite_refusals(
    vm: Instance, peer: FakeQMP, caplog: pytest.LogCaptureFixture
) -> list[str]:
    """Discard with QEMU refusing what it was scripted to refuse, warnings captured: the memory
    state restored in one launch (no second restore, no cold start). The commands sent."""
    launcher = Launches()
    with caplog.at_level("WARNING", logger="forgeqmp"):
        done = discard(vm, launcher)
    peer.check()
    assert done.state is State.DISCARDED
    assert done.memory_restored is True
    assert done.error is None
    assert launcher.kinds == ["incoming"]
    return [s.command for s in peer.actions()]


def test_a_discard_that_restores_the_memory_resumes_the_guest(tmp_path: Path) -> None:
    vm, peer, record = setup(tmp_path)
    launcher = Launches()
    done = discard(vm, launcher)
    peer.check()
    assert done.state is State.DISCARDED
    assert done.step == "discarded"
    assert done.memory_restored is True
    assert done.error is None
    assert saved(vm) == done
    assert launcher.kinds == ["incoming"]
    assert launcher.specs[0].argv[0] == record.qemu.argv[0]
    actions = [(s.command, s.arguments) for s in peer.actions()]
    assert actions[1:3] == [
        ("add-fd", {"opaque": f"forgeqmp {SID}"}),
        ("migrate-incoming", {"uri": "file:/dev/fdset/3"}),
    ]
    # Resumed once the memory loaded; the file given back and the settings reset after that
    # (neither touches the guest, so neither keeps it down).
    assert actions[3] == ("cont", None)
    assert actions[4:] == [
        ("remove-fd", {"fdset-id": 3}),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": False}]}),
    ]
    assert not any(files_left(record).values())  # overlays and memory file removed


def test_cleanup_refused_after_the_resume_keeps_the_restore(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # remove-fd and the capability reset follow cont: QEMU refusing them leaves the guest
    # running its restored state, never restored again (a QEMU that stops answering there fails
    # the discard: the crash cell discard:resumed:qemu).
    vm, peer, record = setup(tmp_path)
    peer.script("remove-fd", Fail("GenericError", "File descriptor named '3' not found"))
    peer.script(
        "migrate-set-capabilities",
        {},
        Fail("GenericError", "There's a migration process in progress"),
    )
    commands = restored_despite_refusals(vm, peer, caplog)
    assert commands.count("cont") == 1
    assert commands.index("cont") < commands.index("remove-fd")
    assert "remove-fd after the restore failed" in caplog.text
    assert "migrate-set-capabilities after the restore failed" in caplog.text
    assert not any(files_left(record).values())


MAPPED_RAM = ("events", "pause-before-switchover", "multifd", "mapped-ram")


def test_a_mapped_ram_load_runs_on_more_channels_and_sets_the_qemus_count_back(
    tmp_path: Path,
) -> None:
    vm, peer, _record = setup(tmp_path, capabilities=MAPPED_RAM)
    peer.script("query-migrate-parameters", {"multifd-channels": 4, "downtime-limit": 300})
    peer.script("migrate-set-parameters", {})
    done = discard(vm, Launches())
    peer.check()
    assert done.memory_restored is True
    actions = [(s.command, s.arguments) for s in peer.actions()]
    loading = actions[: actions.index(("migrate-incoming", {"uri": "file:/dev/fdset/3"}))]
    assert (
        "migrate-set-parameters",
        {"multifd-channels": RESTORE_MULTIFD_CHANNELS},
    ) in loading
    resumed = actions[actions.index(("cont", None)) + 1 :]
    # The count query-migrate-parameters reported before the load (the QEMU's own), not 2.
    assert resumed[-1] == ("migrate-set-parameters", {"multifd-channels": 4})


def test_more_channels_refused_loads_on_the_qemus_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The channel count is a speed-up only: refused, the memory state still loads (no cold
    # boot, no second restore) and nothing is set back afterwards.
    vm, peer, _record = setup(tmp_path, capabilities=MAPPED_RAM)
    peer.script("query-migrate-parameters", {"multifd-channels": 2})
    peer.script("migrate-set-parameters", Fail("GenericError", "Parameter 'multifd-channels'"))
    commands = restored_despite_refusals(vm, peer, caplog)
    assert commands.count("migrate-set-parameters") == 1  # the refused one: none after cont
    assert "loads on QEMU's own multifd channels" in caplog.text


def test_a_relaunched_qemu_that_never_listens_fails_with_the_memory_kept(tmp_path: Path) -> None:
    vm, peer, record = setup(tmp_path)
    peer.script_connect(QEMUUnreachable(record.qemu.qmp_socket, "Connection refused"))
    launcher = Launches()
    with pytest.raises(ForgeFailed, match="discard could not start the VM"):
        discard(vm, launcher)
    peer.check()
    after = saved(vm)
    assert after.state is State.FAILED
    assert after.failure_phase is State.DISCARDING
    assert after.step == "qemu-stopped"
    assert after.error is not None
    assert "Connection refused" in after.error
    assert after.next_step is not None
    assert "the memory state is intact" in after.next_step
    assert "'forgeqmp discard' again" in after.next_step
    assert launcher.kinds == ["incoming"] * 3  # tried again while the file verifies
    assert peer.log == []  # no QEMU was ever reached
    assert all(files_left(record).values())  # nothing removed: discard can run again


def test_migrate_incoming_failing_boots_cold_and_says_why(tmp_path: Path) -> None:
    vm, peer, record = setup(tmp_path)
    peer.script("migrate-incoming", Fail("GenericError", "Unknown savevm section type 5"))
    launcher = Launches()
    done = discard(vm, launcher)
    peer.check()
    assert done.state is State.DISCARDED
    assert done.memory_restored is False
    assert done.error is not None
    assert done.error.startswith("memory not restored, VM cold-started: loading the memory state")
    assert "Unknown savevm section type 5" in done.error
    assert launcher.kinds == ["incoming", "incoming", "incoming", "cold"]
    assert "cont" not in peer.commands  # the cold QEMU runs already; no loaded guest resumed
    assert not any(files_left(record).values())


def test_a_memory_file_that_does_not_match_its_digest_boots_cold(tmp_path: Path) -> None:
    vm, peer, record = setup(tmp_path, sha256="00" * 32)
    launcher = Launches()
    done = discard(vm, launcher)
    peer.check()
    assert done.state is State.DISCARDED
    assert done.memory_restored is False
    assert done.error == (
        "memory not restored, VM cold-started: the memory file does not match the digest "
        "recorded at enable: it was altered"
    )
    assert launcher.kinds[-1] == "cold"
    assert "cont" not in peer.commands  # the guest of the altered memory never ran
    assert peer.commands[-1] == "query-status"  # the cold QEMU, asked whether it runs
    assert not any(files_left(record).values())


def test_a_truncated_memory_file_boots_cold(tmp_path: Path) -> None:
    vm, peer, record = setup(tmp_path, size=len(MEMORY) + 4096)
    done = discard(vm, Launches())
    peer.check()
    assert done.memory_restored is False
    assert done.error is not None
    assert f"has {len(MEMORY)} bytes, not {len(MEMORY) + 4096} as saved" in done.error
    assert "cont" not in peer.commands
    assert not any(files_left(record).values())


def test_a_missing_memory_file_boots_cold_without_trying_a_restore(tmp_path: Path) -> None:
    vm, peer, record = setup(tmp_path)
    assert record.memory is not None
    Path(record.memory.path).unlink()
    launcher = Launches()
    done = discard(vm, launcher)
    peer.check()
    assert done.state is State.DISCARDED
    assert done.memory_restored is False
    assert done.error == "memory not restored, VM cold-started: the memory file is missing"
    assert launcher.kinds == ["cold"]
    assert peer.commands == ["query-status"]


def test_a_cold_start_that_fails_too_is_failed_with_the_command_line(tmp_path: Path) -> None:
    vm, peer, record = setup(tmp_path)
    launcher = Launches(fail_cold=True)
    with pytest.raises(ForgeFailed, match="out of memory"):
        discard(vm, launcher, cold=True)
    peer.check()
    after = saved(vm)
    assert after.state is State.FAILED
    assert after.failure_phase is State.DISCARDING
    assert after.error is not None
    assert after.error.startswith("discard could not start the VM: ")
    assert "out of memory" in after.error
    assert after.next_step is not None
    assert "start the VM cold with: cd " in after.next_step  # the memory state is intact
    assert record.qemu.argv[0] in after.next_step
    assert launcher.kinds == ["cold"]
    assert peer.log == []
