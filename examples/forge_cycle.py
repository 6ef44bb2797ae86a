"""A forge cycle through the async API: enable, show the session, then discard or commit.

Point it at the QMP socket of a running QEMU (``-qmp unix:PATH,server=on,wait=off``)::

    python examples/forge_cycle.py /run/vm1/qmp.sock                  # enable, then discard
    python examples/forge_cycle.py /run/vm1/qmp.sock --commit         # enable, then commit
    python examples/forge_cycle.py /run/vm1/qmp.sock --all-disks --hold 30

``--hold SECONDS`` keeps the session Active that long before finishing it: the time a user would
spend trying things in the guest. The exit code is the error's ``exit_code`` (the CLI's codes: 2
invalid argument, 3 refused, 4 failed, 5 QEMU unreachable), so scripts can tell them apart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

import forgeqmp


def show_progress(event: forgeqmp.ProgressEvent) -> None:
    """Progress callback: one line per step (commit also reports bytes done per disk)."""
    detail = " ".join(f"{key}={value}" for key, value in event.detail.items())
    print(f"  [{event.operation}] {event.step} {detail}".rstrip(), flush=True)


def show_session(record: forgeqmp.SessionRecord) -> None:
    """The parts of the session record a platform usually shows its users."""
    print(f"session {record.session_id}: {record.state.value} (strategy {record.strategy})")
    if record.pause_ms is not None:
        print(f"  guest pause at enable: {record.pause_ms:.1f} ms")
    for disk in record.disks:
        if record.state is forgeqmp.State.ACTIVE:  # the guest writes into the overlay now
            print(f"  disk {disk.name}: {disk.base_file} under overlay {disk.overlay_file}")
        else:
            print(f"  disk {disk.name}: {disk.base_file}" + (" (merged)" if disk.merged else ""))
    if record.state is forgeqmp.State.ACTIVE and record.memory and record.memory.size:
        print(f"  memory file: {record.memory.path} ({record.memory.size / 2**20:.0f} MiB)")
    for warning in record.warnings:
        print(f"  warning: {warning}")


async def forge_cycle(args: argparse.Namespace) -> forgeqmp.SessionRecord:
    async with forgeqmp.connect(args.qmp_socket, state_dir=args.state_dir) as vm:
        features = await vm.features()
        print(f"QEMU {features.version}; disks: {', '.join(d.name for d in await vm.disks())}")
        session = await vm.enable(args.disk, all_disks=args.all_disks, on_progress=show_progress)
        show_session(session)

        if args.hold:
            print(f"holding the session for {args.hold:g} s", flush=True)
            await anyio.sleep(args.hold)

        if args.commit:
            done = await vm.commit(on_progress=show_progress)
        else:
            # Discard restarts QEMU (same argv) and resumes it from the memory file; `vm`
            # reconnects to the new process by itself.
            done = await vm.discard(on_progress=show_progress)
        show_session(done)
        if done.state is forgeqmp.State.FAILED:
            # discard reports a VM it could not start in the record rather than raising.
            raise forgeqmp.ForgeFailed(f"{done.error}; next: {done.next_step}")
        if done.state is forgeqmp.State.DISCARDED:
            seconds = done.resume_seconds or 0.0
            print(f"  memory restored: {done.memory_restored}; running after {seconds:.2f} s")
            if not done.memory_restored:
                print(f"  cold start instead: {done.error}")
        return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("qmp_socket", help="QEMU's QMP unix socket")
    parser.add_argument("--state-dir", help="default: derived from the socket path")
    parser.add_argument("--disk", action="append", help="qdev id or node-name (repeatable)")
    parser.add_argument("--all-disks", action="store_true", help="forge every writable disk")
    parser.add_argument("--hold", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--commit", action="store_true", help="keep the changes (default: discard)")
    args = parser.parse_args(argv)
    try:
        anyio.run(forge_cycle, args, backend="asyncio")
    except forgeqmp.ForgeError as exc:
        print(f"forge_cycle: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
