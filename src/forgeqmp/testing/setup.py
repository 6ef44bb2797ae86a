"""Setting the machine up for real-QEMU tests, from the installed package (no repository needed).

The set-up ships inside the package as ``setup-system.sh`` (the same file forgeqmp's own
``scripts/setup-system`` runs): on Debian 12, as root and idempotently, it installs QEMU 10.x
from bookworm-backports, unpacks QEMU 7.2 side by side into ``$FORGEQMP_PREFIX/qemu-7.2``, unpacks
the test guest's kernel and busybox into ``$FORGEQMP_PREFIX/guest``, and installs the firmware and
tools of the platform-style guests. ``python -m forgeqmp.testing setup`` runs it;
``python -m forgeqmp.testing check`` says what is missing without changing anything.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path

from forgeqmp.testing.builds import build_problems, forgeqmp_prefix, installed_builds

__all__ = ["SCRIPT", "guest_missing", "missing", "run_setup", "setup_command"]

#: The set-up script's file name inside the package.
SCRIPT = "setup-system.sh"


def setup_command() -> str:
    """The command that sets this machine up, as a user pastes it: this interpreter (a venv's
    Python keeps the venv), as root."""
    command = f"{shlex.quote(sys.executable)} -m forgeqmp.testing setup"
    return command if os.geteuid() == 0 else f"sudo {command}"


def _script() -> Path:
    path = resources.files("forgeqmp.testing").joinpath(SCRIPT)
    return Path(str(path))


def guest_missing(prefix: Path | None = None) -> list[str]:
    """The test guest's ingredients that are not installed (empty when the guest can boot)."""
    guest = (prefix if prefix is not None else forgeqmp_prefix()) / "guest"
    return [str(guest / n) for n in ("vmlinuz", "busybox", "modules") if not (guest / n).exists()]


def missing() -> list[str]:
    """Everything real-QEMU tests need that is missing or broken here, each with why."""
    found = [f"test guest ingredient {p} is missing" for p in guest_missing()]
    if not installed_builds():
        found.append("no QEMU build starts (qemu-system-x86_64 on PATH, or the 7.2 prefix)")
    found.extend(build_problems())
    return found


def run_setup() -> int:
    """Run the packaged set-up script (argv list, no shell); its exit status."""
    script = _script()
    if not script.is_file():
        print(f"forgeqmp.testing: the set-up script {script} is missing from this installation")
        return 1
    if os.geteuid() != 0:
        print(
            "forgeqmp.testing: the set-up installs Debian packages and must run as root: "
            f"{setup_command()}",
            file=sys.stderr,
        )
        return 1
    return subprocess.run(["bash", str(script)], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """``python -m forgeqmp.testing setup|check``."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["setup"]:
        return run_setup()
    if args == ["check"]:
        problems = missing()
        for problem in problems:
            print(f"missing: {problem}")
        if problems:
            print(f"fix: {setup_command()}")
            return 1
        names = ", ".join(b.name for b in installed_builds())
        print(f"ready: QEMU {names}; the test guest in {forgeqmp_prefix() / 'guest'}")
        return 0
    print(
        "usage: python -m forgeqmp.testing setup   # install QEMU 10.x + 7.2 and the test guest "
        "(Debian 12, as root, idempotent)\n"
        "       python -m forgeqmp.testing check   # say what is missing (exit 1) or ready (0)",
        file=sys.stderr,
    )
    return 2
