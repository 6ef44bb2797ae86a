"""The session record: what a forge session did so far, as strictly validated values and JSON.

The record is written (atomically, see :class:`~forgeqmp.adapters.recordstore.RecordStore`) before every irreversible step, so that
after a crash ``forgeqmp recover`` knows which disks have overlays, which were already merged, where
the memory file is and how to relaunch QEMU on it. Because ``recover`` acts on it, a record is
either entirely valid or refused: :meth:`SessionRecord.from_json` raises
:class:`~forgeqmp.errors.RecordError` on anything malformed (bad JSON, an unknown format version,
a missing, extra or wrongly typed field, a relative path, an unknown state), naming the field and
saying what to do. It never guesses a value.

The values are ``attrs`` frozen classes (keyword-only). Constructing one with a bad value raises
:class:`~forgeqmp.errors.InvalidArgument` naming the field; update one with
:meth:`SessionRecord.evolve` (or ``attrs.evolve``), which validates again. Timestamps must be
timezone-aware and are normalized to UTC. The JSON has a ``format`` field (:data:`FORMAT_VERSION`),
bumped whenever a change would make an older forgeqmp misread a record.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, NoReturn, TypeVar, cast

import attrs

from forgeqmp.core.states import State
from forgeqmp.core.steps import (
    CommitStep,
    DiscardStep,
    EnableStep,
    Pivoting,
    RecoverStep,
    Step,
    parse_step,
)
from forgeqmp.errors import InvalidArgument, RecordUnreadable

__all__ = [
    "ADDED_FIELDS",
    "BASE_FORMATS",
    "DIGEST_ALGORITHMS",
    "FORMAT_VERSION",
    "LEGACY_DIGEST_ALGORITHM",
    "DiskRecord",
    "MemoryRecord",
    "QemuRecord",
    "SessionRecord",
    "new_session_id",
    "no_session_status",
]

#: Version of the JSON layout; a record with another version is refused, never half-understood.
FORMAT_VERSION: Final = 1

#: Image formats forgeqmp can put an overlay on.
BASE_FORMATS: Final = frozenset({"qcow2", "raw"})

_ADVICE: Final = (
    "fix it by hand if you know the right value (the other fields, and 'qemu-img info "
    "--backing-chain' on each disk, tell what the session did), or restore the file from a "
    "backup; failing that, check each disk that way and only then remove the state dir"
)
_DAMAGED: Final = (
    "the file is damaged (forgeqmp replaces it atomically, so it was edited or the storage "
    "failed): repair the JSON by hand or restore the file from a backup; failing that, check "
    "each disk (qemu-img info --backing-chain) and only then remove the state dir"
)
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: The memory file's digest algorithms a record may name, with the length of their hex digest
#: (:mod:`forgeqmp.adapters.memhash` computes them and says exactly what each one hashes).
DIGEST_ALGORITHMS: Final[Mapping[str, int]] = {"xxh3-128": 32, "sha256": 64}
#: The algorithm of records written before the algorithm was recorded (their field ``sha256``).
LEGACY_DIGEST_ALGORITHM: Final = "sha256"


def new_session_id() -> str:
    """A fresh session id (a random UUID in its canonical text form)."""
    return str(uuid.uuid4())


# --- validators: each raises InvalidArgument naming the field ------------------------------------


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(attribute: attrs.Attribute[Any], expected: str, value: object) -> NoReturn:
    raise InvalidArgument(f"{attribute.name} must be {expected}, got {_show(value)}")


_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _text(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        _invalid(attribute, "a string", value)


def _opt_text(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _text(instance, attribute, value)


def _is_name(value: object) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


def _name(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not _is_name(value):
        _invalid(attribute, "a non-empty string", value)


def _opt_name(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _name(instance, attribute, value)


def _opt_options(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (
        isinstance(value, Mapping)
        and all(
            isinstance(k, str) and (v is None or isinstance(v, str | bool))
            for k, v in value.items()
        )
    ):
        _invalid(attribute, "null or an object of strings and booleans", value)


def _opt_throttle(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (
        isinstance(value, Mapping)
        and all(
            isinstance(k, str)
            and (
                isinstance(v, str)
                if k == "group"
                else isinstance(v, int) and not isinstance(v, bool) and v >= 0
            )
            for k, v in value.items()
        )
    ):
        _invalid(attribute, "null or an object of non-negative integers (and a group name)", value)


def _abs_path(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not (_is_name(value) and os.path.isabs(cast(str, value))):
        _invalid(attribute, "an absolute path", value)


def _opt_abs_path(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _abs_path(instance, attribute, value)


def _int_at_least(minimum: int, *, optional: bool = False) -> _Validator:
    expected = f"an integer >= {minimum}" + (" or null" if optional else "")

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _invalid(attribute, expected, value)

    return check


def _flag(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        _invalid(attribute, "true or false", value)


def _opt_flag(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _flag(instance, attribute, value)


def _base_format(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not (isinstance(value, str) and value in BASE_FORMATS):
        _invalid(attribute, " or ".join(repr(f) for f in sorted(BASE_FORMATS)), value)


def _digest_algorithm(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not (isinstance(value, str) and value in DIGEST_ALGORITHMS):
        _invalid(attribute, " or ".join(repr(a) for a in DIGEST_ALGORITHMS), value)


def _session_id(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    try:
        canonical = str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        canonical = None
    if canonical is None or canonical != value:
        _invalid(attribute, "a UUID in canonical form (lowercase, with dashes)", value)


def _str_tuple(
    item: Callable[[object], bool], expected: str, *, unique: bool = False
) -> _Validator:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, tuple) or not all(item(v) for v in value):
            _invalid(attribute, f"a list of {expected}", value)
        if unique and len(set(value)) != len(value):
            _invalid(attribute, f"a list of distinct {expected}", value)

    return check


def _env(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, Mapping):
        _invalid(attribute, "an object of environment variables", value)
    for key, val in value.items():
        if not (_is_name(key) and "=" not in key):
            _invalid(attribute, "an object whose keys are variable names (no '=', not empty)", key)
        if not isinstance(val, str) or "\0" in val:
            _invalid(attribute, "an object whose values are strings", val)


def _utc(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not (isinstance(value, datetime) and value.tzinfo is UTC):
        _invalid(attribute, "a timezone-aware date-time within years 1..9999", value)


def _opt_utc(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _utc(instance, attribute, value)


def _opt_duration(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, float) or not math.isfinite(value) or value < 0:
        _invalid(attribute, "a finite number >= 0 or null", value)


def _state(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, State):
        _invalid(attribute, "a forgeqmp.core.states.State", value)


def _step(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, EnableStep | CommitStep | DiscardStep | RecoverStep | Pivoting):
        _invalid(attribute, "a step of forgeqmp's (forgeqmp.core.steps)", value)


def _opt_state(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _state(instance, attribute, value)


def _instance_of(cls: type, *, optional: bool = False) -> _Validator:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not (isinstance(value, cls) or (optional and value is None)):
            _invalid(attribute, f"a {cls.__name__}" + (" or null" if optional else ""), value)

    return check


# --- converters: total (they never raise); what they cannot convert, a validator reports ---------


def _to_utc(value: datetime) -> datetime:
    if isinstance(value, datetime):
        try:
            if value.utcoffset() is not None:
                return value.astimezone(UTC)
        except (OverflowError, ValueError, TypeError):
            pass
    return value


def _to_opt_utc(value: datetime | None) -> datetime | None:
    return None if value is None else _to_utc(value)


def _to_str_tuple(value: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(value)
    return cast("tuple[str, ...]", value)  # a tuple, or garbage that the validator reports


def _to_env(value: Mapping[str, str]) -> Mapping[str, str]:
    if isinstance(value, Mapping):
        return MappingProxyType(dict(value))  # a private copy: nobody else can change it
    return value


def _to_step(value: Step | str) -> Step:
    if isinstance(value, str) and not isinstance(value, enum.Enum):
        try:
            return parse_step(value)
        except InvalidArgument:
            pass
    return cast(Step, value)  # a step, or garbage that the validator reports


def _to_opt_float(value: float | None) -> float | None:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            pass
    return value


# --- the values --------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DiskRecord:
    """One forged disk: the device, its original image, and its overlay once created.

    ``device_node`` is the format node attached to the device at enable (the original, which
    becomes the overlay's backing); commit merges into it and discard restarts QEMU on
    ``base_file``. ``merged`` becomes true once commit passed the point of no return for this disk
    (its overlay is being or has been written into the base), after which discard is impossible;
    the disk is fully merged once, in addition, ``overlay_node`` is None (it is back on its
    original). ``status`` shows the two apart: ``merged`` (fully) and ``original_written``.
    ``commit_job`` is the id of the ``block-commit`` job sent for the disk (recorded with
    ``merged``, before the job starts); a commit stopped by its deadline leaves that job running
    in QEMU, and the next commit (or recover) waits for it instead of starting over.
    ``throttle`` is the device's I/O throttle as the platform set it (``block_set_io_throttle``
    limits), recorded before a commit bounds the guest's writes to make the disk's merge
    converge (:mod:`forgeqmp.core.plans.converge`); while it is set, forgeqmp's bound may be
    applied, and the commit (or recover) sets exactly these limits back, then clears it.
    """

    name: str = attrs.field(validator=_name)  #: qdev id of the disk device
    qdev: str = attrs.field(validator=_name)  #: qdev path of the device
    device_node: str = attrs.field(validator=_name)
    base_file: str = attrs.field(validator=_abs_path)
    base_format: str = attrs.field(validator=_base_format)
    virtual_size: int = attrs.field(validator=_int_at_least(0))  #: bytes
    overlay_file: str | None = attrs.field(default=None, validator=_opt_abs_path)
    overlay_node: str | None = attrs.field(default=None, validator=_opt_name)
    overlay_file_node: str | None = attrs.field(default=None, validator=_opt_name)
    merged: bool = attrs.field(default=False, validator=_flag)
    #: The original node's block options at enable (:class:`forgeqmp.core.blockopts.BlockOptions`
    #: as JSON), put back after commit when QEMU changed them; None: not recorded.
    options: Mapping[str, Any] | None = attrs.field(default=None, validator=_opt_options)
    commit_job: str | None = attrs.field(default=None, validator=_opt_name)
    throttle: Mapping[str, int | str] | None = attrs.field(default=None, validator=_opt_throttle)

    def __attrs_post_init__(self) -> None:
        if self.overlay_file is not None and self.overlay_file == self.base_file:
            raise InvalidArgument(
                f"overlay_file of disk {self.name!r} is its base_file {self.base_file!r}"
            )


@attrs.frozen(kw_only=True, init=False)
class MemoryRecord:
    """The memory (device + RAM) state file saved at enable, which discard restores from.

    ``digest`` (hex, by ``digest_algorithm``) is recorded once the file is complete and hashed;
    discard verifies it while QEMU loads the file (a flipped byte loads silently and corrupts the
    guest). Records of older forgeqmp had the field ``sha256`` instead: they load with
    ``digest_algorithm`` ``"sha256"``. ``capabilities`` are the migration capabilities enabled
    for the save; the restore must enable the same ones.
    """

    path: str = attrs.field(validator=_abs_path)
    size: int | None = attrs.field(default=None, validator=_int_at_least(0, optional=True))
    digest: str | None = attrs.field(default=None)
    digest_algorithm: str = attrs.field(default="xxh3-128", validator=_digest_algorithm)
    transport: str = attrs.field(validator=_name)  #: "fd", "fdset-file", "file"...
    capabilities: tuple[str, ...] = attrs.field(
        default=(),
        converter=_to_str_tuple,
        validator=_str_tuple(_is_name, "capability names", unique=True),
    )

    def __init__(
        self,
        *,
        path: str,
        size: int | None = None,
        digest: str | None = None,
        digest_algorithm: str = "xxh3-128",
        transport: str,
        capabilities: Sequence[str] = (),
        sha256: str | None = None,
    ) -> None:
        """The fields by name; ``sha256=`` (as before the algorithm was recorded) is the same as
        ``digest=`` with ``digest_algorithm="sha256"``."""
        if sha256 is not None:
            digest, digest_algorithm = sha256, LEGACY_DIGEST_ALGORITHM
        self.__attrs_init__(
            path=path,
            size=size,
            digest=digest,
            digest_algorithm=digest_algorithm,
            transport=transport,
            capabilities=capabilities,
        )

    def __attrs_post_init__(self) -> None:
        length = DIGEST_ALGORITHMS[self.digest_algorithm]
        if self.digest is not None and not (
            isinstance(self.digest, str) and re.fullmatch(f"[0-9a-f]{{{length}}}", self.digest)
        ):
            raise InvalidArgument(
                f"digest must be {length} lowercase hex digits (a {self.digest_algorithm} digest) "
                f"or null, got {_show(self.digest)}"
            )

    @property
    def sha256(self) -> str | None:
        """The digest if it is a (chunked) SHA-256 one, as records of older forgeqmp had it."""
        return self.digest if self.digest_algorithm == LEGACY_DIGEST_ALGORITHM else None


@attrs.frozen(kw_only=True)
class QemuRecord:
    """The QEMU process the session runs on: enough to relaunch it identically for discard.

    ``env`` is a read-only mapping (it does not take part in the hash of the record).
    """

    pid: int = attrs.field(validator=_int_at_least(1))
    argv: tuple[str, ...] = attrs.field(
        converter=_to_str_tuple, validator=_str_tuple(_is_name, "non-empty strings")
    )
    cwd: str = attrs.field(validator=_abs_path)
    env: Mapping[str, str] = attrs.field(converter=_to_env, validator=_env, hash=False)
    version: str = attrs.field(validator=_name)
    machine: str = attrs.field(validator=_name)
    qmp_socket: str = attrs.field(validator=_abs_path)

    def __attrs_post_init__(self) -> None:
        if not self.argv:
            raise InvalidArgument("argv must not be empty: it is the command line to relaunch QEMU")


def _to_disk_tuple(value: Sequence[DiskRecord]) -> tuple[DiskRecord, ...]:
    if isinstance(value, list):
        return tuple(value)
    return cast("tuple[DiskRecord, ...]", value)  # a tuple, or garbage that the validator reports


def _disks(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(d, DiskRecord) for d in value):
        _invalid(attribute, "a list of DiskRecord", value)
    if not value:
        _invalid(attribute, "a list of at least one disk", value)
    disks = cast("tuple[DiskRecord, ...]", value)
    for what, values in (
        ("name", [d.name for d in disks]),
        ("base_file", [d.base_file for d in disks]),
        ("overlay_file", [d.overlay_file for d in disks if d.overlay_file is not None]),
    ):
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise InvalidArgument(f"disks: two disks have the same {what}: {', '.join(dupes)}")
    overlays = {d.overlay_file for d in disks}
    shared = sorted(d.base_file for d in disks if d.base_file in overlays)
    if shared:
        raise InvalidArgument(f"disks: {', '.join(shared)} is both a base and an overlay")


_R = TypeVar("_R")


@attrs.frozen(kw_only=True)
class SessionRecord:
    """Everything known about one forge session, as written before each irreversible step.

    ``step`` is the last step reached, a member of the operation's enum in
    :mod:`forgeqmp.core.steps` (for example :attr:`~forgeqmp.core.steps.EnableStep.OVERLAYS_CREATED`;
    its name, ``"overlays-created"``, is accepted too and is what the JSON holds); ``recover``
    decides from ``state`` and ``step`` what is left to undo or finish. ``next_step`` tells a human what to do when the session needs one (it is
    shown by ``status``). ``unforged_disks`` names the VM's disks that are *not* in the forge:
    they keep the writes made after enable even when the memory is discarded.

    Only the shape of each field is validated here; which states, steps and timestamps may go
    together is the business of :mod:`forgeqmp.core.states`. The state changes only by an event
    (:func:`forgeqmp.core.lifecycle.advance`): :meth:`evolve` refuses ``state=``.
    """

    session_id: str = attrs.field(validator=_session_id)
    state: State = attrs.field(validator=_state)
    step: Step = attrs.field(converter=_to_step, validator=_step)
    strategy: str = attrs.field(validator=_name)
    created_at: datetime = attrs.field(converter=_to_utc, validator=_utc)
    activated_at: datetime | None = attrs.field(
        default=None, converter=_to_opt_utc, validator=_opt_utc
    )
    updated_at: datetime = attrs.field(converter=_to_utc, validator=_utc)
    finished_at: datetime | None = attrs.field(
        default=None, converter=_to_opt_utc, validator=_opt_utc
    )
    disks: tuple[DiskRecord, ...] = attrs.field(converter=_to_disk_tuple, validator=_disks)
    unforged_disks: tuple[str, ...] = attrs.field(
        default=(),
        converter=_to_str_tuple,
        validator=_str_tuple(_is_name, "disk names", unique=True),
    )
    memory: MemoryRecord | None = attrs.field(
        default=None, validator=_instance_of(MemoryRecord, optional=True)
    )
    qemu: QemuRecord = attrs.field(validator=_instance_of(QemuRecord))
    pause_ms: float | None = attrs.field(
        default=None, converter=_to_opt_float, validator=_opt_duration
    )
    memory_restored: bool | None = attrs.field(default=None, validator=_opt_flag)
    #: Seconds from the discard call to the VM running again.
    resume_seconds: float | None = attrs.field(
        default=None, converter=_to_opt_float, validator=_opt_duration
    )
    error: str | None = attrs.field(default=None, validator=_opt_text)
    next_step: str | None = attrs.field(default=None, validator=_opt_text)
    warnings: tuple[str, ...] = attrs.field(
        default=(),
        converter=_to_str_tuple,
        validator=_str_tuple(lambda v: isinstance(v, str), "strings"),
    )
    #: The state the session failed in (set with state FAILED).
    failure_phase: State | None = attrs.field(default=None, validator=_opt_state)
    #: A failure that undid everything: nothing to reconcile, the instance is free again.
    rolled_back: bool = attrs.field(default=False, validator=_flag)
    #: Set on disk *before* forgeqmp pauses a running guest (or starts what pauses it: a memory
    #: save that stops at its switchover, a discard whose new QEMU starts paused), cleared once it
    #: resumed it. A guest found paused while this is set was paused by forgeqmp, so ``recover``
    #: resumes it; one found paused while it is not set was paused by someone else, and stays so.
    paused_by_forgeqmp: bool = attrs.field(default=False, validator=_flag)

    def __attrs_post_init__(self) -> None:
        forged = {d.name for d in self.disks}
        both = sorted(forged.intersection(self.unforged_disks))
        if both:
            raise InvalidArgument(
                f"unforged_disks: {', '.join(both)} is also in disks; a disk is forged or not"
            )

    # --- updates ---------------------------------------------------------------------------------

    def evolve(self, **changes: Any) -> SessionRecord:
        """A copy with ``changes`` applied and validated again (``attrs.evolve``).

        Any field but ``state``: a state changes only by an event applied through the transition
        table (:func:`forgeqmp.core.lifecycle.advance`), else InvalidArgument.
        """
        if "state" in changes:
            raise InvalidArgument(
                "a record's state is not set by hand: apply an Event (forgeqmp.core.lifecycle."
                "advance), and the transition table gives the state"
            )
        return attrs.evolve(self, **changes)

    def disk(self, name: str) -> DiskRecord:
        """The forged disk named ``name`` (qdev id); InvalidArgument if there is none."""
        for disk in self.disks:
            if disk.name == name:
                return disk
        raise InvalidArgument(
            f"session {self.session_id} has no forged disk {name!r}; it has: "
            + ", ".join(d.name for d in self.disks)
        )

    def evolve_disk(self, name: str, **changes: Any) -> SessionRecord:
        """A copy with the disk named ``name`` updated (e.g. ``merged=True``)."""
        self.disk(name)
        disks = tuple(attrs.evolve(d, **changes) if d.name == name else d for d in self.disks)
        return attrs.evolve(self, disks=disks)

    # --- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> bytes:
        """The record as JSON (ASCII, indented, newline-terminated), with its ``format`` version."""
        obj: dict[str, Any] = {"format": FORMAT_VERSION}
        obj.update(_encode_attrs(self))
        text = json.dumps(obj, indent=2, ensure_ascii=True, allow_nan=False)
        return (text + "\n").encode("ascii")

    @classmethod
    def from_json(cls, data: bytes | str) -> SessionRecord:
        """Parse and validate a record; RecordError (which field, what to do) if malformed."""
        try:
            text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
            if not isinstance(text, str):
                raise _Invalid(f"expected bytes, got {type(data).__name__}")
            raw = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
            return _decode_session(raw)
        except _FormatMismatch as exc:
            raise RecordUnreadable(str(exc)) from None
        except _Invalid as exc:
            raise RecordUnreadable(f"invalid session record: {exc}; {_ADVICE}") from None
        except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurdly nested JSON
            raise RecordUnreadable(
                f"the session record is not valid JSON ({_show_error(exc)}); {_DAMAGED}"
            ) from None

    # --- status ----------------------------------------------------------------------------------

    def status_dict(self) -> dict[str, Any]:
        """The ``status --json`` object of the CLI contract, plus more keys useful to scripts."""
        return {
            "state": self.state.value,
            "activated_at": _iso(self.activated_at),
            "disks": [
                {
                    "name": d.name,
                    "base": d.base_file,
                    "overlay": d.overlay_file,
                    # Exactly: merged once its switch back to the original completed; before
                    # that, a commit that started writes into the original (no discard then).
                    "merged": d.merged and d.overlay_node is None,
                    "original_written": d.merged,
                }
                for d in self.disks
            ],
            "memory_file": self.memory.path if self.memory is not None else None,
            "memory_restored": self.memory_restored,
            "error": self.error,
            "session_id": self.session_id,
            "step": self.step.value,
            "next_step": self.next_step,
            "strategy": self.strategy,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "finished_at": _iso(self.finished_at),
            "unforged_disks": list(self.unforged_disks),
            "pause_ms": self.pause_ms,
            "resume_seconds": self.resume_seconds,
            "warnings": list(self.warnings),
            "failure_phase": self.failure_phase.value if self.failure_phase else None,
            "rolled_back": self.rolled_back,
        }


def no_session_status() -> dict[str, Any]:
    """The ``status --json`` object when the instance has no session (state ``"none"``).

    It has the same keys as :meth:`SessionRecord.status_dict`, all null or empty.
    """
    return {
        "state": "none",
        "activated_at": None,
        "disks": [],
        "memory_file": None,
        "memory_restored": None,
        "error": None,
        "session_id": None,
        "step": None,
        "next_step": None,
        "strategy": None,
        "created_at": None,
        "updated_at": None,
        "finished_at": None,
        "unforged_disks": [],
        "pause_ms": None,
        "resume_seconds": None,
        "warnings": [],
        "failure_phase": None,
        "rolled_back": None,
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# --- encoding ----------------------------------------------------------------------------------


def _encode_attrs(
    instance: DiskRecord | MemoryRecord | QemuRecord | SessionRecord,
) -> dict[str, Any]:
    return {f.name: _encode(getattr(instance, f.name)) for f in attrs.fields(type(instance))}


def _encode(value: object) -> object:
    if isinstance(value, DiskRecord | MemoryRecord | QemuRecord | SessionRecord):
        return _encode_attrs(value)
    if isinstance(value, State | EnableStep | CommitStep | DiscardStep | RecoverStep | Pivoting):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return dict(value)
    return value


# --- decoding ----------------------------------------------------------------------------------


class _Invalid(Exception):
    """A malformed record; the message names the field. Becomes a RecordError with advice."""


class _FormatMismatch(Exception):
    """A record of another format version; becomes a RecordError with its own advice."""


def _show_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Invalid(f"field {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_constant(name: str) -> NoReturn:
    raise _Invalid(f"{name} is not a valid JSON number")


class _Fields:
    """The fields of one JSON object being decoded; ``where`` prefixes field names in messages."""

    def __init__(self, raw: object, where: str, what: str) -> None:
        if not isinstance(raw, dict):
            place = where.rstrip(".") or "the record"
            raise _Invalid(f"{place} must be a JSON object ({what}), got {_show(raw)}")
        self._raw: dict[str, object] = raw
        self._where = where
        self._taken: set[str] = set()

    def take(self, key: str) -> object:
        if key not in self._raw:
            raise _Invalid(f"field {self._where}{key} is missing")
        self._taken.add(key)
        return self._raw[key]

    def build(
        self,
        factory: Callable[..., _R],
        names: Sequence[str],
        special: Mapping[str, Callable[[object, str], object]],
    ) -> _R:
        kwargs: dict[str, object] = {}
        added = ADDED_FIELDS.get(getattr(factory, "__name__", ""), frozenset())
        for name in names:
            if name in added and name not in self._raw:
                continue  # written by an older forgeqmp: the field's default applies
            value = self.take(name)
            decode = special.get(name)
            kwargs[name] = decode(value, self._where + name) if decode else value
        extra = sorted(set(self._raw) - self._taken)
        if extra:
            raise _Invalid(
                f"unknown field(s) {', '.join(self._where + k for k in extra)} (this forgeqmp "
                f"writes record format {FORMAT_VERSION} without them)"
            )
        try:
            return factory(**kwargs)
        except (ValueError, TypeError, OverflowError) as exc:  # InvalidArgument is a ValueError
            raise _Invalid(f"{self._where}{_show_error(exc)}") from None


def _decode_datetime(value: object, where: str) -> object:
    if value is None:
        return None  # the field's validator decides whether null is allowed
    try:
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            if parsed.utcoffset() is not None:
                return parsed
    except (ValueError, OverflowError):
        pass
    raise _Invalid(
        f"{where} must be an ISO-8601 date-time with a UTC offset (like "
        f"2024-05-01T12:00:00+00:00), got {_show(value)}"
    )


def _decode_state(value: object, where: str) -> State:
    for state in State:
        if value == state.value and isinstance(value, str):
            return state
    known = ", ".join(s.value for s in State)
    raise _Invalid(f"{where} must be one of {known}, got {_show(value)}")


def _decode_list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise _Invalid(f"{where} must be a JSON list, got {_show(value)}")
    return value


def _decode_str_list(value: object, where: str) -> object:
    return tuple(_decode_list(value, where))


def _decode_env(value: object, where: str) -> object:
    if not isinstance(value, dict):
        raise _Invalid(f"{where} must be a JSON object of strings, got {_show(value)}")
    return value


def _decode_disk(value: object, where: str) -> DiskRecord:
    fields = _Fields(value, where + ".", "a disk")
    return fields.build(DiskRecord, _field_names(DiskRecord), {})


def _decode_disks(value: object, where: str) -> object:
    items = _decode_list(value, where)
    return tuple(_decode_disk(item, f"{where}[{i}]") for i, item in enumerate(items))


def _decode_memory(value: object, where: str) -> object:
    if value is None:
        return None
    fields = _Fields(_upgrade_memory(value, where), where + ".", "the memory file")
    return fields.build(
        MemoryRecord, _field_names(MemoryRecord), {"capabilities": _decode_str_list}
    )


def _upgrade_memory(value: object, where: str) -> object:
    """A memory record of an older forgeqmp (its digest in ``sha256``, no algorithm named) in
    today's form: ``digest`` with ``digest_algorithm`` ``"sha256"``."""
    if not (isinstance(value, dict) and "sha256" in value):
        return value
    clash = sorted({"digest", "digest_algorithm"} & set(value))
    if clash:
        raise _Invalid(f"{where}.sha256 and {where}.{clash[0]} cannot both be set")
    legacy = value["sha256"]
    if legacy is not None and not (isinstance(legacy, str) and _SHA256.fullmatch(legacy)):
        raise _Invalid(
            f"{where}.sha256 must be 64 lowercase hex digits or null, got {_show(legacy)}"
        )
    upgraded = {k: v for k, v in value.items() if k != "sha256"}
    upgraded["digest"] = legacy
    upgraded["digest_algorithm"] = LEGACY_DIGEST_ALGORITHM
    return upgraded


def _decode_qemu(value: object, where: str) -> object:
    fields = _Fields(value, where + ".", "the QEMU process")
    return fields.build(
        QemuRecord, _field_names(QemuRecord), {"argv": _decode_str_list, "env": _decode_env}
    )


#: Fields added to record format 1 after records of it were first written, per class: a record
#: without one (written by an older forgeqmp, e.g. during a session that spans an upgrade) still
#: loads, with the field's default. Every other field is required; an unknown one is refused.
ADDED_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "DiskRecord": frozenset({"options", "commit_job", "throttle"}),
    "SessionRecord": frozenset({"paused_by_forgeqmp"}),
}


def _field_names(cls: type[DiskRecord | MemoryRecord | QemuRecord | SessionRecord]) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


_SESSION_DECODERS: Final[Mapping[str, Callable[[object, str], object]]] = {
    "state": _decode_state,
    "created_at": _decode_datetime,
    "activated_at": _decode_datetime,
    "updated_at": _decode_datetime,
    "finished_at": _decode_datetime,
    "disks": _decode_disks,
    "unforged_disks": _decode_str_list,
    "memory": _decode_memory,
    "qemu": _decode_qemu,
    "warnings": _decode_str_list,
    "failure_phase": lambda value, where: None if value is None else _decode_state(value, where),
}


def _decode_session(raw: object) -> SessionRecord:
    fields = _Fields(raw, "", "a forgeqmp session record")
    version = fields.take("format")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Invalid(f"field format must be an integer, got {_show(version)}")
    if version != FORMAT_VERSION:
        raise _FormatMismatch(
            f"the session record has format {version}, and this forgeqmp reads only format "
            f"{FORMAT_VERSION}: run 'forgeqmp recover' with the forgeqmp version that wrote it; "
            "failing that, check each disk (qemu-img info --backing-chain) and only then remove "
            "the state dir"
        )
    return fields.build(SessionRecord, _field_names(SessionRecord), _SESSION_DECODERS)
