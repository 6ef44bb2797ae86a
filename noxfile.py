"""Developer sessions: ``nox -s lint typecheck tests`` is what CI runs (through scripts/test)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"


def setup_system(session: nox.Session) -> None:
    """Install QEMU 10.x and 7.2 and the test guest's ingredients (idempotent, seconds when done)."""
    cmd = [str(ROOT / "scripts" / "setup-system")]
    if os.geteuid() != 0:
        cmd = ["sudo", *cmd]
    session.run(*cmd, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", ".[test]", "mypy>=1.10")
    session.run("mypy", "--strict", "src")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite: unit, property and real-QEMU integration tests (QEMU 10.x and 7.2)."""
    setup_system(session)
    session.install("-e", ".[test]")
    # The suite installs its own QEMU (above), so a missing QEMU is a failure here, not a skip.
    session.env["FORGEQMP_REQUIRE_QEMU"] = "1"
    # Two pytest-xdist workers that steal work from each other: xdist's default "load"
    # scheduling hands each worker a contiguous quarter of the collection first, and the
    # real-QEMU tests (collected first) then all go to one worker and run one at a time (31
    # minutes instead of 17). The tests that read the guest's counter under contention compare
    # lines with lines (``wait_counter_rewind``), not with a reading taken earlier, so two
    # QEMU tests at once do not make them flaky. Arguments given to the session replace these.
    session.run("pytest", *(session.posargs or ["-q", "-n", "2", "--dist", "worksteal"]))


@nox.session
def load(session: nox.Session) -> None:
    """The big load runs (``slow``): 8 guests x 5 cycles and 16 guests x 2 cycles forged,
    discarded and committed at once, on every installed QEMU (about 15 minutes on 2 cores)."""
    setup_system(session)
    session.install("-e", ".[test]")
    session.env["FORGEQMP_REQUIRE_QEMU"] = "1"
    session.run(
        "pytest", "-m", "slow", "-s", "tests/integration/test_load.py", *(session.posargs or ["-q"])
    )


@nox.session
def faults(session: nox.Session) -> None:
    """The full fault matrix (``slow``): the controller and QEMU SIGKILLed at every step of enable,
    commit and discard, and at random moments of each, then recover, on every installed QEMU
    (docs/fault-matrix.md). ``FORGEQMP_RANDOM_KILL_SEED`` picks other random moments."""
    setup_system(session)
    session.install("-e", ".[test]")
    session.env["FORGEQMP_REQUIRE_QEMU"] = "1"
    session.run(
        "pytest",
        "-m",
        "slow",
        "tests/integration/test_recover.py",
        "tests/integration/test_random_kills.py",
        *(session.posargs or ["-q"]),
    )


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation (Sphinx + MyST): docs/_build/html; warnings fail the build."""
    if shutil.which("dot") is None:  # Graphviz draws the state diagram into SVG at build time
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "graphviz"]
        session.run(*(cmd if os.geteuid() == 0 else ["sudo", *cmd]), external=True)
    session.install("-e", ".[docs,test]")  # test: the pytest plugin is documented too
    # -E: read every page again, so pages generated from the code or tolerant of missing pages
    # are never stale.
    session.run(
        "sphinx-build", "-E", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html"
    )
    # Every page renders offline; the state diagram is an SVG naming every state.
    session.run("python", "docs/_ext/check_offline.py", "docs/_build/html")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the raw QEMU baseline (docs/performance.md): ``-- --quick`` takes a few
    minutes; without it, the full matrix on every installed QEMU. Tables in benchmarks/results/."""
    setup_system(session)
    session.install("-e", ".")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: a real VM booted and forged (see README)."""
    setup_system(session)
    session.install("-e", ".[cli]")
    session.run("python", "examples/demo.py", *session.posargs)
