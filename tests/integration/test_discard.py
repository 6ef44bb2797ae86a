"""Discard on real QEMU (every installed build) with a 2-disk guest: the disks go back to their
contents at enable and the guest resumes from the memory state (its counter goes back); a damaged
or missing memory file gives a cold start on the reverted disks, with the reason; a session whose
record has the memory digest of an older forgeqmp (SHA-256) still resumes from memory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

import forgeqmp
from forgeqmp.adapters import memhash
from forgeqmp.adapters.launcher import LaunchSpec, detached_launcher
from forgeqmp.adapters.recordstore import RECORD_FILE
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.core.states import State
from forgeqmp.testing import DiskSpec

from .helpers import discard, enable, run, sha256_of

pytestmark = pytest.mark.qemu

TWO_DISKS = [DiskSpec("d0", "qcow2", 64), DiskSpec("d1", "raw", 64)]


def forge_and_change(
    vm: Any, state: Path
) -> tuple[forgeqmp.SessionRecord, dict[str, str], dict[str, str], tuple[str, int]]:
    """Write data A, enable, write data B: returns the record, A's md5 per disk, the originals'
    sha256 at enable, and the counter at enable."""
    sums = {d: vm.write_disk(d, 16, seed=f"{d}A") for d in ("d0", "d1")}
    at_enable = vm.wait_counter()
    record = run(enable, vm.qmp_socket, state, all_disks=True)
    originals = {d.name: sha256_of(d.base_file) for d in record.disks}
    for d in ("d0", "d1"):
        assert vm.write_disk(d, 16, seed=f"{d}B") != sums[d]
    vm.wait_counter(min_value=at_enable[1] + 25)
    return record, sums, originals, at_enable


def check_disks_reverted(
    vm: Any, record: forgeqmp.SessionRecord, sums: dict[str, str], originals: dict[str, str]
) -> None:
    for disk in record.disks:
        assert sha256_of(disk.base_file) == originals[disk.name]
        assert disk.overlay_file is not None
        assert not os.path.exists(disk.overlay_file)
    assert record.memory is not None
    assert not os.path.exists(record.memory.path)
    for d, expected in sums.items():
        assert vm.disk_md5(d, 16) == expected


@pytest.mark.parametrize("memory_mib", [512, 2048])
def test_discard_resumes_from_memory_on_reverted_disks(
    qemu_factory, tmp_path: Path, memory_mib: int
) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=TWO_DISKS, memory_mib=memory_mib)
    if memory_mib > 512:
        vm.fill_memory(memory_mib // 2)
    state = tmp_path / "state"
    record, sums, originals, at_enable = forge_and_change(vm, state)
    latest = vm.counter()

    asked = time.monotonic()
    done = run(discard, vm.qmp_socket, state)
    assert done.state is State.DISCARDED
    assert done.memory_restored is True
    assert done.error is None
    assert done.resume_seconds is not None
    assert done.resume_seconds > 0
    # The same boot goes on from about the counter at enable: not 0, not the latest value.
    _last, resumed = vm.wait_counter_rewind(since=asked)
    assert resumed[0] == at_enable[0]
    assert at_enable[1] <= resumed[1] < latest[1]
    check_disks_reverted(vm, record, sums, originals)


def flip_byte(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x01]))


def flip_data_byte(path: str) -> None:
    """Flip one bit in the middle of the file's data (not in a hole: a mapped-ram file is
    sparse), so only the bytes change, not which parts of the file hold data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = memhash.data_extents(fd)
    finally:
        os.close(fd)
    target = sum(length for _start, length in extents) // 2  # the byte at half the data
    for start, length in extents:
        if target < length:
            where = start + target
            break
        target -= length
    else:
        raise AssertionError(f"no data in {path}: {extents}")
    with open(path, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x01]))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert memhash.data_extents(fd) == extents
    finally:
        os.close(fd)


def truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


#: The digest is checked before QEMU reads a byte, and the cold start is the same whatever the
#: damage: one kind runs on every build, the others on the newest only.
_NEWEST = pytest.mark.qemu_newest


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param(flip_byte, "altered", id="flipped-byte"),
        pytest.param(flip_data_byte, "altered", id="flipped-data-byte", marks=_NEWEST),
        pytest.param(truncate, "truncated", id="truncated", marks=_NEWEST),
        pytest.param(os.unlink, "missing", id="missing", marks=_NEWEST),
    ],
)
def test_damaged_memory_gives_a_cold_start_on_reverted_disks(
    qemu_factory, tmp_path: Path, damage, reason: str
) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=TWO_DISKS)
    state = tmp_path / "state"
    record, sums, originals, at_enable = forge_and_change(vm, state)
    assert record.memory is not None
    damage(record.memory.path)

    done = run(discard, vm.qmp_socket, state)
    assert done.state is State.DISCARDED
    assert done.memory_restored is False
    assert reason in (done.error or ""), done.error
    booted = vm.wait_ready(new_boot=True)
    assert booted != at_enable[0]
    check_disks_reverted(vm, record, sums, originals)


def as_older_forgeqmp_wrote_it(state: Path, memory_file: str) -> str:
    """Rewrite the session's record to the memory digest of an older forgeqmp: the field
    ``sha256`` (its chunked SHA-256 of the file), no algorithm named. Returns that digest."""
    sha256, _size = memhash.hash_file(memory_file, algorithm="sha256")
    store = StateDir(state)
    obj = json.loads(store.read(RECORD_FILE))
    memory = obj["memory"]
    assert memory["digest_algorithm"] == memhash.ALGORITHM
    del memory["digest"], memory["digest_algorithm"]
    memory["sha256"] = sha256
    store.atomic_write(RECORD_FILE, json.dumps(obj).encode())
    return sha256


@pytest.mark.parametrize(
    "damaged",
    [pytest.param(False, id="intact"), pytest.param(True, id="flipped-data-byte", marks=_NEWEST)],
)
def test_a_record_with_an_old_sha256_digest_still_verifies(
    qemu_factory, tmp_path: Path, damaged: bool
) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=TWO_DISKS)
    state = tmp_path / "state"
    record, sums, originals, at_enable = forge_and_change(vm, state)
    assert record.memory is not None
    sha256 = as_older_forgeqmp_wrote_it(state, record.memory.path)
    loaded = forgeqmp.RecordStore(StateDir(state)).load()
    assert loaded is not None
    assert loaded.memory is not None
    assert (loaded.memory.digest_algorithm, loaded.memory.sha256) == ("sha256", sha256)
    if damaged:
        flip_data_byte(record.memory.path)
    latest = vm.counter()

    asked = time.monotonic()
    done = run(discard, vm.qmp_socket, state)
    assert done.state is State.DISCARDED
    if damaged:
        assert done.memory_restored is False
        assert "altered" in (done.error or ""), done.error
        assert vm.wait_ready(new_boot=True) != at_enable[0]
    else:
        assert done.memory_restored is True, done.error
        assert done.error is None
        _last, resumed = vm.wait_counter_rewind(since=asked)
        assert resumed[0] == at_enable[0]
        assert at_enable[1] <= resumed[1] < latest[1]
    check_disks_reverted(vm, record, sums, originals)


def test_custom_launcher_starts_qemu(qemu_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(disks=TWO_DISKS)
    state = tmp_path / "state"
    record, sums, originals, at_enable = forge_and_change(vm, state)
    launched: list[LaunchSpec] = []

    async def launcher(spec: LaunchSpec) -> None:
        launched.append(spec)
        await detached_launcher(spec)

    done = run(discard, vm.qmp_socket, state, launcher=launcher)
    assert done.memory_restored is True
    assert len(launched) == 1
    spec = launched[0]
    assert spec.incoming
    assert spec.argv[-3:] == ("-incoming", "defer", "-S")
    assert spec.argv[:-3] == record.qemu.argv
    assert spec.cwd == record.qemu.cwd
    assert vm.wait_counter(since=time.monotonic())[0] == at_enable[0]
    check_disks_reverted(vm, record, sums, originals)
