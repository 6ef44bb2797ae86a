"""The harness reads the guest's counter from console bytes: a memory restore shows as the counter
going back, which :meth:`QemuInstance.wait_counter_rewind` finds from the lines alone (no QEMU)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from forgeqmp.testing import QemuBuild, QemuInstance

BUILD = QemuBuild("10.0", "10.0.2", Path("/usr/bin/qemu-system-x86_64"), Path("/usr/bin/qemu-img"))


def console(instance: QemuInstance, boot: str, *values: int) -> None:
    instance._on_console(b"".join(f"FORGE-COUNTER {boot} {n}\r\n".encode() for n in values))


def test_a_rewind_is_the_first_line_after_since_lower_than_the_one_before(tmp_path: Path) -> None:
    vm = QemuInstance(BUILD, tmp_path)
    console(vm, "b1", 1, 2, 3, 1)  # a rewind before ``since`` does not count
    since = time.monotonic()
    console(vm, "b1", 2, 3, 4, 5, 6, 7)
    assert vm.counter() == ("b1", 7)
    with pytest.raises(TimeoutError, match="did not go back"):
        vm.wait_counter_rewind(since=since, timeout=0.05)
    console(vm, "b1", 3, 4)  # the restored guest goes on from its value at the snapshot
    assert vm.wait_counter_rewind(since=since, timeout=0) == (("b1", 7), ("b1", 3))


def test_a_new_boot_is_a_rewind_even_if_its_counter_is_not_lower(tmp_path: Path) -> None:
    vm = QemuInstance(BUILD, tmp_path)
    since = time.monotonic()
    console(vm, "b1", 0, 1, 2)
    console(vm, "b2", 5)
    assert vm.wait_counter_rewind(since=since, timeout=0) == (("b1", 2), ("b2", 5))


def test_the_wait_ends_when_the_line_arrives(tmp_path: Path) -> None:
    vm = QemuInstance(BUILD, tmp_path)
    since = time.monotonic()
    console(vm, "b1", 10, 11)
    later = threading.Timer(0.05, console, (vm, "b1", 4))
    later.start()
    try:
        assert vm.wait_counter_rewind(since=since, timeout=10) == (("b1", 11), ("b1", 4))
    finally:
        later.join()
