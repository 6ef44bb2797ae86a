"""Can forgeqmp start this QEMU again from its command line? A pure analysis of the argv.

Discard (and recover) stop QEMU and start the recorded argv again. That only works when the argv
alone describes the VM: anything QEMU got from the process that started it, and not from a name
on the command line, is lost in a plain re-exec. :func:`relaunch_findings` lists every such
argument, with why and what to do:

- inherited file descriptors in any option (``fd=N``, ``fds=N:M``, ``vhostfd=N``,
  ``vhostfds=``, ``cancel-fd=``, ``addr.type=fd``; keyval or JSON form), as libvirt passes its
  monitor (``-chardev socket,id=charmonitor,fd=33,server=on,wait=off``) and platforms pass tap
  devices (``-netdev tap,fd=N,vhostfd=M``);
- fd sets: ``-add-fd`` and every ``/dev/fdset/N`` path (also ``/dev/fd/N``, ``/proc/self/fd/N``);
- QEMU's standard input and output used as a chardev or a monitor (``stdio``): they belong to the
  process that started QEMU, and a relaunched QEMU's go to ``/dev/null`` and the log.

Reproducible, so not findings: ``-daemonize`` and ``-pidfile`` (the default launcher handles a
QEMU that daemonizes), ``-S`` and ``-incoming``/``-loadvm`` (replaced for the relaunch), sockets,
files and devices given by path.

No I/O: the argv in, frozen findings out. :func:`forgeqmp.ops.enable` refuses a session with
findings unless a launcher (:mod:`forgeqmp.adapters.launcher`) is configured, which starts QEMU the
platform's way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, Final

import attrs

__all__ = ["Finding", "describe_findings", "relaunch_findings"]


@attrs.frozen
class Finding:
    """One argument a plain re-exec of the argv cannot reproduce."""

    #: The option, e.g. ``-chardev``.
    option: str
    #: Its value as written on the command line.
    value: str
    #: What in it cannot be reproduced, e.g. ``fd=33``.
    item: str
    #: Why a relaunch cannot reproduce it.
    reason: str
    #: What to do about it.
    remedy: str

    @property
    def argument(self) -> str:
        """The argument as on the command line (``-chardev socket,...,fd=33,...``)."""
        return f"{self.option} {self.value}" if self.value else self.option


#: The remedy common to every finding: a launcher starts QEMU the platform's way.
LAUNCHER_REMEDY: Final = (
    "configure a launcher that starts QEMU the platform's way (forgeqmp --launcher PATH, "
    "FORGEQMP_LAUNCHER, or forgeqmp.connect(..., launcher=...); see docs/platforms.md)"
)

#: Options that take no value (the rest take one). Unknown options followed by another option are
#: taken as flags too, so a new flag never hides the option after it.
_FLAGS: Final = frozenset(
    {
        "-S", "-s", "-daemonize", "-nodefaults", "-no-user-config", "-nographic", "-snapshot",
        "-no-reboot", "-no-shutdown", "-enable-kvm", "-no-hpet", "-no-acpi", "-only-migratable",
        "-full-screen", "-no-fd-bootchk", "-win2k-hack", "-usb", "-preconfig", "-enable-fips",
        "-no-quit", "-alt-grab", "-ctrl-grab", "-semihosting", "-portrait", "-old-param",
        "-enable-sync-profile", "-perfmap", "-jitdump", "-version", "-help", "-h",
    }
)  # fmt: skip
#: Options whose value forgeqmp replaces on a relaunch (see :mod:`forgeqmp.adapters.launcher`).
_REPLACED: Final = frozenset({"-incoming", "-loadvm"})
#: Options whose value is free text, never an option list or a path QEMU opens.
_FREE_TEXT: Final = frozenset({"-append", "-name", "-uuid", "-smbios", "-fw_cfg", "-k"})
#: Legacy chardev-string options (``stdio``, ``mon:stdio``, ``unix:PATH,server``, a path).
_CHARDEV_STRING: Final = frozenset(
    {"-serial", "-parallel", "-monitor", "-qmp", "-qmp-pretty", "-debugcon", "-virtioconsole"}
)
#: Keyval/JSON keys (their last dotted component) holding an inherited file descriptor.
_FD_KEY = re.compile(r"^(?:fd|fds|vhostfd|vhostfds|cancel-fd|sock_fd)$")
#: Paths that name an inherited descriptor or an fd set.
_FD_PATH = re.compile(r"(/dev/fdset/\d+|/dev/fd/\d+|/proc/self/fd/\d+)")

_FD_REASON = (
    "QEMU got this open file descriptor from the process that started it; forgeqmp cannot give "
    "a QEMU it starts again the same open file"
)
_FDSET_REASON = (
    "an fd set is filled with descriptors QEMU inherited (-add-fd) or was sent over QMP; a QEMU "
    "started again from the argv has none of them"
)
_STDIO_REASON = (
    "QEMU's standard input and output belong to the process that started it; a QEMU that "
    "forgeqmp starts again gets /dev/null and a log file instead, so whatever talks to it there "
    "is cut off"
)


def _options(argv: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(option, value) pairs of a QEMU argv (value "" for a flag; option "" for a bare image)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            yield "", arg  # a bare disk image, as -hda takes it
            continue
        name = "-" + arg.lstrip("-")
        if "=" in name and arg.startswith("--"):  # --option=value
            name, _, value = name.partition("=")
            yield name, value
            continue
        if name in _FLAGS:
            yield name, ""
            continue
        if i >= len(argv):
            yield name, ""
            continue
        value = argv[i]
        if value.startswith("-") and value != "-" and not value.startswith("-{"):
            # An option follows: an unknown flag. (A value starting with '-' is rarer than a
            # flag we do not know, and QEMU never takes an option name as a value.)
            known_value_options = _CHARDEV_STRING | _FREE_TEXT | _KEYVAL
            if name not in known_value_options:
                yield name, ""
                continue
        i += 1
        yield name, value


#: Options whose value is an option list (``a=b,c=d`` or JSON); the others' values are checked
#: for fd paths only.
_KEYVAL: Final = frozenset(
    {
        "-chardev", "-netdev", "-nic", "-net", "-device", "-object", "-mon", "-blockdev", "-drive",
        "-add-fd", "-fsdev", "-virtfs", "-tpmdev", "-audiodev", "-audio", "-numa", "-machine",
        "-M", "-accel", "-iscsi", "-spice", "-vnc", "-display", "-global", "-rtc", "-smp",
        "-boot", "-m", "-cpu", "-overcommit", "-msg", "-sandbox", "-trace", "-plugin",
        "-compat", "-watchdog-action", "-action", "-run-with", "-pflash", "-mtdblock",
        "-sd", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-fda", "-fdb",
    }
)  # fmt: skip


def _keyval(value: str) -> list[tuple[str, str]]:
    """QEMU's ``a=b,c=d`` syntax (``,,`` is a literal comma); a bare first item is the implied
    key (``socket`` in ``-chardev socket,...``), returned with the key ""."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if value[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current))
    pairs = []
    for item in items:
        key, eq, val = item.partition("=")
        pairs.append((key, val) if eq else ("", item))
    return pairs


def _json_leaves(obj: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value as text) of every scalar in a JSON option (``addr.type``)."""
    if isinstance(obj, dict):
        for key, val in obj.items():
            yield from _json_leaves(val, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for n, val in enumerate(obj):
            yield from _json_leaves(val, f"{path}.{n}")
    elif isinstance(obj, bool) or obj is None:
        yield path, json.dumps(obj)
    else:
        yield path, str(obj)


def _pairs(value: str) -> list[tuple[str, str]]:
    if value.startswith("{"):
        try:
            return list(_json_leaves(json.loads(value)))
        except ValueError:
            pass  # not JSON after all: QEMU would take it as keyval
    return _keyval(value)


def _chardev_finding(option: str, value: str, what: str) -> Finding:
    return Finding(
        option=option,
        value=value,
        item=what,
        reason=_STDIO_REASON,
        remedy="use a unix socket instead (e.g. -chardev socket,id=...,path=PATH,server=on,"
        "wait=off), or " + LAUNCHER_REMEDY,
    )


def _fd_remedy(option: str) -> str:
    named = {
        "-chardev": "give the socket by path (path=PATH) instead of fd=",
        "-mon": "give the monitor's chardev a socket path instead of fd=",
        "-netdev": "give the tap device by name (ifname=..., script=no) instead of fd=/vhostfd=",
        "-nic": "give the tap device by name (ifname=..., script=no) instead of fd=/vhostfd=",
        "-net": "give the tap device by name (ifname=..., script=no) instead of fd=/vhostfd=",
    }.get(option, "give the file by its path instead of a descriptor")
    return f"{named}, or {LAUNCHER_REMEDY}"


def relaunch_findings(argv: Sequence[str]) -> tuple[Finding, ...]:
    """Every argument of ``argv`` (``argv[0]`` is the binary) that forgeqmp cannot reproduce by
    running the argv again, in command-line order; () when a plain relaunch reproduces the VM.
    """
    findings: list[Finding] = []
    for option, value in _options(argv):
        if option in _REPLACED or option in _FREE_TEXT or not value:
            continue
        if option == "-add-fd":
            pairs = dict(_pairs(value))
            findings.append(
                Finding(
                    option=option,
                    value=value,
                    item=f"fd set {pairs.get('set', '?')} (fd={pairs.get('fd', '?')})",
                    reason=_FDSET_REASON,
                    remedy="open the file by its path instead of /dev/fdset/N, or "
                    + LAUNCHER_REMEDY,
                )
            )
            continue
        if option in _CHARDEV_STRING and (
            value in ("stdio", "mon:stdio") or value.startswith("stdio,")
        ):
            findings.append(_chardev_finding(option, value, "stdio"))
            continue
        items: list[str] = []
        if option in _KEYVAL:
            pairs_list = _pairs(value)
            backend = next((v for k, v in pairs_list if k in ("", "backend")), None)
            if option == "-chardev" and backend == "stdio":
                findings.append(_chardev_finding(option, value, "stdio"))
                continue
            for key, val in pairs_list:
                last = key.rsplit(".", 1)[-1]
                inherited = bool(_FD_KEY.match(last)) and bool(val)
                stream_fd = last == "type" and val == "fd" and "." in key  # -netdev stream
                if inherited or stream_fd:
                    items.append(f"{key}={val}")
        if items:
            findings.append(
                Finding(
                    option=option,
                    value=value,
                    item=", ".join(items),
                    reason=_FD_REASON,
                    remedy=_fd_remedy(option),
                )
            )
            continue
        paths = sorted(set(_FD_PATH.findall(value)))
        if paths:
            findings.append(
                Finding(
                    option=option or "(image)",
                    value=value,
                    item=", ".join(paths),
                    reason=_FDSET_REASON if "fdset" in paths[0] else _FD_REASON,
                    remedy="open the file by its path, or " + LAUNCHER_REMEDY,
                )
            )
    return tuple(findings)


def describe_findings(findings: Sequence[Finding]) -> str:
    """One message naming every finding's argument, what is wrong and the remedy."""
    return "; ".join(f"{f.argument} ({f.item}): {f.reason}; {f.remedy}" for f in findings)
