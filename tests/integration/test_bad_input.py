"""Bad values against a real guest: one guest per QEMU build, many hypothesis examples. Every bad
value given to the API (``enable``'s disks, strategy, timeout and overlay_dir; ``commit``'s and
``discard``'s timeout) or to the CLI (disk names, overlay dirs, timeouts) gets a typed error (the
contract's exit code) before anything changes: QEMU's block graph, jobs, migration state and
capabilities, the state dir and the files beside the disks are compared after every example, with
no session and with an Active one. A damaged record with QEMU reachable is refused (RecordUnreadable, 3) and
stays as it was; once repaired, the session discards normally.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import forgeqmp
from forgeqmp.adapters.recordstore import RECORD_FILE
from forgeqmp.adapters.statedir import InstanceLock, StateDir
from forgeqmp.cli import main
from forgeqmp.core.plans.enable import Strategy
from forgeqmp.core.states import State
from forgeqmp.errors import ForgeError, RecordUnreadable
from forgeqmp.testing import DiskSpec

from .helpers import qmp, run

pytestmark = pytest.mark.qemu

TWO_DISKS = [DiskSpec("d0", "qcow2", 32), DiskSpec("d1", "raw", 32)]
#: Few examples per property (each one talks to QEMU), but many properties, on one guest.
EXAMPLES = settings(max_examples=25, deadline=None)

any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=16)
bad_numbers = st.one_of(
    st.floats(max_value=0),
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, True, False, None]),
    any_text,
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
)
bad_strategies = st.one_of(
    any_text.filter(lambda t: t not in {s.value for s in Strategy}),
    st.integers(),
    st.binary(max_size=8),
    st.sampled_from([[], {}, 1.5, object()]),
)


def observe(vm: Any, state: Path) -> dict[str, Any]:
    """What a refused request must leave exactly as it was."""

    async def ask() -> dict[str, Any]:
        async with forgeqmp.QMPConnection(vm.qmp_socket) as conn:
            names = ["query-block", "query-named-block-nodes", "query-jobs", "query-status"]
            names += ["query-migrate", "query-migrate-capabilities", "query-fdsets"]
            replies = {name: await conn.execute(name) for name in names}
        replies["query-named-block-nodes"] = sorted(
            n["node-name"] for n in replies["query-named-block-nodes"]
        )
        # query-block reports I/O status and dirty counters that move on their own.
        replies["query-block"] = [
            (b.get("qdev"), (b.get("inserted") or {}).get("node-name"))
            for b in replies["query-block"]
        ]
        replies["query-status"] = replies["query-status"]["status"]
        return replies

    files: dict[str, Any] = {}
    for top in (state, vm.workdir, state.parent / "ovl"):
        for name in sorted(os.listdir(top)):
            path = top / name
            info = path.lstat()
            if top == state and stat.S_ISREG(info.st_mode) and info.st_size < 1 << 20:
                files[str(path)] = (info.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
            elif top == state:
                files[str(path)] = (info.st_mode, info.st_size)
            else:  # logs grow and images are written by the guest: the names must not change
                files[str(path)] = info.st_mode
    return {"qemu": run(ask), "files": files}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def test_bad_values_change_nothing(qemu_factory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=TWO_DISKS, memory_mib=128)
    state = tmp_path / "state"
    overlays = tmp_path / "ovl"
    overlays.mkdir()
    (tmp_path / "a-file").write_text("not a directory\n")
    with InstanceLock(StateDir(state)):
        pass

    async def known_names() -> set[str]:
        async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as instance:
            return {name for disk in await instance.disks() for name in disk.names()}

    known = run(known_names)
    assert {"d0", "d1", "d0-fmt"} <= known
    unknown_names = any_text.filter(lambda t: t not in known)
    bad_disks = st.one_of(
        st.lists(unknown_names, min_size=1, max_size=3).map(lambda names: [*names, "d0"][::-1]),
        st.lists(st.one_of(st.integers(), st.none(), st.binary(max_size=3)), min_size=1),
        st.binary(min_size=1, max_size=4),
        st.integers(),
        st.just([]),  # resolves to no disk: NoDiskSelected, exit 3
    )
    bad_dirs = st.one_of(
        # "x" first: a name like "/" or ".." would lead out of the missing directory.
        any_text.map(
            lambda t: str(tmp_path / "missing" / ("x" + t.replace("\0", "").replace("/", "_")))
        ),
        st.sampled_from([str(tmp_path / "a-file"), "", "\0", str(overlays) + "\0", 7]),
        st.binary(min_size=1, max_size=4),
    )
    bad_enable = st.one_of(
        st.fixed_dictionaries({"timeout": bad_numbers}),
        st.fixed_dictionaries({"strategy": bad_strategies}),
        st.fixed_dictionaries({"disks": bad_disks}),
        st.fixed_dictionaries({"overlay_dir": bad_dirs}),
        st.fixed_dictionaries({"disks": st.just(["d0"]), "all_disks": st.just(True)}),
    )
    valid_extras = st.fixed_dictionaries(
        {},
        optional={
            "strategy": st.sampled_from([None, "precopy", Strategy.PRECOPY]),
            "timeout": st.sampled_from([30, 600.0]),
            "overlay_dir": st.sampled_from([None, str(overlays)]),
        },
    )

    async def call(method: str, **kw: Any) -> ForgeError:
        async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as instance:
            try:
                await getattr(instance, method)(**kw)
            except ForgeError as exc:
                return exc
        raise AssertionError(f"{method}({kw}) was accepted")

    # --- no session: enable refuses every bad value, through the API and the CLI ---------------
    base = ["--qmp", vm.qmp_socket, "--state-dir", str(state)]
    before = observe(vm, state)

    @EXAMPLES
    @given(bad=bad_enable, extras=valid_extras)
    def api_enable(bad: dict[str, Any], extras: dict[str, Any]) -> None:
        error = run(call, "enable", **{**extras, **bad})
        assert error.exit_code in (2, 3), error
        assert observe(vm, state) == before

    @EXAMPLES
    @given(names=st.lists(unknown_names, min_size=1, max_size=3), data=st.data())
    def cli_enable(names: list[str], data: st.DataObject) -> None:
        argv = [*base, "enable"]
        for name in names:
            argv += ["--disk", name]
        if data.draw(st.booleans()):
            argv += ["--overlay-dir", data.draw(bad_dirs.filter(lambda d: isinstance(d, str)))]
        code, err = cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert observe(vm, state) == before

    api_enable()
    cli_enable()

    # --- an Active session: commit and discard refuse bad timeouts, enable refuses anything ----
    record = run(_enable, vm, state)
    assert record.state is State.ACTIVE
    during = observe(vm, state)

    @EXAMPLES
    @given(
        method=st.sampled_from(["commit", "discard"]),
        timeout=bad_numbers,
    )
    def api_timeouts(method: str, timeout: Any) -> None:
        error = run(call, method, timeout=timeout)
        assert error.exit_code == 2, error
        assert observe(vm, state) == during

    @EXAMPLES
    @given(data=st.data())
    def api_enable_again(data: st.DataObject) -> None:
        kw = data.draw(st.one_of(bad_enable, valid_extras))
        error = run(call, "enable", **kw)
        assert error.exit_code in (2, 3), error
        assert observe(vm, state) == during

    @EXAMPLES
    @given(
        words=st.sampled_from([["commit", "--timeout"], ["discard", "--timeout"]]),
        value=st.one_of(
            st.sampled_from(["0", "-5", "nan", "inf", "", "soon", "1e999"]),
            any_text.filter(lambda t: not _positive(t)),
        ),
    )
    def cli_timeouts(words: list[str], value: str) -> None:
        code, err = cli(capsys, *base, *words, value)
        assert code == 2, err
        assert observe(vm, state) == during

    api_timeouts()
    api_enable_again()
    cli_timeouts()
    assert cli(capsys, *base, "enable")[0] == 3
    assert cli(capsys, *base, "enable", "--disk", "d1")[0] == 3
    assert observe(vm, state) == during

    # --- a damaged record, QEMU reachable: refused (RecordUnreadable, 3), the file left as is ---
    path = state / RECORD_FILE
    good = path.read_bytes()
    obj = json.loads(good)
    damages = {
        "truncated": good[: len(good) // 2],
        "flipped": good[:100] + bytes([good[100] ^ 0x40]) + good[101:],
        "state": json.dumps({**obj, "state": "bogus"}).encode(),
        "pid": json.dumps({**obj, "qemu": {**obj["qemu"], "pid": "1"}}).encode(),
        "format": json.dumps({**obj, "format": 99}).encode(),
    }
    for label, damaged in damages.items():
        StateDir(state).atomic_write(RECORD_FILE, damaged)
        damaged_state = observe(vm, state)
        for method in ("commit", "discard", "enable"):
            error = run(call, method)
            assert isinstance(error, RecordUnreadable), (label, method, error)
            assert error.exit_code == 3
        for command in ("status", "commit", "discard", "enable"):
            code, err = cli(capsys, *base, command)
            assert code == 3, (label, command, err)
        assert path.read_bytes() == damaged
        assert observe(vm, state) == damaged_state, label
    StateDir(state).atomic_write(RECORD_FILE, good)
    assert observe(vm, state) == during

    # Nothing was disturbed: the session still discards to its memory state.
    async def discard() -> forgeqmp.SessionRecord:
        async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as instance:
            return await instance.discard()

    done = run(discard)
    assert (done.state, done.memory_restored) == (State.DISCARDED, True), done.error
    assert run(qmp, vm.qmp_socket, "query-status")["status"] == "running"


async def _enable(vm: Any, state: Path) -> forgeqmp.SessionRecord:
    async with forgeqmp.connect(vm.qmp_socket, state_dir=state) as instance:
        return await instance.enable(all_disks=True)


def _positive(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return 0 < value < math.inf
