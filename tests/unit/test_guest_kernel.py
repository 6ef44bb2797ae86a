"""The PVH kernel extraction of the test guest: an ELF with the Xen PHYS32_ENTRY note is pulled out
of a (gzip or xz) bzImage-like blob and cached; anything else falls back to the compressed kernel."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from forgeqmp.testing.guest import pvh_kernel


def elf_with_note(name: bytes, kind: int) -> bytes:
    """A minimal 64-bit little-endian ELF with one PT_NOTE segment holding one note."""
    desc = b"\0" * 4
    padded = name + b"\0" * (-len(name) % 4)
    note = struct.pack("<III", len(name), len(desc), kind) + padded + desc
    ehdr_size, phdr_size = 64, 56
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 0, 0, 0
    )
    offset = ehdr_size + phdr_size
    phdr = struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_pvh_elf_is_extracted_and_cached(tmp_path: Path, compress) -> None:  # type: ignore[no-untyped-def]
    elf = elf_with_note(b"Xen\0", 18)
    blob = tmp_path / "vmlinuz"
    blob.write_bytes(b"MZ setup code " * 50 + compress(elf) + b"trailing data")
    found = pvh_kernel(blob, cache=tmp_path / "cache")
    assert found is not None
    assert found.read_bytes() == elf
    assert pvh_kernel(blob, cache=tmp_path / "cache") == found  # cached


@pytest.mark.parametrize(
    "payload",
    [elf_with_note(b"Xen\0", 5), elf_with_note(b"GNU\0", 18), b"not an elf at all"],
    ids=["other-xen-note", "other-owner", "not-elf"],
)
def test_without_a_pvh_entry_the_compressed_kernel_is_used(tmp_path: Path, payload: bytes) -> None:
    blob = tmp_path / "vmlinuz"
    blob.write_bytes(b"MZ" + gzip.compress(payload))
    assert pvh_kernel(blob, cache=tmp_path / "cache") is None
    blob.write_bytes(b"MZ no payload at all")
    assert pvh_kernel(blob, cache=tmp_path / "cache") is None
