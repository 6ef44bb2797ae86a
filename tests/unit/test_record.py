"""The session record: validation, JSON round trip, refusal of anything malformed, the store."""

from __future__ import annotations

import functools
import json
import os
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from records import make_disk as shared_disk  # tests/unit is on sys.path
from records import make_memory as shared_memory
from records import make_qemu as shared_qemu
from records import make_record as shared_record

from forgeqmp.adapters.recordstore import KEEP_ARCHIVES, RECORD_FILE, RecordStore
from forgeqmp.adapters.statedir import StateDir
from forgeqmp.core.lifecycle import advance
from forgeqmp.core.record import (
    ADDED_FIELDS,
    DIGEST_ALGORITHMS,
    FORMAT_VERSION,
    DiskRecord,
    MemoryRecord,
    QemuRecord,
    SessionRecord,
    new_session_id,
    no_session_status,
)
from forgeqmp.core.states import Event, State
from forgeqmp.core.steps import CommitStep, DiscardStep, EnableStep, Pivoting, RecoverStep
from forgeqmp.errors import InvalidArgument, RecordError, SessionActive

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
SHA = "ab" * 32


# The values these tests pin, over the shared factory's: a realistic VM (a node name QEMU
# generated, an fd transport, an unforged disk and its warning).
make_disk = functools.partial(
    shared_disk,
    device_node="#block172",
    base_file="/var/lib/vms/web1.qcow2",
    virtual_size=10 * 2**30,
    overlay_file="/var/lib/vms/web1.forge-1.qcow2",
    overlay_node="forge-ov-disk0",
    overlay_file_node="forge-ovf-disk0",
    merged=False,
)
make_qemu = functools.partial(
    shared_qemu,
    pid=4242,
    argv=("qemu-system-x86_64", "-machine", "pc-q35-7.2", "-m", "2048"),
    cwd="/var/lib/vms",
    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    version="7.2.11",
    machine="pc-q35-7.2",
    qmp_socket="/run/vms/web1/qmp.sock",
)
make_record = functools.partial(
    shared_record,
    state=State.ACTIVE,
    step="snapshot-transaction-done",
    strategy="fd",
    created_at=T0,
    activated_at=T0 + timedelta(seconds=1),
    updated_at=T0 + timedelta(seconds=2),
    disks=(make_disk(),),
    unforged_disks=("scratch",),
    memory=shared_memory(
        path="/home/u/.local/state/forgeqmp/web1/memory-1.bin",
        size=123456789,
        sha256=SHA,
        transport="fd",
        capabilities=("pause-before-switchover",),
    ),
    qemu=make_qemu(),
    pause_ms=12.5,
    warnings=("disk 'scratch' is not in the forge",),
)


def as_obj(record: SessionRecord) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(record.to_json())
    return obj


def from_obj(obj: object) -> SessionRecord:
    return SessionRecord.from_json(json.dumps(obj).encode())


# --- strategies ----------------------------------------------------------------------------------

names = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), min_size=1)
#: Every step a record can hold: an operation's step, or a commit's pivot of a disk.
steps = st.sampled_from([*EnableStep, *CommitStep, *DiscardStep, *RecoverStep]) | st.builds(
    Pivoting, names
)
texts = st.text()
abs_paths = names.map(lambda s: "/" + s)
aware = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.builds(
        timezone,
        st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23)),
    ),
)
env_names = names.filter(lambda s: "=" not in s)


@st.composite
def disk_lists(draw: st.DrawFn) -> tuple[DiskRecord, ...]:
    labels = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    disks = []
    for i, label in enumerate(labels):
        disks.append(
            DiskRecord(
                name=label,
                qdev=draw(names),
                device_node=draw(names),
                base_file=f"/base{i}/" + draw(names),
                base_format=draw(st.sampled_from(["qcow2", "raw"])),
                virtual_size=draw(st.integers(min_value=0, max_value=2**70)),
                overlay_file=draw(st.none() | names.map(f"/overlay{i}/".__add__)),
                overlay_node=draw(st.none() | names),
                overlay_file_node=draw(st.none() | names),
                merged=draw(st.booleans()),
            )
        )
    return tuple(disks)


memories = st.sampled_from(sorted(DIGEST_ALGORITHMS)).flatmap(
    lambda algorithm: st.builds(
        MemoryRecord,
        path=abs_paths,
        size=st.none() | st.integers(min_value=0),
        digest=st.none()
        | st.binary(
            min_size=DIGEST_ALGORITHMS[algorithm] // 2, max_size=DIGEST_ALGORITHMS[algorithm] // 2
        ).map(bytes.hex),
        digest_algorithm=st.just(algorithm),
        transport=names,
        capabilities=st.lists(names, unique=True, max_size=4).map(tuple),
    )
)

qemus = st.builds(
    QemuRecord,
    pid=st.integers(min_value=1, max_value=2**22),
    argv=st.lists(names, min_size=1, max_size=6),
    cwd=abs_paths,
    env=st.dictionaries(env_names, texts.filter(lambda s: "\0" not in s), max_size=5),
    version=names,
    machine=names,
    qmp_socket=abs_paths,
)


@st.composite
def records(draw: st.DrawFn) -> SessionRecord:
    disks = draw(disk_lists())
    forged = {d.name for d in disks}
    unforged = draw(st.lists(names.filter(lambda n: n not in forged), unique=True, max_size=3))
    return SessionRecord(
        session_id=str(draw(st.uuids())),
        state=draw(st.sampled_from(State)),
        step=draw(steps),
        strategy=draw(names),
        created_at=draw(aware),
        activated_at=draw(st.none() | aware),
        updated_at=draw(aware),
        finished_at=draw(st.none() | aware),
        disks=disks,
        unforged_disks=unforged,
        memory=draw(st.none() | memories),
        qemu=draw(qemus),
        pause_ms=draw(
            st.none()
            | st.floats(min_value=0, allow_nan=False, allow_infinity=False)
            | st.integers(min_value=0, max_value=2**53)
        ),
        memory_restored=draw(st.none() | st.booleans()),
        error=draw(st.none() | texts),
        next_step=draw(st.none() | texts),
        warnings=draw(st.lists(texts, max_size=3)),
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

# --- round trip ----------------------------------------------------------------------------------


@given(records())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_valid_record_survives_json(record: SessionRecord) -> None:
    data = record.to_json()
    again = SessionRecord.from_json(data)
    assert again == record
    assert again.to_json() == data
    assert hash(again) == hash(record)
    data.decode("ascii")  # always plain ASCII, whatever the paths and texts hold


def test_json_layout() -> None:
    record = make_record()
    obj = as_obj(record)
    assert next(iter(obj)) == "format"
    assert obj["format"] == FORMAT_VERSION == 1
    assert list(obj)[1:] == [f.name for f in attrs.fields(SessionRecord)]
    assert obj["state"] == "active"
    assert obj["created_at"] == "2024-05-01T12:00:00.123456+00:00"
    assert obj["disks"][0]["virtual_size"] == 10 * 2**30
    assert obj["memory"]["capabilities"] == ["pause-before-switchover"]
    assert obj["qemu"]["env"] == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert record.to_json().endswith(b"\n")


def test_non_utf8_path_survives_as_surrogate_escape() -> None:
    weird = os.fsdecode(b"/vms/\xff\xfe.qcow2")
    record = make_record(disks=(make_disk(base_file=weird),))
    again = SessionRecord.from_json(record.to_json())
    assert os.fsencode(again.disks[0].base_file) == b"/vms/\xff\xfe.qcow2"


# --- construction ---------------------------------------------------------------------------------


def test_datetimes_must_be_aware_and_are_normalized_to_utc() -> None:
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    record = make_record(created_at=local)
    assert record.created_at == local
    assert record.created_at.tzinfo is UTC
    assert record.created_at.hour == 12
    with pytest.raises(InvalidArgument, match="created_at"):
        make_record(created_at=datetime(2024, 5, 1))  # naive
    with pytest.raises(InvalidArgument, match="finished_at"):
        make_record(finished_at="2024-05-01T00:00:00+00:00")
    with pytest.raises(InvalidArgument, match="created_at"):  # out of range once in UTC
        make_record(created_at=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))


@pytest.mark.parametrize(
    ("factory", "changes", "field"),
    [
        (make_disk, {"name": ""}, "name"),
        (make_disk, {"base_file": "relative.qcow2"}, "base_file"),
        (make_disk, {"overlay_file": "ov.qcow2"}, "overlay_file"),
        (make_disk, {"base_format": "vmdk"}, "base_format"),
        (make_disk, {"virtual_size": -1}, "virtual_size"),
        (make_disk, {"virtual_size": True}, "virtual_size"),
        (make_disk, {"virtual_size": 1.0}, "virtual_size"),
        (make_disk, {"merged": 1}, "merged"),
        (make_disk, {"overlay_node": ""}, "overlay_node"),
        (make_disk, {"overlay_file": "/var/lib/vms/web1.qcow2"}, "overlay_file"),
        (make_qemu, {"pid": 0}, "pid"),
        (make_qemu, {"argv": ()}, "argv"),
        (make_qemu, {"argv": "qemu-system-x86_64"}, "argv"),
        (make_qemu, {"argv": ("qemu", 3)}, "argv"),
        (make_qemu, {"env": {"A=B": "c"}}, "env"),
        (make_qemu, {"env": {"A": 1}}, "env"),
        (make_qemu, {"env": [("A", "b")]}, "env"),
        (make_qemu, {"cwd": "."}, "cwd"),
        (make_qemu, {"qmp_socket": "qmp.sock"}, "qmp_socket"),
        (make_record, {"session_id": "not-a-uuid"}, "session_id"),
        (make_record, {"session_id": "3F2A9C1E-4B7D-4E8A-9C3B-2D1E0F9A8B7C"}, "session_id"),
        (make_record, {"state": "active"}, "state"),
        (make_record, {"step": ""}, "step"),
        (make_record, {"disks": ()}, "disks"),
        (make_record, {"disks": (make_disk(), make_disk())}, "disks"),
        (
            make_record,
            {"disks": (make_disk(), make_disk(name="disk1", overlay_file="/o2"))},
            "base_file",
        ),
        (make_record, {"unforged_disks": ("disk0",)}, "unforged_disks"),
        (make_record, {"unforged_disks": ("a", "a")}, "unforged_disks"),
        (make_record, {"pause_ms": float("nan")}, "pause_ms"),
        (make_record, {"pause_ms": float("inf")}, "pause_ms"),
        (make_record, {"pause_ms": -1.0}, "pause_ms"),
        (make_record, {"pause_ms": True}, "pause_ms"),
        (make_record, {"pause_ms": 10**400}, "pause_ms"),
        (make_record, {"memory_restored": "yes"}, "memory_restored"),
        (make_record, {"memory": {"path": "/m"}}, "memory"),
        (make_record, {"warnings": ("ok", None)}, "warnings"),
        (make_disk, {"throttle": {"bps_wr": -1}}, "throttle"),
        (make_disk, {"throttle": {"bps_wr": True}}, "throttle"),
        (make_disk, {"throttle": {"group": 3}}, "throttle"),
        (make_disk, {"throttle": ["bps_wr", 1]}, "throttle"),
    ],
)
def test_constructors_refuse_bad_values(factory: Any, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        factory(**changes)


def test_memory_record_validation() -> None:
    with pytest.raises(InvalidArgument, match="sha256"):
        MemoryRecord(path="/m", transport="fd", sha256="AB" * 32)
    with pytest.raises(InvalidArgument, match=r"32 lowercase hex digits \(a xxh3-128 digest\)"):
        MemoryRecord(path="/m", transport="fd", digest="ab" * 32)  # a SHA-256 named XXH3
    with pytest.raises(InvalidArgument, match=r"64 lowercase hex digits \(a sha256 digest\)"):
        MemoryRecord(path="/m", transport="fd", digest="ab" * 16, digest_algorithm="sha256")
    with pytest.raises(InvalidArgument, match="digest_algorithm must be 'xxh3-128' or 'sha256'"):
        MemoryRecord(path="/m", transport="fd", digest_algorithm="md5")
    with pytest.raises(InvalidArgument, match="digest must be"):
        MemoryRecord(path="/m", transport="fd", digest=123)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="path"):
        MemoryRecord(path="m", transport="fd")
    with pytest.raises(InvalidArgument, match="capabilities"):
        MemoryRecord(path="/m", transport="fd", capabilities=("x", "x"))


def test_memory_digest_names_its_algorithm_and_sha256_is_the_old_spelling() -> None:
    new = MemoryRecord(path="/m", transport="fd", digest="cd" * 16)
    assert (new.digest_algorithm, new.sha256) == ("xxh3-128", None)
    old = MemoryRecord(path="/m", transport="fd", sha256=SHA)
    assert (old.digest, old.digest_algorithm, old.sha256) == (SHA, "sha256", SHA)
    assert old == MemoryRecord(path="/m", transport="fd", digest=SHA, digest_algorithm="sha256")
    # evolve takes either spelling; the digest and its algorithm change together
    assert attrs.evolve(old, digest="ef" * 16, digest_algorithm="xxh3-128") == MemoryRecord(
        path="/m", transport="fd", digest="ef" * 16
    )
    assert attrs.evolve(new, sha256=SHA) == old
    with pytest.raises(InvalidArgument, match="xxh3-128"):
        attrs.evolve(old, digest_algorithm="xxh3-128")  # a SHA-256 digest is not an XXH3 one


def test_memory_digest_json_layout() -> None:
    for memory in (
        MemoryRecord(path="/m", size=5, digest="cd" * 16, transport="fd"),
        MemoryRecord(path="/m", size=5, sha256=SHA, transport="fd"),
        MemoryRecord(path="/m", transport="fd-set"),
    ):
        obj = as_obj(make_record(memory=memory))
        assert obj["memory"]["digest"] == memory.digest
        assert obj["memory"]["digest_algorithm"] == memory.digest_algorithm
        assert "sha256" not in obj["memory"]
        assert SessionRecord.from_json(json.dumps(obj).encode()).memory == memory


@pytest.mark.parametrize("digest", [SHA, None])
def test_a_memory_record_of_an_older_forgeqmp_reads_as_sha256(digest: str | None) -> None:
    """Records written before the algorithm was recorded had ``sha256`` (the chunked SHA-256):
    a session enabled by an older forgeqmp can still be discarded, its digest verified as such."""
    obj = as_obj(make_record())
    memory = obj["memory"]
    del memory["digest"], memory["digest_algorithm"]
    memory["sha256"] = digest
    record = SessionRecord.from_json(json.dumps(obj).encode())
    assert record.memory is not None
    assert (record.memory.digest, record.memory.digest_algorithm) == (digest, "sha256")
    assert record.memory.sha256 == digest
    again = SessionRecord.from_json(record.to_json())  # saved again: today's spelling
    assert again == record
    assert as_obj(again)["memory"]["digest_algorithm"] == "sha256"


def _old_form(memory: dict[str, Any], **changes: Any) -> None:
    """``memory`` as an older forgeqmp wrote it (``sha256``, no algorithm), then ``changes``."""
    memory["sha256"] = memory.pop("digest")
    del memory["digest_algorithm"]
    memory.update(changes)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: _old_form(m, sha256="AB" * 32), "memory.sha256 must be 64 lowercase hex digits"),
        (lambda m: _old_form(m, sha256="ab" * 16), "memory.sha256 must be 64 lowercase hex digits"),
        (lambda m: _old_form(m, sha256=7), "memory.sha256 must be 64 lowercase hex digits"),
        (lambda m: _old_form(m, digest=SHA), "memory.sha256 and memory.digest cannot"),
        (lambda m: _old_form(m, digest_algorithm="sha256"), "memory.sha256 and memory.digest_al"),
        (lambda m: m.update(sha256=SHA), "memory.sha256 and memory.digest cannot"),
        (lambda m: m.update(digest_algorithm="blake3"), "memory.digest_algorithm must be"),
        (lambda m: m.update(digest_algorithm=None), "memory.digest_algorithm must be"),
        (lambda m: m.update(digest_algorithm="xxh3-128"), "32 lowercase hex digits (a xxh3-128"),
        (lambda m: m.update(digest="AB" * 32), "memory.digest must be 64 lowercase hex digits"),
    ],
)
def test_bad_memory_digests_are_refused(edit: Any, message: str) -> None:
    obj = as_obj(make_record())  # its memory digest is a SHA-256 one
    edit(obj["memory"])
    assert message in str(assert_record_error(json.dumps(obj).encode()))


def test_lists_become_tuples_and_env_is_a_private_read_only_copy() -> None:
    env = {"A": "1"}
    qemu = make_qemu(argv=["qemu", "-S"], env=env)
    assert qemu.argv == ("qemu", "-S")
    env["A"] = "changed"
    assert qemu.env["A"] == "1"
    with pytest.raises(TypeError):
        qemu.env["B"] = "2"  # type: ignore[index]
    assert make_qemu(env={"A": "1"}) == make_qemu(env={"A": "1"})
    assert hash(make_qemu()) == hash(make_qemu())


def test_records_are_frozen_and_evolve_validates() -> None:
    record = make_record()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        record.state = State.FAILED  # type: ignore[misc]
    with pytest.raises(InvalidArgument, match="apply an Event"):
        record.evolve(state=State.FAILED)
    with pytest.raises(InvalidArgument, match="apply an Event"):
        record.evolve(state=State.ACTIVE)  # even to the same state: never by hand
    failed = advance(record, Event.RECOVERED_FAILED, error="boom", next_step="run recover")
    assert failed.state is State.FAILED
    assert record.state is State.ACTIVE
    with pytest.raises(InvalidArgument, match="disks"):
        record.evolve(disks=())
    merged = record.evolve_disk("disk0", merged=True)
    assert merged.disk("disk0").merged is True
    assert record.disk("disk0").merged is False
    with pytest.raises(InvalidArgument, match="no forged disk 'nope'"):
        record.evolve_disk("nope", merged=True)


def test_new_session_id_is_a_valid_id() -> None:
    first, second = new_session_id(), new_session_id()
    assert first != second
    make_record(session_id=first)


# --- status --------------------------------------------------------------------------------------


def test_status_says_exactly_which_disks_are_merged() -> None:
    """A disk past its point of no return whose switch back did not complete is not merged (its
    original was written into: no discard), a disk back on its original is; one never started
    is neither."""
    record = make_record()
    base = record.disks[0]
    disks = (
        attrs.evolve(base, name="done", base_file="/i/a", overlay_file="/i/a.o", merged=True,
                     overlay_node=None, overlay_file_node=None),
        attrs.evolve(base, name="partly", base_file="/i/b", overlay_file="/i/b.o", merged=True),
        attrs.evolve(base, name="untouched", base_file="/i/c", overlay_file="/i/c.o"),
    )  # fmt: skip
    status = record.evolve(disks=disks).status_dict()
    assert [(d["name"], d["merged"], d["original_written"]) for d in status["disks"]] == [
        ("done", True, True),
        ("partly", False, True),
        ("untouched", False, False),
    ]


CONTRACT_KEYS = {"state", "activated_at", "disks", "memory_file", "memory_restored", "error"}


def test_status_dict_follows_the_contract() -> None:
    record = make_record(memory_restored=False, error="memory hash mismatch; cold start")
    status = record.status_dict()
    assert status.keys() >= CONTRACT_KEYS
    assert status["state"] == "active"
    assert status["activated_at"] == "2024-05-01T12:00:01.123456+00:00"
    assert status["disks"] == [
        {
            "name": "disk0",
            "base": "/var/lib/vms/web1.qcow2",
            "overlay": "/var/lib/vms/web1.forge-1.qcow2",
            "merged": False,
            "original_written": False,
        }
    ]
    assert status["memory_file"] == "/home/u/.local/state/forgeqmp/web1/memory-1.bin"
    assert status["memory_restored"] is False
    assert status["error"] == "memory hash mismatch; cold start"
    assert status["session_id"] == record.session_id
    assert status["step"] == "snapshot-transaction-done"
    assert status["unforged_disks"] == ["scratch"]
    assert status["warnings"] == ["disk 'scratch' is not in the forge"]
    assert status["pause_ms"] == 12.5
    json.dumps(status, allow_nan=False)


def test_status_dict_nulls() -> None:
    status = make_record(activated_at=None, memory=None, disks=(make_disk(overlay_file=None),))
    status_dict = status.status_dict()
    assert status_dict["activated_at"] is None
    assert status_dict["memory_file"] is None
    assert status_dict["disks"][0]["overlay"] is None


def test_no_session_status_has_the_same_keys() -> None:
    none = no_session_status()
    assert none["state"] == "none"
    assert none.keys() == make_record().status_dict().keys()
    assert all(v in (None, []) for k, v in none.items() if k != "state")
    assert no_session_status() is not no_session_status()  # callers may change their copy


@given(records())
@settings(max_examples=50)
def test_status_dict_is_json_with_valid_state(record: SessionRecord) -> None:
    status = json.loads(json.dumps(record.status_dict(), allow_nan=False))
    assert status["state"] in {
        "creating",
        "active",
        "committing",
        "discarding",
        "committed",
        "discarded",
        "failed",
    }
    assert len(status["disks"]) == len(record.disks)


# --- malformed JSON ------------------------------------------------------------------------------


def assert_record_error(data: bytes) -> RecordError:
    with pytest.raises(RecordError) as info:
        SessionRecord.from_json(data)
    return info.value


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_garbage_bytes_give_record_error(data: bytes) -> None:
    assert_record_error(data)


@given(json_values)
@settings(max_examples=300)
def test_garbage_json_gives_record_error(value: object) -> None:
    assert_record_error(json.dumps(value).encode())


@given(json_values)
@settings(max_examples=200)
def test_garbage_with_a_valid_format_gives_record_error(value: object) -> None:
    obj = {"format": FORMAT_VERSION, "payload": value}
    if isinstance(value, dict):
        obj = {**value, "format": FORMAT_VERSION}
    assert_record_error(json.dumps(obj).encode())


def pick_container(data: st.DataObject, root: dict[str, Any]) -> Any:
    """Walk down from the root to some JSON object or list of the record, chosen by hypothesis."""
    node: Any = root
    while True:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        children = [v for _, v in items if isinstance(v, dict | list)]
        if not children or data.draw(st.booleans(), label="stop here"):
            return node
        node = data.draw(st.sampled_from(children), label="descend")


@given(records(), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_hand_edited_json_is_valid_or_record_error(
    record: SessionRecord, data: st.DataObject
) -> None:
    """Replace, delete or add anything anywhere: a valid record or a RecordError, nothing else."""
    obj = as_obj(record)
    node = pick_container(data, obj)
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if action == "replace" and keys:
        node[data.draw(st.sampled_from(keys))] = data.draw(json_values, label="new value")
    elif action == "delete" and keys:
        del node[data.draw(st.sampled_from(keys))]
    elif isinstance(node, dict):
        node[data.draw(st.text(max_size=10), label="new key")] = data.draw(json_values)
    else:
        node.append(data.draw(json_values, label="new item"))
    encoded = json.dumps(obj).encode()
    try:
        parsed = SessionRecord.from_json(encoded)
    except RecordError:
        return
    assert SessionRecord.from_json(parsed.to_json()) == parsed


@given(records(), st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_removing_or_adding_a_record_field_is_refused(
    record: SessionRecord, data: st.DataObject
) -> None:
    obj = as_obj(record)
    containers = [obj, obj["qemu"], *obj["disks"]]
    if obj["memory"] is not None:
        containers.append(obj["memory"])
    node = data.draw(st.sampled_from(containers))
    # Fields added to the format later may be absent (older records): removing one is not
    # refused (see test_a_record_from_before_a_field_was_added_loads_with_its_default).
    optional = ADDED_FIELDS["DiskRecord"] if node in obj["disks"] else frozenset()
    if node is obj:
        optional = ADDED_FIELDS.get("SessionRecord", frozenset())
    if data.draw(st.booleans(), label="remove"):
        del node[data.draw(st.sampled_from(sorted(set(node) - optional)))]
    else:
        key = data.draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in node))
        node[key] = data.draw(json_values)
    assert_record_error(json.dumps(obj).encode())


@given(records(), st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_bytes_are_valid_or_record_error(
    record: SessionRecord, data: st.DataObject
) -> None:
    raw = bytearray(record.to_json())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    try:
        parsed = SessionRecord.from_json(bytes(raw))
    except RecordError:
        return
    assert SessionRecord.from_json(parsed.to_json()) == parsed


def test_every_truncation_is_refused() -> None:
    data = make_record().to_json().rstrip()
    for cut in range(len(data)):
        assert_record_error(data[:cut])


def test_missing_fields_are_named() -> None:
    for field in ["format", *(f.name for f in attrs.fields(SessionRecord))]:
        if field in ADDED_FIELDS["SessionRecord"]:
            continue  # may be absent (an older record): see the test below
        obj = as_obj(make_record())
        del obj[field]
        error = assert_record_error(json.dumps(obj).encode())
        assert field in str(error)
    for nested, fields in (
        ("qemu", attrs.fields(QemuRecord)),
        ("memory", attrs.fields(MemoryRecord)),
    ):
        for f in fields:
            obj = as_obj(make_record())
            del obj[nested][f.name]
            assert f"{nested}.{f.name} is missing" in str(
                assert_record_error(json.dumps(obj).encode())
            )
    for f in attrs.fields(DiskRecord):
        if f.name in ADDED_FIELDS["DiskRecord"]:
            continue
        obj = as_obj(make_record())
        del obj["disks"][0][f.name]
        assert f"disks[0].{f.name} is missing" in str(assert_record_error(json.dumps(obj).encode()))


def test_a_record_from_before_a_field_was_added_loads_with_its_default() -> None:
    # A session enabled by an older forgeqmp 0.1 (format 1, without the later fields) survives
    # an upgrade: status, commit and discard can still read it.
    for cls, added in ADDED_FIELDS.items():
        for name in added:
            obj = as_obj(make_record())
            where = {"DiskRecord": obj["disks"][0], "SessionRecord": obj}[cls]
            del where[name]
            record = SessionRecord.from_json(json.dumps(obj).encode())
            target = record.disks[0] if cls == "DiskRecord" else record
            field = attrs.fields_dict(type(target))[name]
            assert getattr(target, name) == field.default


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda o: o.update(format=2), "format 2"),
        (lambda o: o.update(format="1"), "format must be an integer"),
        (lambda o: o.update(format=True), "format must be an integer"),
        (lambda o: o.update(format=1.0), "format must be an integer"),
        (lambda o: o.update(state="paused"), "state must be one of"),
        (lambda o: o.update(state="ACTIVE"), "state must be one of"),
        (lambda o: o.update(state=None), "state must be one of"),
        (lambda o: o.update(surprise=1), "unknown field(s) surprise"),
        (lambda o: o["qemu"].update(surprise=1), "unknown field(s) qemu.surprise"),
        (lambda o: o["disks"][0].update(extra=1), "disks[0].extra"),
        (lambda o: o["disks"][0].update(base_file="web1.qcow2"), "disks[0].base_file"),
        (lambda o: o["disks"][0].update(overlay_file="ov.qcow2"), "disks[0].overlay_file"),
        (lambda o: o["disks"][0].update(virtual_size="1G"), "disks[0].virtual_size"),
        (lambda o: o["disks"][0].update(virtual_size=1.5), "disks[0].virtual_size"),
        (lambda o: o["disks"][0].update(merged="false"), "disks[0].merged"),
        (lambda o: o["memory"].update(path="memory.bin"), "memory.path"),
        (lambda o: o["memory"].update(capabilities="x"), "memory.capabilities"),
        (lambda o: o["qemu"].update(cwd="vms"), "qemu.cwd"),
        (lambda o: o["qemu"].update(qmp_socket="qmp.sock"), "qemu.qmp_socket"),
        (lambda o: o["qemu"].update(argv={"0": "qemu"}), "qemu.argv"),
        (lambda o: o["qemu"].update(env=[["A", "b"]]), "qemu.env"),
        (lambda o: o["qemu"].update(env={"A": None}), "qemu.env"),
        (lambda o: o["qemu"].update(pid=-1), "qemu.pid"),
        (lambda o: o.update(disks=[]), "disks"),
        (lambda o: o.update(disks={}), "disks"),
        (lambda o: o.update(disks=[None]), "disks[0]"),
        (lambda o: o.update(memory=[]), "memory"),
        (lambda o: o.update(qemu=None), "qemu"),
        (lambda o: o.update(created_at=None), "created_at"),
        (lambda o: o.update(created_at="2024-05-01T12:00:00"), "created_at"),
        (lambda o: o.update(created_at="2024-05-01"), "created_at"),
        (lambda o: o.update(created_at="yesterday"), "created_at"),
        (lambda o: o.update(created_at=1714564800), "created_at"),
        (lambda o: o.update(activated_at="0001-01-01T00:00:00+01:00"), "activated_at"),
        (lambda o: o.update(pause_ms="12"), "pause_ms"),
        (lambda o: o.update(pause_ms=-3), "pause_ms"),
        (lambda o: o.update(memory_restored=0), "memory_restored"),
        (lambda o: o.update(warnings="one"), "warnings"),
        (lambda o: o.update(unforged_disks=["disk0"]), "unforged_disks"),
        (lambda o: o.update(session_id="x"), "session_id"),
        (lambda o: o.update(error=5), "error"),
        (lambda o: o.update(step=""), "step"),
    ],
)
def test_specific_hand_edits_are_refused_with_the_field_named(edit: Any, message: str) -> None:
    obj = as_obj(make_record())
    edit(obj)
    error = assert_record_error(json.dumps(obj).encode())
    assert message in str(error)
    assert "state dir" in str(error)  # every message says what to do


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",
        b"null",
        b"[]",
        b'"record"',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"format": 1, "format": 1}',
        b'{"format": NaN}',
        b'{"format": Infinity}',
        b'{"format": 1' + b"0" * 5000 + b"}",
    ],
)
def test_pathological_inputs_are_refused(data: bytes) -> None:
    assert_record_error(data)


def test_duplicate_keys_are_refused() -> None:
    text = make_record().to_json().decode()
    edited = text.replace('"state": "active",', '"state": "active",\n  "state": "failed",')
    assert "appears twice" in str(assert_record_error(edited.encode()))


def test_non_finite_pause_is_refused() -> None:
    text = make_record().to_json().decode()
    nan = text.replace('"pause_ms": 12.5', '"pause_ms": NaN')
    assert "NaN" in str(assert_record_error(nan.encode()))
    huge = text.replace('"pause_ms": 12.5', '"pause_ms": 1e400')  # parses as inf
    assert "pause_ms" in str(assert_record_error(huge.encode()))


def test_from_json_accepts_str() -> None:
    record = make_record()
    assert SessionRecord.from_json(record.to_json().decode()) == record


# --- RecordStore ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> RecordStore:
    state = StateDir(tmp_path / "state")
    state.ensure()
    return RecordStore(state)


def test_store_load_without_record_or_dir(tmp_path: Path, store: RecordStore) -> None:
    assert store.load() is None
    assert RecordStore(StateDir(tmp_path / "missing")).load() is None
    assert not (tmp_path / "missing").exists()


def test_store_save_and_load(store: RecordStore) -> None:
    record = make_record()
    store.save(record)
    assert store.path == store.state_dir.path / RECORD_FILE
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.load() == record
    updated = advance(record, Event.COMMIT, step=CommitStep.COMMITTING)
    store.save(updated)
    assert store.load() == updated
    assert os.listdir(store.state_dir.path) == [RECORD_FILE]


def test_store_refuses_to_overwrite_another_session(store: RecordStore) -> None:
    store.save(make_record())
    other = make_record(session_id=new_session_id())
    with pytest.raises(SessionActive, match="3f2a9c1e"):
        store.save(other)
    assert store.load() == make_record()
    store.save(other, force=True)
    assert store.load() == other


def test_store_refuses_to_overwrite_an_unreadable_record(store: RecordStore) -> None:
    store.path.write_bytes(b"{broken")
    with pytest.raises(RecordError):
        store.save(make_record())
    assert store.path.read_bytes() == b"{broken"


def test_store_load_names_the_file(store: RecordStore) -> None:
    store.path.write_bytes(b'{"format": 1}')
    with pytest.raises(RecordError, match=str(store.path)):
        store.load()


def test_store_refuses_a_symlinked_record(store: RecordStore, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(make_record().to_json())
    store.path.symlink_to(target)
    with pytest.raises(RecordError, match="symlink"):
        store.load()


def test_store_archive(store: RecordStore) -> None:
    assert store.archive() is None
    active = make_record()
    store.save(active)
    with pytest.raises(SessionActive, match="active, not finished"):
        store.archive()
    committed = attrs.evolve(active, state=State.COMMITTED, finished_at=T0 + timedelta(minutes=1))
    store.save(committed)
    archived = store.archive()
    assert archived == store.state_dir.path / f"session-{active.session_id}.json"
    assert store.load() is None
    assert SessionRecord.from_json(archived.read_bytes()) == committed
    assert stat.S_IMODE(os.stat(archived).st_mode) == 0o600
    # a new session can start; history is kept
    second = make_record(session_id=new_session_id())
    store.save(second)
    assert store.load() == second
    failed = attrs.evolve(second, state=State.FAILED)
    store.save(failed)
    with pytest.raises(SessionActive):
        store.archive()
    assert store.archive(force=True) == store.state_dir.path / f"session-{second.session_id}.json"
    assert sorted(os.listdir(store.state_dir.path)) == sorted(
        [f"session-{active.session_id}.json", f"session-{second.session_id}.json"]
    )


def test_store_archive_completes_after_a_crash(store: RecordStore) -> None:
    record = make_record(state=State.DISCARDED, memory_restored=True)
    store.save(record)
    archived = store.state_dir.path / RecordStore.archive_name(record.session_id)
    os.link(store.path, archived)  # the crash hit between link and unlink
    assert store.archive() == archived
    assert os.listdir(store.state_dir.path) == [archived.name]


def test_store_archive_never_overwrites_history(store: RecordStore) -> None:
    record = make_record(state=State.COMMITTED)
    archived = store.state_dir.path / RecordStore.archive_name(record.session_id)
    archived.write_bytes(b"older history")
    store.save(record)
    with pytest.raises(RecordError, match="taken by a different file"):
        store.archive()
    assert archived.read_bytes() == b"older history"
    assert store.load() == record


def test_archived_records_are_kept_up_to_the_retention_limit(store: RecordStore) -> None:
    """Old session records do not pile up: after each archive only the KEEP_ARCHIVES newest
    stay; files forgeqmp did not name, and the current record, are never touched."""
    directory = store.state_dir.path
    store.state_dir.ensure()
    foreign = directory / "session-notes.json"
    foreign.write_text("mine")
    ids = [new_session_id() for _ in range(KEEP_ARCHIVES + 5)]
    for i, sid in enumerate(ids):
        store.save(make_record(session_id=sid, state=State.COMMITTED), force=True)
        os.utime(store.path, ns=(10**18 + i, 10**18 + i))  # archived in this order
        store.archive()
    kept = [p.name for p in store.archives()]
    assert kept == [f"session-{sid}.json" for sid in ids[-KEEP_ARCHIVES:]]
    assert foreign.read_text() == "mine"
    # The current record is not an archive; keep=0 removes every archive, nothing else.
    store.save(make_record(state=State.ACTIVE), force=True)
    assert len(store.prune_archives(keep=0)) == KEEP_ARCHIVES
    assert store.archives() == []
    assert store.load() is not None
    assert foreign.exists()
    with pytest.raises(ValueError, match="keep"):
        store.prune_archives(keep=-1)
