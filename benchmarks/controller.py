"""A controller process of its own: what an embedding program would be, so its RSS is only its own.

``python -m benchmarks.controller --impl forgeqmp --cycle commit --state-root DIR SOCKET...`` runs
one enable followed by a commit (or a discard) on every instance at once and prints one JSON line:
the wall time of the whole (connect, feature probe, enable, commit/discard on all instances), each
instance's times, and the peak RSS. ``--impl raw`` does the same with the raw recipe (commit only);
``--impl none`` only imports qemu.qmp (the interpreter's floor).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _rss_mib() -> float:
    """Peak RSS of this process (VmHWM: ru_maxrss would include the parent's RSS at fork)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _forge(socket: str, state_dir: Path, cycle: str) -> dict[str, float]:
    import forgeqmp

    t0 = time.monotonic()
    async with forgeqmp.connect(socket, state_dir=state_dir) as instance:
        await instance.features()
        t1 = time.monotonic()
        await instance.enable()
        t2 = time.monotonic()
        if cycle == "commit":
            await instance.commit()
        else:
            record = await instance.discard()
            if not record.memory_restored:
                raise RuntimeError(f"discard did not restore the memory: {record.error}")
    t3 = time.monotonic()
    return {"connect_s": t1 - t0, "enable_s": t2 - t1, "second_s": t3 - t2, "total_s": t3 - t0}


async def _raw(socket: str, state_dir: Path, qemu_img: str, transport: str) -> dict[str, float]:
    from benchmarks import raw as rawqmp

    state_dir.mkdir(parents=True, exist_ok=True)
    memory = str(state_dir / "raw-memory.bin")
    t0 = time.monotonic()
    async with rawqmp.Raw(socket) as raw:
        t1 = time.monotonic()
        targets = (await rawqmp.disks(raw))[:1]
        session = await rawqmp.enable(
            raw,
            targets,
            memory,
            strategy="precopy",
            transport=transport,
            qemu_img=qemu_img,
            env=os.environ,
            tag="ctl",
        )
        t2 = time.monotonic()
        await rawqmp.commit(raw, session)
    os.unlink(memory)
    t3 = time.monotonic()
    return {"connect_s": t1 - t0, "enable_s": t2 - t1, "second_s": t3 - t2, "total_s": t3 - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("forgeqmp", "raw", "none"), required=True)
    parser.add_argument("--cycle", choices=("commit", "discard"), default="commit")
    parser.add_argument("--state-root", type=Path, default=Path("."))
    parser.add_argument("--qemu-img", default="qemu-img")
    parser.add_argument("--transport", choices=("fd", "fdset-file"), default="fdset-file")
    parser.add_argument("sockets", nargs="*")
    args = parser.parse_args()

    import anyio
    import qemu.qmp  # noqa: F401 - the floor: what any QMP controller in Python loads

    if args.impl == "forgeqmp":
        import forgeqmp  # noqa: F401
    floor = _rss_mib()
    result: dict[str, Any] = {"import_rss_mib": floor}
    if args.impl != "none":
        per: list[dict[str, float]] = [{} for _ in args.sockets]

        async def one(i: int, socket: str) -> None:
            state = args.state_root / f"state-{i}"
            if args.impl == "forgeqmp":
                per[i] = await _forge(socket, state, args.cycle)
            else:
                per[i] = await _raw(socket, state, args.qemu_img, args.transport)

        async def everything() -> None:
            async with anyio.create_task_group() as tg:
                for i, socket in enumerate(args.sockets):
                    tg.start_soon(one, i, socket)

        t0 = time.monotonic()
        anyio.run(everything, backend="asyncio")
        result.update(wall_s=time.monotonic() - t0, instances=per)
    result["peak_rss_mib"] = _rss_mib()
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
