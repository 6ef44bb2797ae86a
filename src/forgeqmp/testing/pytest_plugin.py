"""pytest fixtures for tests that need a real QEMU running the test guest.

Registered through the ``pytest11`` entry point, so installing forgeqmp is enough::

    def test_my_agent(qemu_instance):           # one started 1-disk guest, every installed QEMU
        status, out = qemu_instance.run("uname -r")

    def test_two_disks(qemu_factory):
        vm = qemu_factory(disks=[DiskSpec("d0", "qcow2", 64), DiskSpec("d1", "raw", 64)])

    def test_on_proxmox_style(qemu_factory):   # a platform-style command line
        vm = qemu_factory(disks=[...], profile=forgeqmp.testing.platforms.proxmox_style)

Without any QEMU build the tests are skipped with the reason, unless ``FORGEQMP_REQUIRE_QEMU=1``
(forgeqmp's own test session sets it): then a missing QEMU fails them, and a session that collects
real-QEMU tests (the ``qemu`` marker or the ``qemu_build`` fixture) fails at once, naming each
build the setup installs that is missing or does not start and why
(:func:`~forgeqmp.testing.builds.build_problems`): the build matrix never shrinks silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from forgeqmp.testing.builds import QemuBuild, build_problems, installed_builds, require_qemu
from forgeqmp.testing.instance import DiskSpec, QemuInstance
from forgeqmp.testing.platforms import PlatformProfile

__all__ = ["qemu_build", "qemu_factory", "qemu_instance"]

_MISSING = (
    "no QEMU build found (qemu-system-x86_64 on PATH, or the 7.2 prefix): run scripts/setup-system"
)


def _require() -> bool:
    return require_qemu()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qemu: needs a real QEMU (integration test)")


def _needs_qemu(item: pytest.Item) -> bool:
    return item.get_closest_marker("qemu") is not None or "qemu_build" in getattr(
        item, "fixturenames", ()
    )


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if not _require() or not any(_needs_qemu(item) for item in items):
        return
    problems = build_problems()
    if problems:
        raise pytest.UsageError(
            "FORGEQMP_REQUIRE_QEMU is set, but not every QEMU build the setup installs works, so "
            "the real-QEMU tests would silently run on fewer builds:\n  - "
            + "\n  - ".join(problems)
            + "\nRun scripts/setup-system (as root) to repair them, or name the builds to test "
            "with FORGEQMP_QEMU (e.g. FORGEQMP_QEMU=10.0)."
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "qemu_build" in metafunc.fixturenames:
        builds: list[Any] = list(installed_builds())
        if not builds:
            builds = [None]
        metafunc.parametrize(
            "qemu_build",
            builds,
            ids=[f"qemu-{b.name}" if b else "no-qemu" for b in builds],
            indirect=True,
        )


@pytest.fixture
def qemu_build(request: pytest.FixtureRequest) -> QemuBuild:
    """A QEMU build (parametrized over every installed one: "qemu-10.0", "qemu-7.2")."""
    build: QemuBuild | None = getattr(request, "param", None)
    if build is None:
        if _require():
            pytest.fail(_MISSING + " (FORGEQMP_REQUIRE_QEMU is set)")
        pytest.skip(_MISSING)
    return build


@pytest.fixture
def qemu_factory(
    qemu_build: QemuBuild, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., QemuInstance]]:
    """Start guests on ``qemu_build``: ``qemu_factory(disks=[DiskSpec(...)], memory_mib=512)``.
    Every guest started is stopped and its files removed at teardown, also when the test failed."""
    started: list[QemuInstance] = []

    def start(
        disks: Sequence[DiskSpec] = (DiskSpec("disk0"),),
        *,
        memory_mib: int = 512,
        accel: str = os.environ.get("FORGEQMP_ACCEL", "tcg"),
        extra_args: Sequence[str] = (),
        monitor_fd: bool = False,
        profile: PlatformProfile | None = None,
    ) -> QemuInstance:
        workdir = Path(tmp_path_factory.mktemp("qemu")) / "vm"
        instance = QemuInstance(
            qemu_build,
            workdir,
            disks,
            memory_mib=memory_mib,
            accel=accel,
            extra_args=extra_args,
            monitor_fd=monitor_fd,
            profile=profile,
        )
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        instance.cleanup()


@pytest.fixture
def qemu_instance(qemu_factory: Callable[..., QemuInstance]) -> QemuInstance:
    """A started guest with one 64 MiB qcow2 disk on ``qemu_build``."""
    return qemu_factory()
