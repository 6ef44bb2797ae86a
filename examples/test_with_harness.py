"""A pytest test of your own code against a real QEMU, with forgeqmp's test harness.

Installing forgeqmp registers its pytest plugin, so the fixtures are just there::

    pytest examples/test_with_harness.py                        # every installed QEMU build
    FORGEQMP_QEMU=10.0 pytest examples/test_with_harness.py     # one build

``qemu_instance`` is a started test guest (a busybox initramfs, one 64 MiB qcow2 disk ``disk0``,
TCG) on each installed QEMU build; ``qemu_factory`` starts guests with the disks and memory you
ask for. The guest prints a counter that lives only in its RAM, so a memory restore is visible:
the counter goes back, under the same boot id. Without QEMU the test is skipped (run
``scripts/setup-system`` to install it).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import forgeqmp
import forgeqmp.sync
from forgeqmp.testing import QemuInstance

pytestmark = pytest.mark.qemu


def test_discard_brings_back_disk_and_memory(qemu_instance: QemuInstance, tmp_path: Path) -> None:
    vm = qemu_instance
    kept = vm.write_disk("disk0", 4, seed="kept")  # 4 MiB through the guest; returns its md5
    boot, at_enable = vm.wait_counter()

    # The harness is blocking, so this test uses forgeqmp's blocking facade (same semantics as
    # the async API; an async test would use forgeqmp.connect and anyio.to_thread for the guest).
    with forgeqmp.sync.connect(vm.qmp_socket, state_dir=tmp_path / "state") as forge:
        session = forge.enable()  # the primary disk (disk0) and the memory
        assert session.state is forgeqmp.State.ACTIVE
        assert vm.write_disk("disk0", 4, seed="trial") != kept  # try something
        _, before_discard = vm.wait_counter(min_value=at_enable + 10)
        done = forge.discard()

    assert done.state is forgeqmp.State.DISCARDED
    assert done.memory_restored is True
    resumed_boot, resumed = vm.wait_counter(since=time.monotonic())
    assert resumed_boot == boot  # the same boot goes on: memory came back, no reboot...
    assert at_enable <= resumed < before_discard  # ...from where it was at enable
    assert vm.disk_md5("disk0", 4) == kept  # and the disk holds what it held at enable
