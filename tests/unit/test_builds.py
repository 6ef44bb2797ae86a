"""The build list must not shrink silently: :func:`build_problems` names every build the setup
installs that is missing or does not start, and the pytest plugin fails a session that collects
real-QEMU tests on it when ``FORGEQMP_REQUIRE_QEMU`` is set. The 7.2 prefix is faked here
(``FORGEQMP_PREFIX``) by scripts standing in for its binaries; the system QEMU is the real one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgeqmp.testing import builds


def fake_prefix(tmp_path: Path, system_script: str) -> Path:
    """A prefix whose 7.2 binaries are shell scripts (``system_script`` for qemu-system)."""
    bindir = tmp_path / "prefix" / "qemu-7.2" / "usr" / "bin"
    bindir.mkdir(parents=True)
    version = 'echo "QEMU emulator version 7.2.22 (fake)"'
    for name, body in (("qemu-system-x86_64", system_script), ("qemu-img", f"{version}\n")):
        script = bindir / name
        script.write_text(f"#!/bin/sh\n{body}")
        script.chmod(0o755)
    return tmp_path / "prefix"


#: Answers --version like a 7.2, but cannot start (what a missing shared library does).
CANNOT_START = (
    'if [ "$1" = --version ]; then echo "QEMU emulator version 7.2.22 (fake)"; exit 0; fi\n'
    'echo "error while loading shared libraries: libfake.so.1" >&2; exit 127\n'
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGEQMP_QEMU", raising=False)


def test_a_missing_prefix_build_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGEQMP_PREFIX", str(tmp_path / "nothing"))
    problems = builds.build_problems()
    assert any("QEMU 7.2 in" in p and "is missing" in p for p in problems), problems
    assert all(b.name != "7.2" for b in builds.installed_builds())


def test_a_build_that_answers_version_but_does_not_start_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGEQMP_PREFIX", str(fake_prefix(tmp_path, CANNOT_START)))
    problems = [p for p in builds.build_problems() if "QEMU 7.2 in" in p]
    assert len(problems) == 1, problems
    assert "does not start" in problems[0]
    assert "exited 127" in problems[0]
    assert "libfake.so.1" in problems[0]  # QEMU's own reason
    assert all(b.name != "7.2" for b in builds.installed_builds())


def test_a_build_that_starts_but_never_answers_qmp_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = 'if [ "$1" = --version ]; then echo "QEMU emulator version 7.2.22 (fake)"; fi\n'
    monkeypatch.setenv("FORGEQMP_PREFIX", str(fake_prefix(tmp_path, silent)))
    problems = [p for p in builds.build_problems() if "QEMU 7.2 in" in p]
    assert len(problems) == 1, problems
    assert "did not answer QMP" in problems[0]


def test_a_requested_build_that_is_not_there_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGEQMP_PREFIX", str(fake_prefix(tmp_path, CANNOT_START)))
    monkeypatch.setenv("FORGEQMP_QEMU", "7.2")
    problems = builds.build_problems()
    assert len(problems) == 1, problems
    assert "FORGEQMP_QEMU asks for QEMU 7.2" in problems[0]
    assert "libfake.so.1" in problems[0]
    assert builds.installed_builds() == []


def test_a_requested_subset_ignores_the_other_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = builds.installed_builds()
    if not system:
        pytest.skip("no system QEMU here")
    monkeypatch.setenv("FORGEQMP_PREFIX", str(fake_prefix(tmp_path, CANNOT_START)))
    monkeypatch.setenv("FORGEQMP_QEMU", system[0].name)  # a CI job for one build only
    assert builds.build_problems() == []


TEST_FILE = """
import pytest

@pytest.mark.qemu
def test_needs_qemu():
    pass
"""


def run_pytest(tmp_path: Path, prefix: Path, require: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_x.py").write_text(TEST_FILE)
    env = {**os.environ, "FORGEQMP_PREFIX": str(prefix), "FORGEQMP_REQUIRE_QEMU": require}
    env.pop("FORGEQMP_QEMU", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "t")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_plugin_fails_the_session_when_a_build_does_not_start(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, fake_prefix(tmp_path, CANNOT_START), "1")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "FORGEQMP_REQUIRE_QEMU is set" in out
    assert "QEMU 7.2 in" in out
    assert "libfake.so.1" in out


def test_without_the_requirement_the_plugin_lets_the_session_run(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, fake_prefix(tmp_path, CANNOT_START), "0")
    assert done.returncode == 0, done.stdout + done.stderr
