"""The instance's private state directory, its lock, and the safe way to touch files in it.

A forge session leaves three kinds of files behind: the session record (which ``recover`` trusts
to reconcile after a crash), the memory file (a copy of guest RAM, that is, the guest's secrets)
and the lock. All three live in one directory per QEMU instance, private to the user running
forgeqmp.

Everything here is paranoid on purpose, because the directory may sit under a path other users can
influence and because a record that lies is worse than no record:

- the directory must be a real directory (not a symlink), owned by us and not writable by group or
  others; every operation re-checks this on a descriptor it then works through (``openat``), so a
  directory swapped after the check is never written into;
- every file is opened with ``O_NOFOLLOW`` (a symlink planted in the directory is refused, never
  followed) and created with ``O_EXCL`` and mode 0600;
- records are replaced atomically (temp file, fsync, rename, fsync of the directory), so a crash
  leaves either the old or the new record, never half of one;
- the lock is an ``flock`` on ``<dir>/lock``: the kernel drops it when the holder dies, however it
  dies, so a crashed forgeqmp never leaves a stale lock behind.

Nothing here knows what a session is; :mod:`forgeqmp.adapters.recordstore` builds on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from forgeqmp.errors import (
    InstanceLocked,
    InvalidArgument,
    RecordError,
    RecordUnreadable,
    UnsafeStateDir,
)

__all__ = [
    "LOCK_FILE",
    "STATE_HOME_ENV",
    "InstanceLock",
    "StateDir",
    "default_state_dir",
]

#: Environment variable that overrides the base directory of the default state dirs.
STATE_HOME_ENV = "FORGEQMP_STATE_HOME"

#: Name of the lock file inside a state dir.
LOCK_FILE = "lock"

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_LABEL_MAX = 48
_HASH_CHARS = 16
_DEFAULT_READ_LIMIT = 16 * 1024 * 1024
_HOLDER_MAX = 512
#: Random bytes in the name of an atomic write's temporary file (hex: twice as many characters).
_TEMP_TOKEN_BYTES = 6


def _temp_name(entry: str) -> str:
    """The name :meth:`StateDir.atomic_write` gives its temporary file for ``entry``."""
    return f".{entry[:200]}.{secrets.token_hex(_TEMP_TOKEN_BYTES)}.tmp"


def _is_temp_of(name: str, entry: str) -> bool:
    """``name`` is exactly what :func:`_temp_name` makes for ``entry`` (and nothing else)."""
    pattern = re.escape(f".{entry[:200]}.") + f"[0-9a-f]{{{2 * _TEMP_TOKEN_BYTES}}}" + r"\.tmp"
    return re.fullmatch(pattern, name) is not None


def default_state_dir(qmp_socket: str | os.PathLike[str]) -> Path:
    """Return the default state dir of the QEMU instance whose QMP socket is ``qmp_socket``.

    The state dir is derived from the socket path, so that every instance gets its own directory
    (and its own lock) without configuration, and the same instance always gets the same one:

    ``<base>/<label>-<hash>``

    - ``<base>`` is ``$FORGEQMP_STATE_HOME`` if that is set and not empty (a relative value is
      taken relative to the current directory); otherwise ``$XDG_STATE_HOME/forgeqmp`` if
      ``XDG_STATE_HOME`` is set to an absolute path (the XDG spec says to ignore a relative one);
      otherwise ``~/.local/state/forgeqmp``.
    - The socket path is first made absolute (relative to the current directory) and normalized
      lexically (``//``, ``.`` and ``..`` collapsed). Its *parent directory* is then resolved
      through symlinks, so ``/var/run/vm1/qmp.sock`` and ``/run/vm1/qmp.sock`` (with
      ``/var/run -> /run``) name the same instance. The *final component* is never resolved: a
      symlink to a socket is another name, and two different directory entries can never map to
      the same state dir.
    - ``<hash>`` is the first 16 hex digits of the SHA-256 of that path (its bytes, as the OS sees
      them). It is what keeps instances apart.
    - ``<label>`` is there for humans only: the parent directory's name and the socket's name
      joined by ``-`` (``vm1-qmp.sock``), every character other than ``A-Z a-z 0-9 . _ -``
      replaced by ``_``, leading dots and dashes dropped, cut to 48 characters.

    The derivation only reads the environment and the symlinks of the socket's parent directory;
    it creates nothing (use :meth:`StateDir.ensure`). If the directory layout changes (a parent
    directory becomes a symlink to elsewhere), pass the old state dir explicitly with
    ``--state-dir``.

    Raises:
        InvalidArgument: the socket path is empty or not a path to a file, or there is no home
            directory to put the state under (then set ``FORGEQMP_STATE_HOME`` or pass
            ``--state-dir``).
    """
    raw = os.fspath(qmp_socket)
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise InvalidArgument(
            f"invalid QMP socket path {raw!r}: give the path of QEMU's QMP socket"
        )
    absolute = os.path.abspath(raw)
    parent, name = os.path.split(absolute)
    if not name:
        raise InvalidArgument(
            f"invalid QMP socket path {raw!r}: it names a directory, not a socket"
        )
    canonical = os.path.join(os.path.realpath(parent), name)
    digest = hashlib.sha256(os.fsencode(canonical)).hexdigest()[:_HASH_CHARS]
    parent_name = os.path.basename(os.path.dirname(canonical))
    label = f"{parent_name}-{name}" if parent_name else name
    label = re.sub(r"[^A-Za-z0-9._-]", "_", label).lstrip(".-")[:_LABEL_MAX] or "qmp"
    return _state_home() / f"{label}-{digest}"


def _state_home() -> Path:
    """The base directory of the default state dirs (see :func:`default_state_dir`)."""
    override = os.environ.get(STATE_HOME_ENV)
    if override:
        return Path(os.path.abspath(override))
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(os.path.normpath(xdg)) / "forgeqmp"
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        raise InvalidArgument(
            f"cannot find your home directory to keep forgeqmp's state in; set {STATE_HOME_ENV} "
            "or pass --state-dir"
        )
    return Path(home) / ".local" / "state" / "forgeqmp"


class StateDir:
    """One instance's private directory: where the session record, memory file and lock live.

    Construct it with the directory's path (made absolute, not resolved); nothing touches the
    file system until a method is called. Call :meth:`ensure` once before writing. Every method
    re-checks the directory (a real directory, ours, not writable by group or others) and works
    through a descriptor of the checked directory, so it is safe against a directory swapped
    underneath.

    File names given to methods are plain names of entries directly in the directory (``"lock"``,
    ``"session.json"``); an absolute path is accepted when its parent is this directory (what
    :meth:`path_of` returns). Anything else (``..``, subdirectories, another directory) is refused
    with :class:`~forgeqmp.errors.RecordError`.

    All failures are :class:`~forgeqmp.errors.RecordError` with a message saying what to fix; the
    checks that refuse an unsafe directory or file are :class:`~forgeqmp.errors.UnsafeStateDir`,
    an unreadable file :class:`~forgeqmp.errors.RecordUnreadable` (both exit 3: nothing changed).
    """

    __slots__ = ("_path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        raw = os.fspath(path)
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise InvalidArgument(f"invalid state dir path {raw!r}")
        self._path = Path(os.path.abspath(raw))

    @property
    def path(self) -> Path:
        """The absolute path of the directory."""
        return self._path

    def __repr__(self) -> str:
        return f"StateDir({str(self._path)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StateDir):
            return NotImplemented
        return self._path == other._path

    def __hash__(self) -> int:
        return hash(self._path)

    def path_of(self, name: str | os.PathLike[str]) -> Path:
        """The absolute path of entry ``name`` in this directory (validated as the methods do)."""
        return self._path / self._entry(name)

    # --- the directory itself -------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the directory (and missing parents) with mode 0700, then check it is safe.

        An existing directory is kept as it is, but refused if it is a symlink, is owned by another
        user, or is writable by group or others: forgeqmp keeps guest memory there.
        """
        missing: list[Path] = []
        probe = self._path
        while not os.path.lexists(probe):
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory, _DIR_MODE)
            except FileExistsError:
                continue  # created concurrently: the checks below decide whether it is usable
            except OSError as exc:
                raise UnsafeStateDir(
                    f"cannot create the state dir {directory}: {exc.strerror}; create it yourself "
                    f"(mkdir -m 700) or choose another --state-dir"
                ) from exc
            self._fix_new_dir(directory)
        os.close(self._open_dir())

    def _fix_new_dir(self, directory: Path) -> None:
        """Give a directory we just created exactly mode 0700 (the umask may have removed bits)."""
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise UnsafeStateDir(
                f"the state dir {directory} changed while it was being created ({exc.strerror}); "
                "check who else writes there, or choose another --state-dir"
            ) from exc
        try:
            os.fchmod(fd, _DIR_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # durability of the new entry; not a safety check
            parent_fd = os.open(directory.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(parent_fd)
            finally:
                os.close(parent_fd)

    def _open_dir(self) -> int:
        """Open the directory, refusing anything unsafe; FileNotFoundError if it is missing."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(self._path):
                raise UnsafeStateDir(
                    f"the state dir {self._path} is a symlink; forgeqmp does not follow it: point "
                    "--state-dir at the real directory, or remove the link"
                ) from exc
            if exc.errno == errno.ENOTDIR:
                raise UnsafeStateDir(
                    f"the state dir {self._path} is not a directory: move it away or choose "
                    "another --state-dir"
                ) from exc
            raise UnsafeStateDir(
                f"cannot open the state dir {self._path}: {exc.strerror}; check its permissions "
                "or choose another --state-dir"
            ) from exc
        try:
            self._check_dir(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_dir(self, st: os.stat_result) -> None:
        if not stat.S_ISDIR(st.st_mode):  # pragma: no cover - O_DIRECTORY guarantees it
            raise UnsafeStateDir(f"the state dir {self._path} is not a directory")
        uid = os.geteuid()
        if st.st_uid != uid:
            raise UnsafeStateDir(
                f"the state dir {self._path} is owned by uid {st.st_uid}, not by you (uid {uid}); "
                "it holds guest memory, so it must be yours: chown it, or choose another "
                "--state-dir"
            )
        if st.st_mode & 0o022:
            mode = stat.S_IMODE(st.st_mode)
            raise UnsafeStateDir(
                f"the state dir {self._path} is writable by group or others (mode {mode:04o}); it "
                f"holds guest memory: run 'chmod 700 {self._path}', or choose another --state-dir"
            )

    @contextlib.contextmanager
    def _dir_fd(self) -> Iterator[int]:
        """A checked descriptor of the directory; a missing directory is a RecordError."""
        try:
            fd = self._open_dir()
        except FileNotFoundError as exc:
            raise RecordError(
                f"the state dir {self._path} does not exist; nothing was done (it is created by "
                "'forgeqmp enable', or by StateDir.ensure())"
            ) from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def fsync_dir(self) -> None:
        """Flush the directory itself, so created, renamed and removed entries survive a crash."""
        with self._dir_fd() as dfd:
            try:
                os.fsync(dfd)
            except OSError as exc:
                raise RecordError(
                    f"cannot flush the state dir {self._path}: {exc.strerror}; check the file "
                    "system (full, read-only, failing?)"
                ) from exc

    # --- files ----------------------------------------------------------------------------------

    def _entry(self, name: str | os.PathLike[str]) -> str:
        """Validate ``name`` as an entry directly in this directory and return its plain name."""
        raw = os.fspath(name)
        if not isinstance(raw, str):
            raise RecordError(f"invalid file name {raw!r} in the state dir {self._path}")
        if "/" in raw:
            absolute = os.path.abspath(raw)
            if os.path.dirname(absolute) != str(self._path):
                raise RecordError(
                    f"{raw!r} is not a file directly inside the state dir {self._path}; "
                    "forgeqmp only touches its own files there"
                )
            raw = os.path.basename(absolute)
        if raw in ("", ".", "..") or "\0" in raw:
            raise RecordError(f"invalid file name {raw!r} in the state dir {self._path}")
        return raw

    def create_private_file(self, name: str | os.PathLike[str]) -> int:
        """Create a new file with mode 0600 and return its descriptor (read-write, close-on-exec).

        It must not exist yet (``O_EXCL``), so a file or symlink left by someone else is never
        reused or followed. Memory files are created this way: they hold guest RAM, i.e. secrets.
        The caller owns the descriptor, and fsyncs it and :meth:`fsync_dir` when the content
        must be durable.
        """
        entry = self._entry(name)
        with self._dir_fd() as dfd:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(entry, flags, _FILE_MODE, dir_fd=dfd)
            except FileExistsError as exc:
                raise RecordError(
                    f"{self._path / entry} already exists; forgeqmp never reuses a file it did "
                    "not just create: if a previous session left it, run 'forgeqmp recover', or "
                    "check it and remove it"
                ) from exc
            except OSError as exc:
                raise RecordError(
                    f"cannot create {self._path / entry}: {exc.strerror}; check the file system "
                    "(full, read-only?)"
                ) from exc
            try:
                os.fchmod(fd, _FILE_MODE)  # exactly 0600, whatever the umask removed
            except BaseException:
                os.close(fd)
                raise
            return fd

    def open_private_file(self, name: str | os.PathLike[str], *, writable: bool = False) -> int:
        """Open an existing regular file of this directory and return its descriptor.

        Refuses a symlink, a non-regular file (FIFO, device...) and a missing file, all with
        :class:`~forgeqmp.errors.RecordError`. The descriptor is close-on-exec and blocking; the
        caller owns it (for example to hand the memory file to QEMU on discard).
        """
        entry = self._entry(name)
        with self._dir_fd() as dfd:
            access = os.O_RDWR if writable else os.O_RDONLY
            fd = self._open_existing(dfd, entry, access)
            if fd is None:
                raise RecordError(
                    f"{self._path / entry} does not exist; it was removed or never written"
                )
            return fd

    def _open_existing(self, dfd: int, entry: str, access: int) -> int | None:
        """Open a regular file without following symlinks or blocking on FIFOs; None if missing."""
        flags = access | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = os.open(entry, flags, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeStateDir(
                    f"{self._path / entry} is a symlink; forgeqmp does not follow links in its "
                    "state dir: someone else put it there, check and remove it"
                ) from exc
            raise RecordUnreadable(f"cannot open {self._path / entry}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafeStateDir(
                    f"{self._path / entry} is not a regular file; forgeqmp did not create it: "
                    "check and remove it"
                )
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(
        self, name: str | os.PathLike[str], *, limit: int = _DEFAULT_READ_LIMIT
    ) -> bytes | None:
        """Return the content of a small file here, or None if it (or the directory) is missing.

        Symlinks and non-regular files are refused; so is a file larger than ``limit`` bytes
        (this is for records, not memory files).
        """
        entry = self._entry(name)
        try:
            dfd = self._open_dir()
        except FileNotFoundError:
            return None
        try:
            fd = self._open_existing(dfd, entry, os.O_RDONLY)
        finally:
            os.close(dfd)
        if fd is None:
            return None
        try:
            chunks: list[bytes] = []
            total = 0
            while chunk := os.read(fd, 1 << 16):
                total += len(chunk)
                if total > limit:
                    raise RecordUnreadable(
                        f"{self._path / entry} is larger than {limit} bytes; it is not a file "
                        "forgeqmp wrote: check it and move it away"
                    )
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise RecordUnreadable(f"cannot read {self._path / entry}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def atomic_write(self, name: str | os.PathLike[str], data: bytes) -> None:
        """Replace file ``name`` with ``data`` atomically and durably.

        Writes a temporary file (``O_EXCL``, 0600) in the same directory, fsyncs it, renames it over
        ``name`` and fsyncs the directory. After a crash at any point, ``name`` holds either its old
        or its new content, never a mix; on an error the temporary file is removed and ``name`` is
        untouched (RecordError).
        """
        entry = self._entry(name)
        with self._dir_fd() as dfd:
            tmp = _temp_name(entry)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, _FILE_MODE, dir_fd=dfd)
            except OSError as exc:
                raise RecordError(
                    f"cannot write {self._path / entry}: creating a temporary file failed "
                    f"({exc.strerror}); check the file system (full, read-only?)"
                ) from exc
            try:
                try:
                    os.fchmod(fd, _FILE_MODE)
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, entry, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                if isinstance(exc, OSError):
                    raise RecordError(
                        f"cannot write {self._path / entry}: {exc.strerror or exc}; the previous "
                        "content is unchanged; check the file system (full, read-only?)"
                    ) from exc
                raise
            try:
                os.fsync(dfd)
            except OSError as exc:
                raise RecordError(
                    f"wrote {self._path / entry} but could not flush the state dir "
                    f"({exc.strerror}); check the file system"
                ) from exc

    def remove_temp_files(self, name: str | os.PathLike[str]) -> list[str]:
        """Remove the temporary files :meth:`atomic_write` left for ``name`` when its process
        was killed between creating and renaming one; returns the names removed.

        Only regular files owned by this user whose name is exactly the writer's pattern
        (``.<name>.<12 hex digits>.tmp``) are removed, never anything else. Call it only while
        holding the instance's lock: every writer holds it, so such a file is a dead writer's.
        """
        entry = self._entry(name)
        try:
            dfd = self._open_dir()
        except FileNotFoundError:
            return []
        removed: list[str] = []
        try:
            for candidate in os.listdir(dfd):
                if not _is_temp_of(candidate, entry):
                    continue
                try:
                    st = os.lstat(candidate, dir_fd=dfd)
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                        continue
                    os.unlink(candidate, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise RecordError(
                        f"cannot remove the leftover temporary file {self._path / candidate}: "
                        f"{exc.strerror}; remove it by hand"
                    ) from exc
                removed.append(candidate)
            if removed:
                with contextlib.suppress(OSError):
                    os.fsync(dfd)
        finally:
            os.close(dfd)
        return removed

    def move(self, name: str | os.PathLike[str], new_name: str | os.PathLike[str]) -> None:
        """Rename ``name`` to ``new_name`` without ever replacing an existing ``new_name``.

        Done as link + unlink + fsync of the directory. If ``new_name`` already exists with exactly
        the content of ``name`` (a previous move was interrupted between link and unlink), the move
        is completed by removing ``name``; any other existing ``new_name`` is a RecordError.
        """
        src = self._entry(name)
        dst = self._entry(new_name)
        with self._dir_fd() as dfd:
            try:
                os.link(src, dst, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError as exc:
                if self.read(src) != self.read(dst):
                    raise RecordError(
                        f"cannot move {self._path / src} to {self._path / dst}: that name is "
                        "taken by a different file; check both and move one away"
                    ) from exc
            except OSError as exc:
                raise RecordError(
                    f"cannot move {self._path / src} to {self._path / dst}: {exc.strerror}"
                ) from exc
            try:
                os.unlink(src, dir_fd=dfd)
                os.fsync(dfd)
            except OSError as exc:
                raise RecordError(
                    f"cannot finish moving {self._path / src} to {self._path / dst}: "
                    f"{exc.strerror}; run the operation again"
                ) from exc

    def remove(self, name: str | os.PathLike[str]) -> bool:
        """Remove file ``name`` of this directory (a symlink is removed, not followed).

        Returns False if it did not exist. The directory is fsynced after a removal. Directories
        are never removed.
        """
        entry = self._entry(name)
        try:
            dfd = self._open_dir()
        except FileNotFoundError:
            return False
        try:
            try:
                os.unlink(entry, dir_fd=dfd)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise RecordError(
                    f"cannot remove {self._path / entry}: {exc.strerror}; remove it yourself "
                    "after checking what it is"
                ) from exc
            with contextlib.suppress(OSError):
                os.fsync(dfd)
            return True
        finally:
            os.close(dfd)


class InstanceLock:
    """The instance's lock: one forgeqmp controller at a time per state dir.

    An exclusive, non-blocking ``flock`` on ``<state dir>/lock``. Taking it never waits: if
    anyone else holds it (another process, or another ``InstanceLock`` object in this process,
    since each object opens its own file description), :class:`~forgeqmp.errors.InstanceLocked`
    is raised at once, naming the holder (its pid and description, which the holder writes into
    the file). The kernel releases the lock when the holder's descriptor closes, including when
    the process is killed, so there are no stale locks to clean up. The lock file itself is never
    deleted: deleting it would let two processes lock two different files of the same name.

    Use it as a context manager, ``with`` or ``async with`` (taking it never blocks, so it is safe
    in async code). It is not reentrant. The descriptor is close-on-exec, so QEMU and other
    programs started while it is held do not inherit it; a ``fork()`` without exec does share it.

    Taking the lock first runs :meth:`StateDir.ensure` (creating the state dir if needed).
    """

    def __init__(
        self, state_dir: StateDir | str | os.PathLike[str], description: str = "forgeqmp"
    ) -> None:
        self._state_dir = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
        self._description = " ".join(description.split())[:200]
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        """The lock file's path."""
        return self._state_dir.path / LOCK_FILE

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise :class:`~forgeqmp.errors.InstanceLocked`."""
        if self._fd is not None:
            raise InstanceLocked(
                str(self.path), f"pid {os.getpid()}: this very lock object (it is not reentrant)"
            )
        self._state_dir.ensure()
        fd = self._open_lock_file()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InstanceLocked(str(self.path), self._read_holder(fd)) from None
            except OSError as exc:
                raise UnsafeStateDir(
                    f"cannot lock {self.path}: {exc.strerror}; the state dir must be on a local "
                    "file system that supports flock"
                ) from exc
            holder = f"pid {os.getpid()}: {self._description}\n".encode(errors="replace")
            with contextlib.suppress(OSError):  # informational only; the flock is the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _open_lock_file(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        with self._state_dir._dir_fd() as dfd:
            try:
                fd = os.open(LOCK_FILE, flags, _FILE_MODE, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeStateDir(
                        f"{self.path} is a symlink; forgeqmp does not follow links in its state "
                        "dir: someone else put it there, check and remove it"
                    ) from exc
                raise UnsafeStateDir(f"cannot open the lock {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeStateDir(
                    f"the lock {self.path} is not a regular file; check it and remove it"
                )
            if stat.S_IMODE(st.st_mode) != _FILE_MODE:
                with contextlib.suppress(OSError):  # it only ever holds a pid and a description
                    os.fchmod(fd, _FILE_MODE)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _read_holder(fd: int) -> str | None:
        try:
            raw = os.pread(fd, _HOLDER_MAX, 0)
        except OSError:
            return None
        line = raw.decode("utf-8", errors="replace").partition("\n")[0]
        text = "".join(ch if ch.isprintable() else "?" for ch in line).strip()
        return text or None

    def release(self) -> None:
        """Release the lock (a no-op if this object does not hold it)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no stale holder text for the next reader
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> InstanceLock:
        self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"InstanceLock({str(self.path)!r}, held={self.held})"
