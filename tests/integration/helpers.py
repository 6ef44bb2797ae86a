"""Shared helpers of the integration tests: running forgeqmp coroutines from sync tests, and
observing QEMU's block graph and the files a forge leaves."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import pytest

import forgeqmp
from forgeqmp.adapters.qmp import connect as qmp_connect
from forgeqmp.testing.builds import require_qemu

T = TypeVar("T")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a real-QEMU test that cannot run here, or fail it when ``FORGEQMP_REQUIRE_QEMU`` is
    set (CI): there, every real-QEMU test must run, so a skip would shrink the suite silently."""
    if require_qemu():
        pytest.fail(f"{reason} (FORGEQMP_REQUIRE_QEMU is set: every real-QEMU test must run)")
    pytest.skip(reason)


def run(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run an async function to completion on the asyncio backend (the supported one)."""
    return anyio.run(functools.partial(fn, *args, **kwargs), backend="asyncio")


async def qmp(socket: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QMP command on a fresh connection."""
    async with qmp_connect(socket) as conn:
        return await conn.execute(command, arguments)


async def features(socket: str) -> forgeqmp.Features:
    """What the QEMU at ``socket`` can do, as forgeqmp's probe sees it."""
    async with forgeqmp.connect(socket) as instance:
        return await instance.features()


def block_graph(socket: str) -> tuple[Any, list[str]]:
    """(device → attached node, backing depth) and the sorted node-names in the graph."""

    async def main() -> tuple[Any, list[str]]:
        async with qmp_connect(socket) as conn:
            blocks = await conn.execute("query-block")
            nodes = await conn.execute("query-named-block-nodes")
        attached = sorted(
            (b["qdev"], b["inserted"]["node-name"], b["inserted"].get("backing_file_depth", 0))
            for b in blocks
            if b.get("inserted")
        )
        return attached, sorted(n["node-name"] for n in nodes)

    return run(main)


def files_under(*dirs: str | os.PathLike[str]) -> set[str]:
    """Every file path below the given directories (to show nothing new was left)."""
    found: set[str] = set()
    for top in dirs:
        for root, _subdirs, names in os.walk(top):
            found.update(os.path.join(root, n) for n in names)
    return found


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dir_of(tmp_path: Path) -> Path:
    return tmp_path / "state"


async def enable(socket: str, state_dir: Path, **kw: Any) -> forgeqmp.SessionRecord:
    async with forgeqmp.connect(socket, state_dir=state_dir) as vm:
        return await vm.enable(**kw)


async def commit(socket: str, state_dir: Path, **kw: Any) -> forgeqmp.SessionRecord:
    async with forgeqmp.connect(socket, state_dir=state_dir) as vm:
        return await vm.commit(**kw)


async def discard(socket: str, state_dir: Path, **kw: Any) -> forgeqmp.SessionRecord:
    async with forgeqmp.connect(socket, state_dir=state_dir) as vm:
        return await vm.discard(**kw)


#: A controller process that runs one commit: ``socket state [timeout] [offline]``.
_COMMIT_CONTROLLER = textwrap.dedent(
    """
    import sys, anyio, forgeqmp
    socket, state, timeout, offline = (sys.argv[1:] + ["", ""])[:4]
    async def main():
        async with forgeqmp.connect(socket, state_dir=state, allow_offline=offline == "1") as vm:
            await vm.commit(**({"timeout": float(timeout)} if timeout else {}))
    anyio.run(main)
    """
)


def commit_killed_at(
    socket: str,
    state: Path,
    step: str,
    env: Mapping[str, str],
    *,
    timeout: float | None = None,
    allow_offline: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a commit in a controller process of its own that kills itself at the crash point
    ``commit:<step>`` (``env`` has the crash points' opt-in; this adds the point), and check it
    did: SIGKILLed there, and said so."""
    from forgeqmp.adapters import crashpoints

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _COMMIT_CONTROLLER,
            socket,
            str(state),
            "" if timeout is None else str(timeout),
            "1" if allow_offline else "",
        ],
        env={**env, crashpoints.ENABLE_ENV: "1", crashpoints.ENV: f"commit:{step}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == -9, (step, done.stderr)
    assert f"crash point commit:{step}:self" in done.stderr, (step, done.stderr)
    return done
