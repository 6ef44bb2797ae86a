"""The blocking facade (forgeqmp.sync) on real QEMU: the same sessions, states and typed errors as
the async API, and state changes followed as they happen."""

from __future__ import annotations

from pathlib import Path

import pytest

import forgeqmp
import forgeqmp.sync
from forgeqmp import State

pytestmark = pytest.mark.qemu


def test_sync_enable_discard_and_follow(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=256)
    seen: list[tuple[State, str]] = []
    with forgeqmp.sync.connect(vm.qmp_socket, state_dir=tmp_path / "state") as forge:
        forge.follow(lambda record: seen.append((record.state, record.step)))
        assert forge.runstate() == "running"
        assert [d.name for d in forge.disks()] == ["disk0"]
        with pytest.raises(forgeqmp.NoSession):
            forge.commit()
        with pytest.raises(forgeqmp.UnknownDisk):
            forge.enable(["nope"])
        session = forge.enable()
        assert session.state is State.ACTIVE
        assert forge.session() == session
        done = forge.discard()
    assert done.state is State.DISCARDED
    assert done.memory_restored is True
    assert [state for state, _step in seen] == [
        State.CREATING,
        State.ACTIVE,
        State.DISCARDING,
        State.DISCARDED,
    ]
