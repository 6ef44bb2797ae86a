"""Embedding forgeqmp in a platform that supervises its own QEMU processes: a custom launcher.

Discard stops the VM's QEMU and starts the same configuration again, waiting for the memory state.
By default forgeqmp starts that QEMU itself, detached (:func:`forgeqmp.detached_launcher`). A
hosting platform that supervises its QEMU processes passes a *launcher* instead, so the new QEMU
is started the platform's way and the platform knows about it: here, with the platform's log file
per VM, its own environment policy, and an inventory (VM name -> QEMU pid) it keeps up to date.

Run it against any QEMU that has a QMP socket::

    python examples/embedding_launcher.py /run/vm1/qmp.sock --vm vm1 --platform-dir /tmp/platform

It enables a session (the primary disk and the memory), then discards it through the platform's
launcher, and prints what the platform saw. The relaunched QEMU keeps running after the script
ends, like a VM the platform's supervisor (a long-running daemon in real life) goes on managing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread

import forgeqmp
from forgeqmp.adapters.launcher import wait_for_qmp
from forgeqmp.adapters.qmp import QMPConnection


class Platform:
    """The part of a hosting platform that starts and tracks QEMU processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.logs = directory / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.inventory_file = directory / "inventory.json"
        self.launches: list[forgeqmp.LaunchSpec] = []

    def inventory(self) -> dict[str, int]:
        if not self.inventory_file.exists():
            return {}
        data: dict[str, int] = json.loads(self.inventory_file.read_text())
        return data

    def register(self, vm_name: str, pid: int) -> None:
        inventory = self.inventory()
        inventory[vm_name] = pid
        tmp = self.inventory_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(inventory, indent=2))
        tmp.replace(self.inventory_file)

    def spawn(self, vm_name: str, spec: forgeqmp.LaunchSpec) -> subprocess.Popen[bytes]:
        """Start QEMU the platform's way (blocking: call it from a worker thread)."""
        kind = "restore" if spec.incoming else "cold start"
        env = dict(spec.env)  # QEMU's environment at enable...
        env["TZ"] = "UTC"  # ...plus whatever the platform's policy adds
        # The old QEMU is gone (forgeqmp waited for its pid), but its socket file may remain;
        # remove it so that only the new QEMU can answer on that path.
        Path(spec.qmp_socket).unlink(missing_ok=True)
        with open(self.logs / f"{vm_name}.log", "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {kind}: {spec.argv[0]}\n".encode())
            log.flush()
            return subprocess.Popen(
                list(spec.argv),  # an argv list: never a shell
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # outlives this script, like the VM it replaces
            )

    def launcher_for(self, vm_name: str) -> forgeqmp.Launcher:
        """The launcher forgeqmp calls for this VM: an async callable given a LaunchSpec."""

        async def launch(spec: forgeqmp.LaunchSpec) -> None:
            # spec.argv is the command line recorded at enable, already rewritten by forgeqmp:
            # ``-incoming defer -S`` appended when spec.incoming (the memory restore), or without
            # them for the cold-start fallback. Start exactly that argv: the memory state only
            # fits the same machine, devices and disks.
            self.launches.append(spec)
            process = await anyio.to_thread.run_sync(self.spawn, vm_name, spec)
            # Return only once QMP answers: forgeqmp connects right after. wait_for_qmp fails
            # early (ForgeFailed) if the process exits first; forgeqmp then falls back to a cold
            # start, or records the failure with the argv to start by hand.
            await wait_for_qmp(spec.qmp_socket, timeout=60, process=process)
            # Ask QEMU itself who it is (the pid behind the socket), whatever -daemonize did.
            conn = QMPConnection(spec.qmp_socket)
            await conn.connect()
            try:
                pid = conn.peer.pid
            finally:
                await conn.close()
            self.register(vm_name, pid)
            kind = "restore" if spec.incoming else "cold start"
            print(f"  platform: started QEMU for {vm_name} ({kind}), pid {pid}")

        return launch


async def forge_and_discard(args: argparse.Namespace) -> int:
    platform = Platform(Path(args.platform_dir))
    async with forgeqmp.connect(args.qmp_socket, state_dir=args.state_dir) as vm:
        platform.register(args.vm, vm.conn.peer.pid)  # the QEMU the platform started at boot
        session = await vm.enable()
        print(f"enabled: disks {[d.name for d in session.disks]}, pause {session.pause_ms} ms")
        done = await vm.discard(launcher=platform.launcher_for(args.vm))

    print(f"discard: {done.state.value}, memory restored: {done.memory_restored}")
    if done.state is not forgeqmp.State.DISCARDED:
        print(f"  error: {done.error}\n  next: {done.next_step}", file=sys.stderr)
        return forgeqmp.ForgeFailed.exit_code
    if not done.memory_restored:
        print(f"  cold start instead: {done.error}")
    print(
        f"platform launches: {[('restore' if s.incoming else 'cold') for s in platform.launches]}"
    )
    print(f"platform inventory: {json.dumps(platform.inventory())}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("qmp_socket", help="QEMU's QMP unix socket")
    parser.add_argument("--vm", default="vm1", help="the platform's name for this VM")
    parser.add_argument("--platform-dir", required=True, help="the platform's logs and inventory")
    parser.add_argument("--state-dir", help="forgeqmp's state dir (default: from the socket)")
    args = parser.parse_args(argv)
    try:
        return anyio.run(forge_and_discard, args, backend="asyncio")
    except forgeqmp.ForgeError as exc:
        print(f"embedding_launcher: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
