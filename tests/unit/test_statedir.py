"""The state dir: default location, permissions, symlink and O_EXCL refusal, atomic writes, lock."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forgeqmp.adapters.statedir import (
    LOCK_FILE,
    STATE_HOME_ENV,
    InstanceLock,
    StateDir,
    default_state_dir,
)
from forgeqmp.errors import InstanceLocked, InvalidArgument, RecordError


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def entries(path: Path) -> set[str]:
    return set(os.listdir(path))


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(old)


@pytest.fixture
def sd(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "state")
    state.ensure()
    return state


# --- default_state_dir ---------------------------------------------------------------------------


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "statehome"
    monkeypatch.setenv(STATE_HOME_ENV, str(home))
    return home


def test_default_state_dir_is_stable_for_one_socket(state_home: Path) -> None:
    first = default_state_dir("/run/vms/web1/qmp.sock")
    assert first == default_state_dir("/run/vms/web1/qmp.sock")
    assert first == default_state_dir(Path("/run/vms/web1/qmp.sock"))
    assert first.parent == state_home
    assert first.name.startswith("web1-qmp.sock-")


def test_default_state_dir_differs_between_sockets(state_home: Path) -> None:
    sockets = [
        "/run/vms/web1/qmp.sock",
        "/run/vms/web2/qmp.sock",
        "/run/vms/web1/qmp2.sock",
        "/srv/vms/web1/qmp.sock",  # same label as the first: only the hash tells them apart
        "/run/vms/web1/qmp sock",
        "/run/vms/web1/qmp_sock",  # sanitizes to the same label as the one above
    ]
    dirs = {default_state_dir(s) for s in sockets}
    assert len(dirs) == len(sockets)


def test_default_state_dir_normalizes_lexically(
    state_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = default_state_dir(tmp_path / "vm" / "qmp.sock")
    assert default_state_dir(f"{tmp_path}//vm/./qmp.sock") == expected
    assert default_state_dir(f"{tmp_path}/other/../vm/qmp.sock") == expected
    monkeypatch.chdir(tmp_path)
    assert default_state_dir("vm/qmp.sock") == expected


def test_default_state_dir_resolves_parent_but_not_the_socket(
    state_home: Path, tmp_path: Path
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    (real / "qmp.sock").touch()
    (real / "link.sock").symlink_to(real / "qmp.sock")
    # the same socket through a symlinked directory: one instance, one lock
    assert default_state_dir(tmp_path / "alias" / "qmp.sock") == default_state_dir(
        real / "qmp.sock"
    )
    # a symlinked final component is another name: never merged with its target
    assert default_state_dir(real / "link.sock") != default_state_dir(real / "qmp.sock")


def test_default_state_dir_label_is_sanitized(state_home: Path) -> None:
    name = default_state_dir("/x/..hidden dir/$(rm -rf)\n.sock").name
    assert name[0] not in ".-"
    assert all(c.isalnum() or c in "._-" for c in name)
    long = default_state_dir("/x/" + "a" * 300 + "/" + "b" * 200).name
    assert len(long) <= 48 + 1 + 16
    assert default_state_dir("/qmp.sock").name.startswith("qmp.sock-")
    assert default_state_dir("/run/...").name.startswith("run-")
    assert default_state_dir("/...").name.startswith("qmp-")


def test_default_state_dir_base_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = "/run/vm/qmp.sock"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(STATE_HOME_ENV, raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_state_dir(sock).parent == tmp_path / "home" / ".local" / "state" / "forgeqmp"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
    assert default_state_dir(sock).parent == tmp_path / "home" / ".local" / "state" / "forgeqmp"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir(sock).parent == tmp_path / "xdg" / "forgeqmp"
    monkeypatch.setenv(STATE_HOME_ENV, str(tmp_path / "fq"))
    assert default_state_dir(sock).parent == tmp_path / "fq"
    monkeypatch.setenv(STATE_HOME_ENV, "")
    assert default_state_dir(sock).parent == tmp_path / "xdg" / "forgeqmp"


def test_default_state_dir_creates_nothing(state_home: Path) -> None:
    default_state_dir("/run/vm/qmp.sock")
    assert not state_home.exists()


@pytest.mark.parametrize("bad", ["", "/", "a\0b"])
def test_default_state_dir_refuses_non_socket_paths(state_home: Path, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        default_state_dir(bad)


# --- ensure --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o000, 0o277])
def test_ensure_creates_dir_and_parents_0700(
    tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    path = tmp_path / "a" / "b" / "state"
    umask(mask)
    StateDir(path).ensure()
    for created in (path, path.parent, path.parent.parent):
        assert created.is_dir()
        assert mode_of(created) == 0o700


def test_ensure_is_idempotent_and_keeps_an_existing_safe_dir(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    (path / "keep").write_bytes(b"x")
    StateDir(path).ensure()
    StateDir(path).ensure()
    assert (path / "keep").read_bytes() == b"x"


def test_ensure_does_not_touch_existing_parents(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    StateDir(tmp_path / "state").ensure()
    assert mode_of(tmp_path) == 0o755


def test_ensure_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    with pytest.raises(RecordError, match="symlink"):
        StateDir(link).ensure()


def test_ensure_refuses_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "state"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RecordError, match="symlink"):
        StateDir(link).ensure()
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777, 0o720])
def test_ensure_refuses_group_or_other_writable(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(RecordError, match="chmod 700"):
        StateDir(path).ensure()


def test_ensure_accepts_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(0o755)
    StateDir(path).ensure()  # files inside are 0600; only writability matters for safety
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # accepted as it is, not "fixed"


def test_ensure_refuses_dir_of_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(RecordError, match="owned by uid"):
        StateDir(path).ensure()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_ensure_refuses_dir_chowned_to_another_user(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(RecordError, match="owned by uid 65534"):
        StateDir(path).ensure()


def test_ensure_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"")
    with pytest.raises(RecordError, match="not a directory"):
        StateDir(path).ensure()


def test_path_is_absolute_not_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert StateDir("state").path == tmp_path / "state"
    assert StateDir("state") == StateDir(tmp_path / "state")


# --- operations refuse an unsafe directory -------------------------------------------------------

OPERATIONS: dict[str, Callable[[StateDir], object]] = {
    "ensure": lambda s: s.ensure(),
    "create_private_file": lambda s: s.create_private_file("memory"),
    "open_private_file": lambda s: s.open_private_file("present"),
    "atomic_write": lambda s: s.atomic_write("session.json", b"{}"),
    "read": lambda s: s.read("present"),
    "remove": lambda s: s.remove("present"),
    "move": lambda s: s.move("present", "moved"),
    "fsync_dir": lambda s: s.fsync_dir(),
    "lock": lambda s: InstanceLock(s).acquire(),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_every_operation_refuses_a_symlinked_state_dir(tmp_path: Path, operation: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (real / "present").write_bytes(b"secret")
    (tmp_path / "state").symlink_to(real)
    before = entries(real)
    with pytest.raises(RecordError, match="symlink"):
        OPERATIONS[operation](StateDir(tmp_path / "state"))
    assert entries(real) == before
    assert (real / "present").read_bytes() == b"secret"


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_every_operation_refuses_a_writable_state_dir(tmp_path: Path, operation: str) -> None:
    path = tmp_path / "state"
    path.mkdir()
    (path / "present").write_bytes(b"secret")
    path.chmod(0o777)
    with pytest.raises(RecordError, match="writable by group or others"):
        OPERATIONS[operation](StateDir(path))
    assert entries(path) == {"present"}


@pytest.mark.parametrize(
    "operation", ["create_private_file", "open_private_file", "atomic_write", "move", "fsync_dir"]
)
def test_operations_on_a_missing_dir_fail_clearly(tmp_path: Path, operation: str) -> None:
    with pytest.raises(RecordError, match="does not exist"):
        OPERATIONS[operation](StateDir(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()


def test_read_and_remove_on_a_missing_dir_find_nothing(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "missing")
    assert state.read("session.json") is None
    assert state.remove("session.json") is False
    assert not (tmp_path / "missing").exists()


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "sub/file", "/etc/passwd", "a\0b"])
def test_names_outside_the_dir_are_refused(sd: StateDir, name: str) -> None:
    for call in (
        lambda: sd.create_private_file(name),
        lambda: sd.atomic_write(name, b"x"),
        lambda: sd.read(name),
        lambda: sd.remove(name),
        lambda: sd.path_of(name),
    ):
        with pytest.raises(RecordError):
            call()
    assert entries(sd.path) == set()


def test_absolute_path_inside_the_dir_is_accepted(sd: StateDir) -> None:
    path = sd.path_of("memory")
    assert path == sd.path / "memory"
    os.close(sd.create_private_file(path))
    assert sd.read(str(path)) == b""
    assert sd.remove(path) is True


# --- create_private_file -------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_create_private_file_is_0600_rdwr_cloexec(
    sd: StateDir, umask: Callable[[int], None], mask: int
) -> None:
    umask(mask)
    fd = sd.create_private_file("memory")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        os.write(fd, b"guest ram")
        assert os.pread(fd, 100, 0) == b"guest ram"
    finally:
        os.close(fd)
    assert mode_of(sd.path / "memory") == 0o600


def test_create_private_file_refuses_an_existing_file(sd: StateDir) -> None:
    (sd.path / "memory").write_bytes(b"old")
    with pytest.raises(RecordError, match="already exists"):
        sd.create_private_file("memory")
    assert (sd.path / "memory").read_bytes() == b"old"


def test_create_private_file_refuses_a_planted_symlink(sd: StateDir, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    (sd.path / "memory").symlink_to(target)
    with pytest.raises(RecordError, match="already exists"):
        sd.create_private_file("memory")
    assert not target.exists()


# --- open_private_file ---------------------------------------------------------------------------


def test_open_private_file_reads_and_writes(sd: StateDir) -> None:
    (sd.path / "memory").write_bytes(b"abc")
    fd = sd.open_private_file("memory")
    try:
        assert os.read(fd, 10) == b"abc"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    fd = sd.open_private_file("memory", writable=True)
    try:
        os.write(fd, b"X")
    finally:
        os.close(fd)
    assert (sd.path / "memory").read_bytes() == b"Xbc"


def test_open_private_file_refuses_symlink_missing_and_fifo(sd: StateDir, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"not yours")
    (sd.path / "link").symlink_to(target)
    os.mkfifo(sd.path / "fifo")
    with pytest.raises(RecordError, match="symlink"):
        sd.open_private_file("link")
    with pytest.raises(RecordError, match="does not exist"):
        sd.open_private_file("missing")
    with pytest.raises(RecordError, match="not a regular file"):
        sd.open_private_file("fifo")


# --- read ----------------------------------------------------------------------------------------


def test_read_returns_content_or_none(sd: StateDir) -> None:
    assert sd.read("session.json") is None
    (sd.path / "session.json").write_bytes(b"x" * 200_000)
    assert sd.read("session.json") == b"x" * 200_000


def test_read_refuses_symlink(sd: StateDir, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(b"{}")
    (sd.path / "session.json").symlink_to(target)
    with pytest.raises(RecordError, match="symlink"):
        sd.read("session.json")


def test_read_refuses_dangling_symlink(sd: StateDir, tmp_path: Path) -> None:
    (sd.path / "session.json").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RecordError, match="symlink"):
        sd.read("session.json")


def test_read_refuses_fifo_without_blocking(sd: StateDir) -> None:
    os.mkfifo(sd.path / "session.json")
    with pytest.raises(RecordError, match="not a regular file"):
        sd.read("session.json")


def test_read_refuses_directory(sd: StateDir) -> None:
    (sd.path / "session.json").mkdir()
    with pytest.raises(RecordError):
        sd.read("session.json")


def test_read_refuses_oversized(sd: StateDir) -> None:
    (sd.path / "session.json").write_bytes(b"x" * 101)
    with pytest.raises(RecordError, match="larger than 100 bytes"):
        sd.read("session.json", limit=100)
    assert sd.read("session.json", limit=101) == b"x" * 101


# --- atomic_write --------------------------------------------------------------------------------


def test_atomic_write_creates_0600_and_leaves_no_temp(
    sd: StateDir, umask: Callable[[int], None]
) -> None:
    umask(0)
    sd.atomic_write("session.json", b"one")
    assert (sd.path / "session.json").read_bytes() == b"one"
    assert mode_of(sd.path / "session.json") == 0o600
    sd.atomic_write("session.json", b"two")
    assert (sd.path / "session.json").read_bytes() == b"two"
    assert entries(sd.path) == {"session.json"}


def test_atomic_write_large_content(sd: StateDir) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    sd.atomic_write("big", data)
    assert (sd.path / "big").read_bytes() == data


def test_atomic_write_keeps_old_content_when_rename_fails(
    sd: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd.atomic_write("session.json", b"old")

    def broken_replace(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(RecordError, match="previous content is unchanged"):
        sd.atomic_write("session.json", b"new")
    assert (sd.path / "session.json").read_bytes() == b"old"
    assert entries(sd.path) == {"session.json"}


def test_atomic_write_keeps_old_content_when_write_fails(
    sd: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd.atomic_write("session.json", b"old")
    real_write = os.write
    calls = []

    def short_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:3]))  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(RecordError, match="No space left"):
        sd.atomic_write("session.json", b"new content")
    monkeypatch.undo()
    assert (sd.path / "session.json").read_bytes() == b"old"
    assert entries(sd.path) == {"session.json"}


def test_atomic_write_handles_short_writes(sd: StateDir, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:2])))
    sd.atomic_write("f", b"hello world")
    monkeypatch.undo()
    assert (sd.path / "f").read_bytes() == b"hello world"


def test_atomic_write_fsyncs_file_and_dir(sd: StateDir, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sd.atomic_write("session.json", b"x")
    assert len(synced) == 2  # the temp file before the rename, the directory after it


def test_atomic_write_replaces_a_planted_symlink_without_following(
    sd: StateDir, tmp_path: Path
) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"untouched")
    (sd.path / "session.json").symlink_to(target)
    sd.atomic_write("session.json", b"record")
    assert target.read_bytes() == b"untouched"
    assert not (sd.path / "session.json").is_symlink()
    assert (sd.path / "session.json").read_bytes() == b"record"


def test_atomic_write_over_a_directory_fails_cleanly(sd: StateDir) -> None:
    (sd.path / "session.json").mkdir()
    with pytest.raises(RecordError):
        sd.atomic_write("session.json", b"x")
    assert entries(sd.path) == {"session.json"}


# --- remove and move -----------------------------------------------------------------------------


def test_remove(sd: StateDir, tmp_path: Path) -> None:
    (sd.path / "memory").write_bytes(b"x")
    assert sd.remove("memory") is True
    assert sd.remove("memory") is False
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    (sd.path / "link").symlink_to(target)
    assert sd.remove("link") is True
    assert target.read_bytes() == b"keep"
    (sd.path / "sub").mkdir()
    with pytest.raises(RecordError):
        sd.remove("sub")
    assert (sd.path / "sub").is_dir()


def test_move_never_replaces(sd: StateDir) -> None:
    sd.atomic_write("a", b"1")
    sd.move("a", "b")
    assert entries(sd.path) == {"b"}
    sd.atomic_write("a", b"2")
    with pytest.raises(RecordError, match="taken by a different file"):
        sd.move("a", "b")
    assert (sd.path / "a").read_bytes() == b"2"
    assert (sd.path / "b").read_bytes() == b"1"
    with pytest.raises(RecordError):
        sd.move("missing", "c")


def test_move_completes_an_interrupted_move(sd: StateDir) -> None:
    sd.atomic_write("a", b"same")
    os.link(sd.path / "a", sd.path / "b")  # crashed between link and unlink
    sd.move("a", "b")
    assert entries(sd.path) == {"b"}
    assert (sd.path / "b").read_bytes() == b"same"


# --- InstanceLock --------------------------------------------------------------------------------


def test_lock_creates_dir_and_0600_file(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0)
    path = tmp_path / "state"
    with InstanceLock(StateDir(path), "forgeqmp enable") as lock:
        assert lock.held
        assert lock.path == path / LOCK_FILE
        assert mode_of(path) == 0o700
        assert mode_of(path / LOCK_FILE) == 0o600
        assert (path / LOCK_FILE).read_text() == f"pid {os.getpid()}: forgeqmp enable\n"
    assert not lock.held
    assert (path / LOCK_FILE).exists()  # never deleted: see the class docstring
    assert (path / LOCK_FILE).read_text() == ""


def test_lock_excludes_a_second_object_in_the_same_process(tmp_path: Path) -> None:
    path = tmp_path / "state"
    first = InstanceLock(path, "first holder")
    second = InstanceLock(StateDir(path), "second")
    with first:
        with pytest.raises(InstanceLocked) as info:
            second.acquire()
        assert not second.held
        assert info.value.holder == f"pid {os.getpid()}: first holder"
        assert info.value.lock_path == str(path / LOCK_FILE)
        assert "first holder" in str(info.value)
        assert info.value.exit_code == 3
        # the failed attempt did not disturb the holder
        assert (path / LOCK_FILE).read_text() == f"pid {os.getpid()}: first holder\n"
    with second, pytest.raises(InstanceLocked):
        first.acquire()


def test_lock_is_not_reentrant(tmp_path: Path) -> None:
    lock = InstanceLock(tmp_path / "state")
    with lock:
        with pytest.raises(InstanceLocked, match="not reentrant"):
            lock.acquire()
        assert lock.held
    lock.release()  # releasing twice is harmless


def test_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    path = tmp_path / "state"
    with pytest.raises(RuntimeError), InstanceLock(path):
        raise RuntimeError("boom")
    with InstanceLock(path):
        pass


def test_lock_in_async_code(tmp_path: Path) -> None:
    path = tmp_path / "state"

    async def main() -> None:
        async with InstanceLock(path, "async holder") as lock:
            assert lock.held
            with pytest.raises(InstanceLocked, match="async holder"):
                async with InstanceLock(path):
                    pass
        with InstanceLock(path):
            pass

    asyncio.run(main())


def test_lock_refuses_a_symlinked_lock_file(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    target = tmp_path / "victim"
    (state.path / LOCK_FILE).symlink_to(target)
    with pytest.raises(RecordError, match="symlink"):
        InstanceLock(state).acquire()
    assert not target.exists()


def test_lock_refuses_a_fifo(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    os.mkfifo(state.path / LOCK_FILE)
    with pytest.raises(RecordError, match="not a regular file"):
        InstanceLock(state).acquire()


def test_lock_fixes_lock_file_mode(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    (state.path / LOCK_FILE).touch(mode=0o644)
    (state.path / LOCK_FILE).chmod(0o644)
    with InstanceLock(state):
        assert mode_of(state.path / LOCK_FILE) == 0o600


def test_lock_holder_text_is_sanitized(tmp_path: Path) -> None:
    path = tmp_path / "state"
    with (
        InstanceLock(path, "multi\nline\x1b[31m  holder"),
        pytest.raises(InstanceLocked) as info,
    ):
        InstanceLock(path).acquire()
    assert info.value.holder is not None
    assert "\n" not in info.value.holder
    assert "\x1b" not in info.value.holder


CHILD = """
import sys
from forgeqmp.adapters.statedir import InstanceLock
lock = InstanceLock(sys.argv[1], "child holder")
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def spawn_holder(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "locked\n"
    return child


def test_lock_held_by_a_child_process_then_freed_by_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "state"
    child = spawn_holder(path)
    try:
        with pytest.raises(InstanceLocked) as info:
            InstanceLock(path).acquire()
        assert info.value.holder == f"pid {child.pid}: child holder"
    finally:
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    with InstanceLock(path, "after the crash") as lock:
        assert lock.held


def test_lock_excludes_a_child_process(tmp_path: Path) -> None:
    path = tmp_path / "state"
    with InstanceLock(path, "parent"):
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert child.returncode == 1
    assert "InstanceLocked" in child.stderr
    assert f"pid {os.getpid()}: parent" in child.stderr


def test_lock_is_not_inherited_by_programs_started_while_held(tmp_path: Path) -> None:
    path = tmp_path / "state"
    lock = InstanceLock(path)
    lock.acquire()
    # QEMU and helpers are started with subprocess; an inherited descriptor would keep the lock
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        close_fds=False,
    )
    try:
        lock.release()
        assert sleeper.poll() is None  # the child still runs, with whatever it inherited
        with InstanceLock(path):  # would raise InstanceLocked if the child held the lock
            pass
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)


#: A writer SIGKILLed between creating its temporary file and renaming it (issue 12 item 4).
_KILLED_WRITER = """
import os, signal, sys
from forgeqmp.adapters.statedir import StateDir
os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
StateDir(sys.argv[1]).atomic_write("session.json", b"new")
"""


def test_remove_temp_files_removes_a_killed_writers_temp_file_and_nothing_else(
    sd: StateDir,
) -> None:
    sd.atomic_write("session.json", b"old")
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(sd.path)], check=False)
    assert done.returncode == -signal.SIGKILL
    left = sorted(n for n in entries(sd.path) if n.endswith(".tmp"))
    assert len(left) == 1, left
    assert left[0].startswith(".session.json."), left
    foreign = [
        ".session.json.0123456789ab.tmp.bak",
        ".session.json.0123456789AB.tmp",
        ".session.json.0123456789a.tmp",
        ".session.json.0123456789abc.tmp",
        ".other.json.0123456789ab.tmp",
        "session.json.0123456789ab.tmp",
        ".session.json.tmp",
    ]
    for name in foreign:
        (sd.path / name).write_bytes(b"not forgeqmp's")
    os.symlink("/etc/passwd", sd.path / ".session.json.aaaaaaaaaaaa.tmp")
    os.mkdir(sd.path / ".session.json.bbbbbbbbbbbb.tmp")
    before = entries(sd.path)

    assert sd.remove_temp_files("session.json") == left
    assert entries(sd.path) == before - set(left)
    assert (sd.path / "session.json").read_bytes() == b"old"
    assert sd.remove_temp_files("session.json") == []  # nothing left to do


def test_remove_temp_files_without_a_state_dir_creates_nothing(tmp_path: Path) -> None:
    missing = StateDir(tmp_path / "missing")
    assert missing.remove_temp_files("session.json") == []
    assert not (tmp_path / "missing").exists()
