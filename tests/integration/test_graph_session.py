"""A session is seen from QEMU's own block graph, through any state dir (issue 12 item 10), on
real QEMU (every installed build): enable through dir A, then enable, ``check destroy``, guarded
QMP commands and ``status`` through dir B (and with A's record deleted) are refused or warned,
with where A's record is; nothing changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import forgeqmp
from forgeqmp.errors import OperationBlocked, SessionActive

from .helpers import block_graph, discard, enable, files_under, run
from .test_cli import cli, final

pytestmark = pytest.mark.qemu


async def _check_with_qemu(socket: str, state: Path, operation: str) -> None:
    async with forgeqmp.connect(socket, state_dir=state) as vm:
        await vm.check_with_qemu(operation)


async def _guarded(socket: str, state: Path) -> None:
    async with forgeqmp.connect(socket, state_dir=state) as vm:
        await vm.execute_guarded("block_resize", {"node-name": "disk0-fmt", "size": 128 << 20})


def test_a_second_state_dir_sees_the_session_in_qemu(
    qemu_factory, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory()
    # A is a state dir under the default base (where forgeqmp searches for the record); B is
    # anywhere else (another --state-dir, $HOME or spelling of the socket path).
    monkeypatch.setenv("FORGEQMP_STATE_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir(mode=0o700)
    dir_a, dir_b = tmp_path / "home" / "vm-a", tmp_path / "b"
    record = run(enable, vm.qmp_socket, dir_a)
    record_file = str(dir_a / "session.json")
    tag = record.session_id.replace("-", "")[:8]
    graph = block_graph(vm.qmp_socket)
    files = files_under(vm.workdir)

    for deleted in (False, True):
        if deleted:
            os.rename(record_file, str(tmp_path / "saved.json"))
        b = ["--qmp", vm.qmp_socket, "--state-dir", str(dir_b), "--json"]
        with pytest.raises(SessionActive) as info:
            run(enable, vm.qmp_socket, dir_b, all_disks=True)
        assert info.value.exit_code == 3
        assert tag in str(info.value)
        assert (record_file in str(info.value)) is not deleted
        code, lines, err = cli(*b, "enable", "--all-disks")
        assert code == 3, err
        code, lines, err = cli(*b, "check", "destroy")
        assert code == 3, err
        assert tag in err
        assert (record_file in err) is not deleted
        code, lines, err = cli(*b, "check", "console")  # always allowed
        assert code == 0, err
        with pytest.raises(OperationBlocked):
            run(_guarded, vm.qmp_socket, dir_b)
        with pytest.raises(OperationBlocked) as blocked:
            run(_check_with_qemu, vm.qmp_socket, dir_b, "backup")
        assert tag in str(blocked.value)
        run(_check_with_qemu, vm.qmp_socket, dir_b, "restart")  # always allowed
        code, lines, err = cli(*b, "status")
        assert code == 0, err
        status = final(lines)
        assert status["state"] == "none"
        assert [s["session"] for s in status["sessions_in_qemu"]] == [tag]
        assert any(tag in w for w in status["warnings"])
        # Nothing changed: same graph, same files, no session B.
        assert block_graph(vm.qmp_socket) == graph
        assert files_under(vm.workdir) == files
        assert not (dir_b / "session.json").exists()

    os.rename(str(tmp_path / "saved.json"), record_file)
    run(discard, vm.qmp_socket, dir_a)
    # Session over: B may act again.
    code, lines, err = cli(*b, "check", "destroy")
    assert code == 0, err
