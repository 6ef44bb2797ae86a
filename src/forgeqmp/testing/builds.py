"""The QEMU builds integration tests run on: the system QEMU and the side-by-side 7.2 in the prefix.

forgeqmp chooses code paths by probing QEMU's features, so its tests must run against more than one
QEMU: the newest (10.0 here, with the ``file:`` migration transport) and the oldest supported (7.2,
``fd:`` only). ``scripts/setup-system`` installs 10.0 system-wide and unpacks 7.2 into
``$FORGEQMP_PREFIX/qemu-7.2``; this module finds both and describes how to run each.

A build is only listed if ``--version`` of both its binaries answers (a half-unpacked prefix or a
missing shared library drops it here rather than failing every test later). ``FORGEQMP_QEMU``
(a comma-separated list of names such as ``10.0,7.2``) restricts the list, e.g. to split a CI matrix.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import types
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

__all__ = [
    "QemuBuild",
    "forgeqmp_prefix",
    "installed_builds",
    "probe_build",
    "requested_build_names",
]

_VERSION_RE = re.compile(
    r"version (?P<num>(?P<major>\d+)\.(?P<minor>\d+)\.(?P<micro>\d+))(?P<rest>.*)"
)
_PROBE_TIMEOUT = 20.0


def forgeqmp_prefix() -> Path:
    """Where ``scripts/setup-system`` put the side-by-side QEMU and the guest: ``$FORGEQMP_PREFIX``."""
    return Path(os.environ.get("FORGEQMP_PREFIX") or "/opt/forgeqmp")


def _to_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _freeze_env(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


@attrs.frozen
class QemuBuild:
    """One runnable QEMU: its binaries and what it needs to find its own firmware and modules.

    ``name`` is ``major.minor`` ("10.0", "7.2"), the unit tests are parametrized over. ``version`` is
    the full text ``--version`` printed after "version" (e.g. ``7.2.22 (Debian 1:7.2+dfsg-7...)``).
    ``extra_args`` go right after the binary on every command line (the 7.2 prefix needs ``-L`` for
    its firmware); ``env`` is added to the environment (``QEMU_MODULE_DIR``, so the prefix QEMU can
    never load the system QEMU's modules).
    """

    name: str
    version: str
    system: Path
    img: Path
    extra_args: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_env, hash=False)

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        """``(major, minor, micro)``, for the rare test that must know (prefer feature probes)."""
        match = _VERSION_RE.search("version " + self.version)
        if match is None:  # pragma: no cover - probe_build only accepts parsable versions
            raise ValueError(f"unparsable QEMU version {self.version!r}")
        return int(match["major"]), int(match["minor"]), int(match["micro"])

    def environ(self) -> dict[str, str]:
        """The environment to run this build's binaries with: ours plus :attr:`env`."""
        merged = dict(os.environ)
        merged.update(self.env)
        return merged

    def system_argv(self, *args: str) -> list[str]:
        """``qemu-system-x86_64`` with this build's extra arguments, then ``args``."""
        return [str(self.system), *self.extra_args, *args]


def _run_version(binary: Path, env: Mapping[str, str]) -> str | None:
    merged = dict(os.environ)
    merged.update(env)
    try:
        done = subprocess.run(
            [str(binary), "--version"],
            env=merged,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    first = done.stdout.splitlines()[0] if done.stdout else ""
    match = _VERSION_RE.search(first)
    return (match["num"] + match["rest"]) if match else None


@functools.cache
def _probe_cached(
    system: Path, img: Path, extra_args: tuple[str, ...], env: tuple[tuple[str, str], ...]
) -> QemuBuild | None:
    version = _run_version(system, dict(env))
    img_version = _run_version(img, dict(env))
    if version is None or img_version is None:
        return None
    match = _VERSION_RE.search("version " + version)
    assert match is not None
    return QemuBuild(
        name=f"{match['major']}.{match['minor']}",
        version=version,
        system=system,
        img=img,
        extra_args=extra_args,
        env=dict(env),
    )


def probe_build(
    system: Path,
    img: Path,
    *,
    extra_args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> QemuBuild | None:
    """Describe the QEMU at ``system``/``img``, or None if either does not run.

    The version is probed once per process (``--version`` of a QEMU takes tens of milliseconds, and
    pytest asks for the builds at collection time).
    """
    return _probe_cached(system, img, tuple(extra_args), tuple(sorted((env or {}).items())))


def _system_build() -> QemuBuild | None:
    system = shutil.which("qemu-system-x86_64")
    if system is None:
        return None
    img = shutil.which("qemu-img", path=str(Path(system).parent)) or shutil.which("qemu-img")
    if img is None:
        return None
    return probe_build(Path(system), Path(img))


def _prefix_build(prefix: Path) -> QemuBuild | None:
    root = prefix / "qemu-7.2" / "usr"
    system = root / "bin" / "qemu-system-x86_64"
    img = root / "bin" / "qemu-img"
    if not (system.is_file() and img.is_file()):
        return None
    # The unpacked 7.2 finds its modules relative to its binary, but QEMU_MODULE_DIR makes that
    # explicit. Its firmware: the prefix's own share dir, then the system seabios (bios-256k.bin).
    return probe_build(
        system,
        img,
        extra_args=("-L", str(root / "share" / "qemu"), "-L", "/usr/share/seabios"),
        env={"QEMU_MODULE_DIR": str(root / "lib" / "x86_64-linux-gnu" / "qemu")},
    )


def requested_build_names() -> list[str] | None:
    """The build names ``FORGEQMP_QEMU`` asks for (e.g. ``"10.0,7.2"``), or None for "all"."""
    raw = os.environ.get("FORGEQMP_QEMU", "").strip()
    if not raw:
        return None
    return [name.strip() for name in raw.split(",") if name.strip()]


def installed_builds() -> list[QemuBuild]:
    """Every working QEMU build, newest first, one per ``major.minor``, filtered by ``FORGEQMP_QEMU``."""
    found: dict[str, QemuBuild] = {}
    for build in (_system_build(), _prefix_build(forgeqmp_prefix())):
        if build is not None and build.name not in found:
            found[build.name] = build
    wanted = requested_build_names()
    builds = [b for b in found.values() if wanted is None or b.name in wanted]
    return sorted(builds, key=lambda b: b.version_tuple, reverse=True)
