"""The session record on disk: ``session.json`` in the state dir, and the archived records of
finished sessions (``session-<id>.json``), with their retention rule.

The record's values and its JSON are in :mod:`forgeqmp.core.record`; this module reads and writes
them through the state dir (:mod:`forgeqmp.adapters.statedir`), atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from forgeqmp.adapters.statedir import StateDir, default_state_dir
from forgeqmp.core.graphsession import GraphSession, sessions_in_graph
from forgeqmp.core.record import SessionRecord
from forgeqmp.core.states import TERMINAL
from forgeqmp.errors import ForgeError, RecordError, RecordUnreadable, SessionActive

__all__ = ["KEEP_ARCHIVES", "RECORD_FILE", "RecordStore", "find_records"]

#: Name of the current session's record inside the state dir.
RECORD_FILE: Final = "session.json"

#: How many archived records (finished sessions) a state dir keeps; older ones are removed when
#: a session is archived (see :meth:`RecordStore.prune_archives`).
KEEP_ARCHIVES: Final = 20
_ARCHIVE_RE: Final = re.compile(
    r"session-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.json"
)


class RecordStore:
    """The session record of one state dir: ``session.json``, plus archived ``session-<id>.json``.

    Callers hold the instance's :class:`~forgeqmp.adapters.statedir.InstanceLock` while they save or
    archive; loading is safe without it (writes are atomic renames).
    """

    def __init__(self, state_dir: StateDir) -> None:
        self._dir = state_dir

    @property
    def state_dir(self) -> StateDir:
        return self._dir

    @property
    def path(self) -> Path:
        """The path of the current record."""
        return self._dir.path_of(RECORD_FILE)

    @staticmethod
    def archive_name(session_id: str) -> str:
        """The file name a finished session's record is archived under."""
        return f"session-{session_id}.json"

    def load(self) -> SessionRecord | None:
        """The current record, or None if there is none (no file, or no state dir yet)."""
        data = self._dir.read(RECORD_FILE)
        if data is None:
            return None
        try:
            return SessionRecord.from_json(data)
        except RecordError as exc:
            raise RecordUnreadable(f"{self.path}: {exc}") from None

    def save(self, record: SessionRecord, *, force: bool = False) -> None:
        """Write ``record`` as the current record, atomically and durably.

        Refuses (SessionActive) to replace the record of a *different* session, so a new session
        can never overwrite an unfinished one: archive the old one first. A current record that
        cannot be read is a RecordError for the same reason. ``force=True`` skips both checks (for
        ``recover`` rewriting a record by hand-checked decision).
        """
        if not force:
            current = self.load()
            if current is not None and current.session_id != record.session_id:
                raise SessionActive(
                    f"{self.path} holds session {current.session_id} ({current.state.value}); "
                    "commit, discard or recover it first (a finished one is archived by "
                    "RecordStore.archive())"
                )
        self._dir.atomic_write(RECORD_FILE, record.to_json())

    def remove_temp_files(self) -> list[str]:
        """Remove the temporary files a killed write of the record left (see
        :meth:`StateDir.remove_temp_files`); call it holding the instance's lock. Returns the
        names removed."""
        return self._dir.remove_temp_files(RECORD_FILE)

    def archive(self, *, force: bool = False) -> Path | None:
        """Move the current record aside as ``session-<id>.json`` so a new session can start.

        Returns the archive's path, or None if there was no current record. Only a terminal
        (committed or discarded, :data:`forgeqmp.core.states.TERMINAL`) session is archived, else
        SessionActive; ``force=True`` archives any readable record (for a FAILED session whose
        failure was rolled back, which the caller knows from :mod:`forgeqmp.core.states`). An existing
        archive of the same session is never overwritten.
        """
        record = self.load()
        if record is None:
            return None
        if record.state not in TERMINAL and not force:
            raise SessionActive(
                f"session {record.session_id} is {record.state.value}, not finished: commit, "
                "discard or recover it before starting a new one"
            )
        name = self.archive_name(record.session_id)
        self._dir.move(RECORD_FILE, name)
        self.prune_archives()
        return self._dir.path_of(name)

    def archives(self) -> list[Path]:
        """The archived records of this state dir (``session-<uuid>.json``), oldest first (by
        when each was last written: its session's end)."""
        try:
            entries = list(os.scandir(self._dir.path))
        except FileNotFoundError:
            return []
        found = [
            e for e in entries if _ARCHIVE_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False)
        ]
        found.sort(key=lambda e: (e.stat(follow_symlinks=False).st_mtime_ns, e.name))
        return [Path(e.path) for e in found]

    def prune_archives(self, keep: int | None = None) -> list[str]:
        """The retention rule: keep the :data:`KEEP_ARCHIVES` most recently archived records
        (``keep`` to choose), remove older ones; returns the names removed. Called after every
        archive, so a state dir never holds more; the current record, the memory file and any
        file forgeqmp did not name are never touched."""
        limit = KEEP_ARCHIVES if keep is None else keep
        if limit < 0:
            raise ValueError("keep must be 0 or more")
        old = self.archives()
        old = old[: max(0, len(old) - limit)]
        for path in old:
            self._dir.remove(path.name)
        return [p.name for p in old]


def find_records(tag: str, state_dirs: Sequence[Path], base: Path | None) -> tuple[str, ...]:
    """The ``session.json`` files of session ``tag`` in ``state_dirs`` and in every directory
    directly under ``base`` (the default state-dir base). Unreadable ones are skipped."""
    candidates = list(state_dirs)
    if base is not None:
        with contextlib.suppress(OSError):
            candidates += sorted(p for p in base.iterdir() if p.is_dir())
    found: list[str] = []
    for directory in candidates:
        path = directory / RECORD_FILE
        try:
            record = SessionRecord.from_json(path.read_bytes())
        except (OSError, ForgeError):
            continue
        if record.session_id.replace("-", "").startswith(tag) and str(path) not in found:
            found.append(str(path))
    return tuple(found)


def graph_sessions(
    nodes: Iterable[Mapping[str, Any]], state_dir: Path, qmp_socket: str
) -> tuple[GraphSession, ...]:
    """The forge sessions ``query-named-block-nodes`` shows (whatever state dir enabled them),
    each with the records of it found on this host: in ``state_dir`` and under the default
    state-dir base of ``qmp_socket`` (see :mod:`forgeqmp.core.graphsession`)."""
    try:
        base: Path | None = default_state_dir(qmp_socket).parent
    except ForgeError:
        base = None
    return tuple(
        attrs.evolve(s, records=find_records(s.tag, [state_dir], base))
        for s in sessions_in_graph(nodes)
    )
