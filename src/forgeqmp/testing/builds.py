"""The QEMU builds integration tests run on: the system QEMU and the side-by-side 7.2 in the prefix.

forgeqmp chooses code paths by probing QEMU's features, so its tests must run against more than one
QEMU: the newest (10.0 here, with the ``file:`` migration transport) and the oldest supported (7.2,
``fd:`` only). ``python -m forgeqmp.testing setup`` (``scripts/setup-system`` in the repository) installs 10.0 system-wide and unpacks 7.2 into
``$FORGEQMP_PREFIX/qemu-7.2``; this module finds both and describes how to run each.

A build is only listed if ``--version`` of both its binaries answers and its QEMU really starts
(a q35 machine, paused, with its firmware, answering QMP until ``quit``): a half-unpacked prefix, a
missing shared library or firmware drops it here rather than failing every test later.
``FORGEQMP_QEMU`` (a comma-separated list of names such as ``10.0,7.2``) restricts the list, e.g. to
split a CI matrix.

Dropping a build must never shrink a test run silently: with ``FORGEQMP_REQUIRE_QEMU=1``
(:func:`require_qemu`, set by forgeqmp's own test sessions) :func:`build_problems` names every build
the setup installs (the system QEMU and the 7.2 prefix, or those ``FORGEQMP_QEMU`` asks for) that is
missing or does not start, with the reason, and the pytest plugin fails the session on it.
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
    "build_problems",
    "forgeqmp_prefix",
    "installed_builds",
    "probe_build",
    "requested_build_names",
    "require_qemu",
]

_VERSION_RE = re.compile(
    r"version (?P<num>(?P<major>\d+)\.(?P<minor>\d+)\.(?P<micro>\d+))(?P<rest>.*)"
)
_PROBE_TIMEOUT = 20.0


def forgeqmp_prefix() -> Path:
    """Where the set-up (:mod:`forgeqmp.testing.setup`) put the side-by-side QEMU and the guest: ``$FORGEQMP_PREFIX``."""
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


def require_qemu() -> bool:
    """Whether ``FORGEQMP_REQUIRE_QEMU`` is set (not empty, not ``0``): then a real-QEMU test that
    cannot run fails instead of being skipped, and so does a build the setup installs that does not
    start (forgeqmp's own test sessions set it)."""
    return os.environ.get("FORGEQMP_REQUIRE_QEMU", "") not in ("", "0")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _run(argv: list[str], env: Mapping[str, str], stdin: str = "") -> tuple[str | None, str]:
    """Run ``argv``: (its stdout, "") if it exited 0 in time, else (None, why not)."""
    merged = dict(os.environ)
    merged.update(env)
    try:
        done = subprocess.run(
            argv,
            env=merged,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
    except OSError as exc:
        return None, f"{argv[0]} does not run: {exc}"
    except subprocess.TimeoutExpired:
        return None, f"{argv[0]} did not end within {_PROBE_TIMEOUT:.0f} s"
    if done.returncode != 0:
        return None, f"{argv[0]} exited {done.returncode}: {_last_line(done.stderr)}"
    return done.stdout, ""


def _run_version(binary: Path, env: Mapping[str, str]) -> tuple[str | None, str]:
    out, why = _run([str(binary), "--version"], env)
    if out is None:
        return None, why
    first = out.splitlines()[0] if out else ""
    match = _VERSION_RE.search(first)
    if match is None:
        return None, f"{binary} --version printed no version: {first!r}"
    return match["num"] + match["rest"], ""


#: What the start check sends on QMP (stdio): the capabilities negotiation, then quit.
_START_QMP = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


def _start_error(system: Path, extra_args: tuple[str, ...], env: Mapping[str, str]) -> str:
    """Start the QEMU as the tests do (q35, TCG, firmware loaded, paused), talk QMP to it on stdio
    and quit; "" if it did all that, else why not."""
    argv = [str(system), *extra_args, "-machine", "q35", "-accel", "tcg", "-m", "16"]
    argv += ["-nodefaults", "-display", "none", "-S", "-qmp", "stdio"]
    out, why = _run(argv, env, stdin=_START_QMP)
    if out is None:
        return f"it does not start: {why}"
    if '"host-qmp-quit"' not in out:
        return f"it started but did not answer QMP until quit: {_last_line(out)}"
    return ""


@functools.cache
def _probe_cached(
    system: Path, img: Path, extra_args: tuple[str, ...], env: tuple[tuple[str, str], ...]
) -> QemuBuild | str:
    version, why = _run_version(system, dict(env))
    if version is None:
        return why
    img_version, why = _run_version(img, dict(env))
    if img_version is None:
        return why
    why = _start_error(system, extra_args, dict(env))
    if why:
        return f"{system}: {why}"
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
    """Describe the QEMU at ``system``/``img``, or None if either does not run or QEMU does not
    start.

    A build is probed once per process (``--version`` and a start of a paused QEMU take well under
    a second, and pytest asks for the builds at collection time).
    """
    found = _probe(system, img, extra_args=extra_args, env=env)
    return found if isinstance(found, QemuBuild) else None


def _probe(
    system: Path,
    img: Path,
    *,
    extra_args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> QemuBuild | str:
    return _probe_cached(system, img, tuple(extra_args), tuple(sorted((env or {}).items())))


def _system_build() -> QemuBuild | str:
    system = shutil.which("qemu-system-x86_64")
    if system is None:
        return "qemu-system-x86_64 is not on PATH"
    img = shutil.which("qemu-img", path=str(Path(system).parent)) or shutil.which("qemu-img")
    if img is None:
        return "qemu-img is not on PATH"
    return _probe(Path(system), Path(img))


def _prefix_build(prefix: Path) -> QemuBuild | str:
    root = prefix / "qemu-7.2" / "usr"
    system = root / "bin" / "qemu-system-x86_64"
    img = root / "bin" / "qemu-img"
    for binary in (system, img):
        if not binary.is_file():
            return f"{binary} is missing"
    # The unpacked 7.2 finds its modules relative to its binary, but QEMU_MODULE_DIR makes that
    # explicit. Its firmware: the prefix's own share dir, then the system seabios (bios-256k.bin).
    return _probe(
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


def _candidates() -> list[tuple[str, QemuBuild | str]]:
    """Every build the setup installs: (what it is, the build or why it is not usable)."""
    prefix = forgeqmp_prefix() / "qemu-7.2"
    return [
        ("the system QEMU (qemu-system-x86_64 on PATH)", _system_build()),
        (f"QEMU 7.2 in {prefix}", _prefix_build(forgeqmp_prefix())),
    ]


def installed_builds() -> list[QemuBuild]:
    """Every working QEMU build, newest first, one per ``major.minor``, filtered by ``FORGEQMP_QEMU``."""
    found: dict[str, QemuBuild] = {}
    for _what, build in _candidates():
        if isinstance(build, QemuBuild) and build.name not in found:
            found[build.name] = build
    wanted = requested_build_names()
    builds = [b for b in found.values() if wanted is None or b.name in wanted]
    return sorted(builds, key=lambda b: b.version_tuple, reverse=True)


def build_problems() -> list[str]:
    """Why the builds the setup installs are not all usable: one sentence per build that is
    missing or does not start (or, with ``FORGEQMP_QEMU``, per name it asks for that no working
    build has). Empty when every expected build works."""
    candidates = _candidates()
    broken = [f"{what}: {build}" for what, build in candidates if isinstance(build, str)]
    wanted = requested_build_names()
    if wanted is None:
        names = [b.name for _w, b in candidates if isinstance(b, QemuBuild)]
        duplicate = sorted({n for n in names if names.count(n) > 1})
        return broken + [f"two of the builds are both QEMU {n}: one is missing" for n in duplicate]
    have = {b.name for _w, b in candidates if isinstance(b, QemuBuild)}
    missing = [name for name in wanted if name not in have]
    if not missing:
        return []
    found = ", ".join(sorted(have)) or "none"
    context = f" ({'; '.join(broken)})" if broken else ""
    return [
        f"FORGEQMP_QEMU asks for QEMU {name}, but the working builds are: {found}{context}"
        for name in missing
    ]
