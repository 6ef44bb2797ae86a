"""The real-QEMU harness itself (every installed build): the guest's counter advances, data
written from the guest shell reads back (and is on the host image), stop and cleanup leave no
process and only files that were there before."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from forgeqmp.adapters.process import is_alive
from forgeqmp.testing import DiskSpec, QemuInstance, pattern_md5

pytestmark = pytest.mark.qemu


def test_counter_disks_and_cleanup(qemu_build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mine.txt").write_text("not the harness's")
    vm = QemuInstance(
        qemu_build,
        tmp_path,
        [DiskSpec("d0", "qcow2", 32), DiskSpec("d1", "raw", 16)],
        memory_mib=256,
    )
    try:
        vm.start()
        # The counter advances, on one boot.
        boot, first = vm.wait_counter()
        boot2, later = vm.wait_counter(min_value=first + 3)
        assert boot2 == boot
        assert later > first
        assert vm.boot_ids() == [boot]

        # Both disks are there under their qdev ids; data round-trips through the guest.
        assert vm.device_of("d0") != vm.device_of("d1")
        for disk in ("d0", "d1"):
            expected = vm.write_disk(disk, 2, seed=disk, offset_mib=3)
            assert expected == pattern_md5(disk, 3, 2)
            assert vm.disk_md5(disk, 2, offset_mib=3) == expected
        assert vm.disk_md5("d0", 2, offset_mib=3) != vm.disk_md5("d1", 2, offset_mib=3)
        # The guest wrote with direct I/O: the raw image on the host holds the bytes already.
        raw = next(d for d in vm.disks if d.format == "raw")
        with open(raw.path, "rb") as f:
            f.seek(3 << 20)
            assert hashlib.md5(f.read(2 << 20), usedforsecurity=False).hexdigest() == pattern_md5(
                "d1", 3, 2
            )
        # A failing guest command is reported with its status.
        status, _output = vm.run("false")
        assert status == 1
        vm.fill_memory(16)
        pid = vm.pid
        assert is_alive(pid)
    finally:
        vm.cleanup()
    assert not is_alive(pid)
    # Only what was there before the harness came is left.
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_bad_harness_arguments_are_refused(qemu_build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="accel"):
        QemuInstance(qemu_build, tmp_path, accel="xen")
    with pytest.raises(ValueError, match="format"):
        DiskSpec("d0", "vmdk")
    with pytest.raises(ValueError, match="size"):
        DiskSpec("d0", "raw", 0)
