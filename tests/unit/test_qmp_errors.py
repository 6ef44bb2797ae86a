"""Every way of not reaching QEMU maps to a typed error with the CLI's exit code 5, quickly.

The peers here are tiny local socket servers (no QEMU): a missing path, a regular file, a socket
nobody listens on, a listener that never greets, one that speaks garbage, one that hangs up."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from forgeqmp.adapters.qmp import QMPConnection
from forgeqmp.errors import NotQMP, QEMUUnreachable


@contextlib.contextmanager
def serve(path: Path, handler: Callable[[socket.socket], None]) -> Iterator[None]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    stop = threading.Event()
    clients: list[socket.socket] = []

    def run() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            clients.append(client)
            handler(client)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)
        for c in clients:
            c.close()
        server.close()


async def attempt(path: Path, timeout: float = 1.0) -> Exception:
    conn = QMPConnection(path)
    with pytest.raises(QEMUUnreachable) as info:
        await conn.connect(timeout)
    assert info.value.exit_code == 5
    assert str(path) in str(info.value)
    assert not conn.connected
    return info.value


def test_missing_socket(tmp_path: Path) -> None:
    async def main() -> None:
        err = await attempt(tmp_path / "nope.sock")
        assert "no such file" in str(err)

    anyio.run(main)


def test_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("hello")

    async def main() -> None:
        err = await attempt(path)
        assert "not a unix socket" in str(err)

    anyio.run(main)


def test_socket_nobody_listens_on(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, never listening: connection refused
    try:

        async def main() -> None:
            err = await attempt(path)
            assert not isinstance(err, NotQMP)

        anyio.run(main)
    finally:
        s.close()


def test_silent_peer_times_out(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with serve(path, lambda c: None):

        async def main() -> None:
            with anyio.fail_after(5):  # the connect deadline, not this one, must end it
                err = await attempt(path, timeout=0.5)
            assert "no QMP greeting" in str(err)

        anyio.run(main)


def test_garbage_speaking_peer_is_not_qmp(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sock"
    with serve(path, lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n{not json\n")):

        async def main() -> None:
            err = await attempt(path)
            assert isinstance(err, NotQMP)

        anyio.run(main)


def test_peer_that_hangs_up_is_not_qmp(tmp_path: Path) -> None:
    path = tmp_path / "hangup.sock"
    with serve(path, lambda c: c.close()):

        async def main() -> None:
            err = await attempt(path)
            assert isinstance(err, NotQMP)

        anyio.run(main)


def test_bad_command_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="command_timeout"):
        QMPConnection("/x", command_timeout=0)
