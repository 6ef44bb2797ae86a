"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os

import pytest

from .helpers import skip_or_fail


@pytest.fixture
def root() -> None:
    """Tests that mount a small tmpfs (ENOSPC, read-only file systems) need root: without it they
    skip, and fail under FORGEQMP_REQUIRE_QEMU (CI runs as root), never shrinking silently."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
