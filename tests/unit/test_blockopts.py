"""Block options read from QEMU and the command line, given to overlays, and the reopen that puts
them back (pure logic; the real-QEMU behaviour is in tests/integration/test_block_options.py)."""

from __future__ import annotations

import json

import pytest

from forgeqmp.core.blockopts import (
    BlockOptions,
    argv_block_options,
    options_of,
    options_restored,
    reopen_command,
)

PROXMOX = (
    "qemu-system-x86_64",
    "-drive",
    "file=/var/lib/vz/images/100/vm-100-disk-0.qcow2,if=none,id=drive-virtio0,format=qcow2,"
    "cache=none,aio=io_uring,discard=on,detect-zeroes=unmap,throttling.iops-total=500",
    "-device",
    "virtio-blk-pci,drive=drive-virtio0,id=virtio0",
    "-blockdev",
    json.dumps({"driver": "file", "filename": "/d/x.raw", "node-name": "x-file", "aio": "native",
                "cache": {"direct": True}, "discard": "unmap"}),
    "-blockdev",
    "driver=raw,file=x-file,node-name=x-fmt",
    "-drive",
    "file=/weird,,name.img,if=none,id=odd,discard=ignore",
)  # fmt: skip


def test_argv_options_of_drives_and_blockdevs() -> None:
    given = argv_block_options(PROXMOX)
    assert given["drive-virtio0"]["aio"] == "io_uring"
    assert given["drive-virtio0"]["discard"] == "on"
    assert given["odd"]["file"] == "/weird,name.img"  # ",," is a literal comma
    # A format node gets its file child's options when the child is a -blockdev too.
    assert given["x-fmt"]["aio"] == "native"
    assert given["x-fmt"]["discard"] == "unmap"
    assert given["x-fmt"]["cache.direct"] == "on"


def test_options_from_query_and_command_line() -> None:
    inserted = {"detect_zeroes": "unmap", "cache": {"direct": True, "no-flush": False}}
    opts = options_of(inserted, argv_block_options(PROXMOX)["drive-virtio0"])
    assert opts == BlockOptions("unmap", True, False, "unmap", "io_uring")
    assert opts.file_node_options() == {
        "cache": {"direct": True, "no-flush": False},
        "discard": "unmap",
        "aio": "io_uring",
    }
    assert opts.format_node_options() == {
        "cache": {"direct": True, "no-flush": False},
        "detect-zeroes": "unmap",
        "discard": "unmap",
    }
    assert BlockOptions.from_json(opts.to_json()) == opts
    assert BlockOptions.from_json(None) is None


def test_native_aio_without_direct_io_is_not_asked_of_qemu() -> None:
    # QEMU refuses aio=native without cache.direct: the overlay falls back to its default.
    assert "aio" not in BlockOptions(aio="native", cache_direct=False).file_node_options()


def test_detect_zeroes_unmap_implies_discard_unmap() -> None:
    opts = options_of({"detect_zeroes": "unmap"})
    assert opts.discard == "unmap"
    assert opts.format_node_options()["discard"] == "unmap"


def test_restored_compares_what_qemu_shows() -> None:
    wanted = BlockOptions("unmap", True, False)
    assert options_restored(wanted, {"detect_zeroes": "unmap", "cache": {"direct": True}})
    assert not options_restored(wanted, {"detect_zeroes": "off", "cache": {"direct": True}})


@pytest.mark.parametrize("node", ["#block123", "drive-virtio0", "libvirt-1-format"])
def test_reopen_command_for_node_names(node: str) -> None:
    command = reopen_command(node, BlockOptions("unmap"))
    assert command is not None
    assert command.name == "human-monitor-command"
    assert command.arguments["command-line"] == (
        f'qemu-io {node} "reopen -w -o detect-zeroes=unmap"'
    )


@pytest.mark.parametrize("node", ['a" "x', "a b", "", "-x", "a;b"])
def test_no_reopen_command_for_what_is_not_a_node_name(node: str) -> None:
    assert reopen_command(node, BlockOptions("unmap")) is None
