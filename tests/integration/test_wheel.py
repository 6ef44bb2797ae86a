"""forgeqmp as another project gets it: a wheel installed in a fresh virtual environment outside
this repository. A user's test with ``qemu_instance`` is skipped, naming the command that fixes
it, while the test guest is missing, and passes on real QEMU with the guest set up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgeqmp.testing.builds import forgeqmp_prefix, installed_builds

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]
USER_TEST = """
def test_my_agent(qemu_instance):
    assert qemu_instance.check("echo hello").strip() == "hello"
"""


def _run(*argv: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with forgeqmp's wheel (and pytest) installed; nothing from this checkout."""
    work = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work, ROOT, cwd=work, env=env
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = work.glob("forgeqmp-*.whl")
    venv = work / "venv"
    made = _run(sys.executable, "-m", "venv", venv, cwd=work, env=env)
    assert made.returncode == 0, made.stderr
    installed = _run(
        venv / "bin" / "python", "-m", "pip", "install", "-q", f"{wheel}[test]", cwd=work, env=env
    )
    assert installed.returncode == 0, installed.stderr
    return venv


def test_a_wheel_in_another_project_skips_then_passes_after_the_setup(  # type: ignore[no-untyped-def]
    wheel_venv: Path, tmp_path: Path
) -> None:
    if not installed_builds():
        pytest.fail("no QEMU build: the suite's own set-up should have installed one")
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_agent.py").write_text(USER_TEST)
    python = wheel_venv / "bin" / "python"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FORGEQMP_", "PYTHON"))}
    # It is the wheel's forgeqmp, not this checkout's.
    where = _run(python, "-c", "import forgeqmp; print(forgeqmp.__file__)", cwd=project, env=base)
    assert str(wheel_venv) in where.stdout, where

    empty = tmp_path / "empty-prefix"
    empty.mkdir()
    skipped = _run(python, "-m", "pytest", "-rs", "-p", "no:cacheprovider", cwd=project,
                   env={**base, "FORGEQMP_PREFIX": str(empty)})  # fmt: skip
    assert skipped.returncode == 0, skipped.stdout
    assert "1 skipped" in skipped.stdout
    assert f"{python} -m forgeqmp.testing setup" in skipped.stdout

    # The documented set-up (run by this suite already: idempotent, seconds) makes it pass.
    env = {**base, "FORGEQMP_PREFIX": str(forgeqmp_prefix())}
    check = _run(python, "-m", "forgeqmp.testing", "check", cwd=project, env=env)
    assert check.returncode == 0, check.stdout
    assert check.stdout.startswith("ready: QEMU ")
    if os.geteuid() == 0:
        setup = _run(python, "-m", "forgeqmp.testing", "setup", cwd=project, env=env)
        assert setup.returncode == 0, setup.stderr
    passed = _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=project, env=env)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"{len(installed_builds())} passed" in passed.stdout
