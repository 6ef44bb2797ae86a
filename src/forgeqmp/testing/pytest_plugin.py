"""pytest fixtures for tests that need a real QEMU running the test guest.

Registered through the ``pytest11`` entry point, so installing forgeqmp is enough::

    def test_my_agent(qemu_instance):           # one started 1-disk guest, every installed QEMU
        status, out = qemu_instance.run("uname -r")

    def test_two_disks(qemu_factory):
        vm = qemu_factory(disks=[DiskSpec("d0", "qcow2", 64), DiskSpec("d1", "raw", 64)])

    def test_on_proxmox_style(qemu_factory):   # a platform-style command line
        vm = qemu_factory(disks=[...], profile=forgeqmp.testing.platforms.proxmox_style)

Tests that use these fixtures get the ``qemu`` marker (``-m "not qemu"`` leaves them out); a test
(or one ``pytest.param``) marked ``@pytest.mark.qemu_newest`` runs on the newest installed build
only, its runs on the other builds reported as deselected (for what does not differ between builds:
those runs would only repeat it). Without a QEMU build or the test guest's ingredients they are
skipped with the reason and the command that fixes it (``python -m forgeqmp.testing setup``, as
root), unless QEMU is required (``FORGEQMP_REQUIRE_QEMU=1``, ``--forgeqmp-require-qemu`` or the ini
key ``forgeqmp_require_qemu = true``; forgeqmp's own test session sets it): then a missing QEMU
fails them, and a session that collects real-QEMU tests (the ``qemu`` marker or the ``qemu_build``
fixture) fails at once, naming each build the setup installs that is missing or does not start and
why (:func:`~forgeqmp.testing.builds.build_problems`): the build matrix never shrinks silently.

Settings, each as a command-line option, an ini key and an environment variable (the option wins,
then the variable, then the ini key):

- ``--forgeqmp-require-qemu``, ini ``forgeqmp_require_qemu``, ``FORGEQMP_REQUIRE_QEMU=1``: fail,
  never skip;
- ``--forgeqmp-qemu=10.0,7.2``, ini ``forgeqmp_qemu``, ``FORGEQMP_QEMU``: only these builds;
- ``--forgeqmp-accel=kvm``, ini ``forgeqmp_accel``, ``FORGEQMP_ACCEL``: ``tcg`` (default) or
  ``kvm``;
- ``--forgeqmp-prefix=DIR``, ini ``forgeqmp_prefix``, ``FORGEQMP_PREFIX``: where the set-up put
  QEMU 7.2 and the guest.
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
from forgeqmp.testing.setup import guest_missing, setup_command

__all__ = ["qemu_build", "qemu_factory", "qemu_instance"]

#: (option suffix, ini key, environment variable, help) of each setting.
_SETTINGS = (
    ("require-qemu", "forgeqmp_require_qemu", "FORGEQMP_REQUIRE_QEMU",
     "fail real-QEMU tests instead of skipping them when QEMU or the test guest is missing"),
    ("qemu", "forgeqmp_qemu", "FORGEQMP_QEMU",
     "comma-separated QEMU builds to test (e.g. 10.0,7.2; default: every installed build)"),
    ("accel", "forgeqmp_accel", "FORGEQMP_ACCEL", "tcg (default) or kvm"),
    ("prefix", "forgeqmp_prefix", "FORGEQMP_PREFIX",
     "where the set-up put QEMU 7.2 and the test guest (default /opt/forgeqmp)"),
)  # fmt: skip


def _missing_qemu() -> str:
    return (
        "no QEMU build found (qemu-system-x86_64 on PATH, or the 7.2 prefix): "
        f"run {setup_command()}"
    )


def _require() -> bool:
    return require_qemu()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("forgeqmp", "forgeqmp real-QEMU fixtures")
    for suffix, ini, variable, text in _SETTINGS:
        flag = suffix == "require-qemu"
        group.addoption(
            f"--forgeqmp-{suffix}",
            action="store_true" if flag else "store",
            default=None,
            dest=ini,
            help=f"{text} (ini: {ini}; env: {variable})",
        )
        if flag:
            parser.addini(ini, f"{text} (env: {variable})", type="bool")
        else:
            parser.addini(ini, f"{text} (env: {variable})", type="string")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qemu: needs a real QEMU (integration test)")
    config.addinivalue_line(
        "markers",
        "qemu_newest: run on the newest installed QEMU build only (the test exercises nothing "
        "that differs between builds)",
    )
    # The settings reach the harness (and the QEMUs and CLIs tests start) as the variables.
    for _suffix, ini, variable, _text in _SETTINGS:
        option = config.getoption(ini, default=None)
        if option not in (None, False):
            os.environ[variable] = "1" if option is True else str(option)
        elif variable not in os.environ:
            value = config.getini(ini)
            if value not in (None, False, ""):
                os.environ[variable] = "1" if value is True else str(value)


def _needs_qemu(item: pytest.Item) -> bool:
    return item.get_closest_marker("qemu") is not None or "qemu_build" in getattr(
        item, "fixturenames", ()
    )


@pytest.hookimpl(tryfirst=True)  # before -m selects: the marker must already be there
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        if "qemu_build" in getattr(item, "fixturenames", ()) and not item.get_closest_marker(
            "qemu"
        ):
            item.add_marker(pytest.mark.qemu)
    _keep_newest_build_only(config, items)
    if not _require() or not any(_needs_qemu(item) for item in items):
        return
    problems = build_problems()
    if problems:
        raise pytest.UsageError(
            "FORGEQMP_REQUIRE_QEMU is set, but not every QEMU build the setup installs works, so "
            "the real-QEMU tests would silently run on fewer builds:\n  - "
            + "\n  - ".join(problems)
            + f"\nRun {setup_command()} to repair them, or name the builds to test "
            "with FORGEQMP_QEMU (e.g. FORGEQMP_QEMU=10.0)."
        )


def _keep_newest_build_only(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the runs of ``qemu_newest`` tests (or parameters) on a build other than the newest
    installed one (pytest reports them as deselected)."""
    builds = installed_builds()
    if len(builds) < 2:
        return
    newest = builds[0].name
    dropped = [
        item
        for item in items
        if item.get_closest_marker("qemu_newest") is not None
        and (build := _build_of(item)) is not None
        and build.name != newest
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def _build_of(item: pytest.Item) -> QemuBuild | None:
    """The QEMU build a test run is parametrized with (None: it is not)."""
    callspec = getattr(item, "callspec", None)
    build = callspec.params.get("qemu_build") if callspec is not None else None
    return build if isinstance(build, QemuBuild) else None


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
    reason = _missing_qemu() if build is None else None
    gone = guest_missing()
    if reason is None and gone:
        reason = (
            f"the test guest's ingredients are missing ({', '.join(gone)}): run {setup_command()}"
        )
    if reason is not None:
        if _require():
            pytest.fail(reason + " (QEMU is required: FORGEQMP_REQUIRE_QEMU)")
        pytest.skip(reason)
    assert build is not None
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
        accel: str | None = None,
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
            accel=accel or os.environ.get("FORGEQMP_ACCEL") or "tcg",
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
