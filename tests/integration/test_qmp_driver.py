"""The QMP driver against real QEMU (every installed build): commands, events, fd passing, the
feature probe and the identity of the process behind the socket."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import pytest

from forgeqmp.adapters.featureprobe import probe
from forgeqmp.adapters.process import describe_process
from forgeqmp.adapters.qmp import connect
from forgeqmp.errors import QMPCommandError, QMPDisconnected, QMPTimeout

from .helpers import run

pytestmark = pytest.mark.qemu


def test_command_event_fd_passing_and_probe(qemu_instance, qemu_build) -> None:  # type: ignore[no-untyped-def]
    socket = qemu_instance.qmp_socket

    async def main() -> None:
        async with connect(socket) as conn:
            # A command and its typed error.
            status = await conn.execute("query-status")
            assert status["status"] == "running"
            with pytest.raises(QMPCommandError) as info:
                await conn.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"

            # Events: subscribed before the command that triggers them.
            with conn.subscribe("STOP", "RESUME") as events:
                await conn.execute("stop")
                stop = await events.next(5, "STOP")
                await conn.execute("cont")
                resume = await events.next(5, "RESUME")
            assert (stop["event"], resume["event"]) == ("STOP", "RESUME")
            with conn.subscribe("NO_SUCH_EVENT") as never, pytest.raises(QMPTimeout):
                await never.next(0.2, "an event that never comes")

            # fd passing: getfd (fd: URIs) and add-fd (fdsets).
            read_end, write_end = os.pipe()
            try:
                await conn.pass_fd(write_end, "forgeqmp-test")
                await conn.execute("closefd", {"fdname": "forgeqmp-test"})
                fdset_id, qemu_fd = await conn.add_fd(read_end, opaque="forgeqmp-test")
                fdsets = await conn.execute("query-fdsets")
                ours = [s for s in fdsets if s["fdset-id"] == fdset_id]
                assert ours
                assert ours[0]["fds"][0]["fd"] == qemu_fd
                assert ours[0]["fds"][0]["opaque"] == "forgeqmp-test"
                await conn.execute("remove-fd", {"fdset-id": fdset_id})
            finally:
                os.close(read_end)
                os.close(write_end)

            # The feature probe: asked of QEMU, not derived from the version.
            features = await probe(conn)
            assert f"{features.version.major}.{features.version.minor}" == qemu_build.name
            assert features.fd_transport
            assert features.pause_before_switchover
            assert features.mapped_ram == (features.version.major >= 10)
            assert features.file_transport == (features.version.major >= 10)

            # The process behind the socket.
            assert conn.peer.pid == qemu_instance.pid
            process = describe_process(conn.peer.pid)
            assert list(process.argv) == list(qemu_instance.argv)

    run(main)


def test_a_command_qemu_does_not_answer_ends_at_its_own_deadline(qemu_instance) -> None:  # type: ignore[no-untyped-def]
    """QEMU stopped (SIGSTOP) does not answer: each command in flight ends at its own
    deadline with QMPTimeout (one after the other), the one with a later deadline still waits, a cancellation from outside stays a
    cancellation, and once QEMU runs again the waiting command gets its answer and the
    connection serves the next."""
    pid = qemu_instance.pid

    async def main() -> None:
        async with connect(qemu_instance.qmp_socket) as conn:
            await conn.execute("query-status")
            outcome: dict[str, Any] = {}
            later_done = anyio.Event()

            async def slow() -> None:
                outcome["slow"] = await conn.execute("query-name", timeout=60)

            async def later() -> None:
                with pytest.raises(QMPTimeout, match=r"'query-uuid' within 0\.6 s"):
                    await conn.execute("query-uuid", timeout=0.6)
                outcome["later"] = "timed out"
                later_done.set()

            os.kill(pid, signal.SIGSTOP)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(slow)
                    tg.start_soon(later)
                    with pytest.raises(QMPTimeout, match=r"'query-status' within 0\.3 s"):
                        await conn.execute("query-status", timeout=0.3)
                    assert "slow" not in outcome  # its deadline is a minute away
                    with anyio.fail_after(10):  # the next deadline, after the first passed
                        await later_done.wait()
                    with anyio.move_on_after(0.2) as scope:
                        await conn.execute("query-kvm", timeout=60)
                    assert scope.cancelled_caught  # the caller's cancellation, not a timeout
                    assert "slow" not in outcome
                    os.kill(pid, signal.SIGCONT)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert outcome["slow"] == {}  # query-name of an unnamed VM
            assert (await conn.execute("query-status"))["status"] == "running"

    run(main)


def test_disconnect_is_typed_and_waits_end(qemu_factory) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory()

    async def main() -> None:
        async with connect(vm.qmp_socket) as conn:
            with conn.subscribe("NO_SUCH_EVENT") as never:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(vm_kill, vm)
                    # Ended by the disconnect (QMPDisconnected), not by its own 60 s deadline
                    # (that would raise QMPTimeout): no wall-clock limit needed to tell.
                    with pytest.raises(QMPDisconnected):
                        await never.next(60, "an event")
            with pytest.raises(QMPDisconnected):
                await conn.execute("query-status")

    async def vm_kill(instance) -> None:  # type: ignore[no-untyped-def]
        await anyio.sleep(0.2)
        await anyio.to_thread.run_sync(instance.stop)

    run(main)


def test_concurrent_commands_and_fd_passes_keep_every_fd_in_its_place(
    qemu_instance, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Commands from many tasks are pipelined while fds are passed: each add-fd gets exactly the
    file passed with it (checked in QEMU's own fd table while QEMU holds it), and every command
    gets its own answer."""
    socket = qemu_instance.qmp_socket
    qemu_fds = f"/proc/{qemu_instance.pid}/fd"
    answers: list[str] = []
    placed: dict[str, str] = {}

    async def main() -> None:
        async with connect(socket) as conn:

            async def chatter() -> None:
                for _ in range(30):
                    answers.append((await conn.execute("query-status"))["status"])

            async def pass_one(i: int) -> None:
                path = tmp_path / f"fd-{i}"
                path.write_bytes(b"")
                fd = os.open(path, os.O_RDONLY)
                try:
                    fdset_id, qemu_fd = await conn.add_fd(fd, opaque=f"forgeqmp-test-{i}")
                finally:
                    os.close(fd)
                placed[str(path)] = os.readlink(f"{qemu_fds}/{qemu_fd}")
                await conn.execute("remove-fd", {"fdset-id": fdset_id})

            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(chatter)
                    tg.start_soon(pass_one, i)

    run(main)
    assert answers == ["running"] * (30 * 6)
    assert len(placed) == 6
    assert all(target == path for path, target in placed.items()), placed
