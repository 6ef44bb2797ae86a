"""The discard plan is pure data: the capabilities the load turns on and off again, the URI of
the memory file (the enable plan's one builder: ``file:`` with an fdset where QEMU has it, ``fd:``
on 7.2, ``file:`` for mapped-ram), the fdset's release, read for records enable writes on each
recorded QEMU build and checked against that build's QMP schema."""

from __future__ import annotations

import attrs
import pytest
from forged import SID, VERSIONS, accepted, forge

from forgeqmp.core.names import RESTORE_FD_NAME
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.common import (
    CONT,
    QUERY_MACHINE_TYPE,
    QUERY_MIGRATE,
    QUERY_MIGRATE_PARAMETERS,
    QUIT,
)
from forgeqmp.core.plans.discard import (
    DEFAULT_MULTIFD_CHANNELS,
    RESTORE_MULTIFD_CHANNELS,
    RestorePlan,
    plan_restore,
)
from forgeqmp.core.plans.enable import Strategy, Transport, migration_uri

#: Every strategy each build can save with (7.2 has no mapped-ram: test_plan_enable).
CASES = [
    (version, strategy)
    for version in VERSIONS
    for strategy in Strategy
    if not (version == "7.2" and strategy is Strategy.MAPPED_RAM)
]


def caps(command: Command) -> list[tuple[str, bool]]:
    assert command.name == "migrate-set-capabilities"
    return [(c["capability"], c["state"]) for c in command.arguments["capabilities"]]


def test_precopy_on_10_loads_from_an_fdset_file_with_only_the_events_on() -> None:
    _, record = forge("10.0", strategy=Strategy.PRECOPY)
    plan = plan_restore(record)
    assert plan.transport is Transport.FDSET_FILE
    assert plan.uses_fdset
    assert plan.memory_file == "/state/memory.bin"
    # pause-before-switchover was the save's: the load needs none of it.
    assert caps(plan.set_capabilities()) == [("events", True)]
    assert caps(plan.reset_capabilities()) == [("events", False)]
    assert plan.migrate_incoming(5) == Command("migrate-incoming", {"uri": "file:/dev/fdset/5"})
    assert plan.release(5) == Command("remove-fd", {"fdset-id": 5})
    # After cont: the file given back first, then QEMU's default migration settings.
    assert plan.after_resume(5) == (plan.release(5), plan.reset_capabilities())
    # No multifd: the channel count is neither set nor set back.
    assert plan.multifd_channels is None
    assert plan.set_parameters() is None
    assert plan.after_resume(5, {"multifd-channels": 7}) == plan.after_resume(5)
    assert plan.fdset_opaque == f"forgeqmp {SID}"


def test_precopy_on_72_loads_from_the_fd_passed_by_name() -> None:
    _, record = forge("7.2")
    plan = plan_restore(record)
    assert plan.transport is Transport.FD
    assert not plan.uses_fdset
    assert plan.migrate_incoming(None) == Command(
        "migrate-incoming", {"uri": f"fd:{RESTORE_FD_NAME}"}
    )
    assert plan.release(None) is None  # the load closes a getfd descriptor itself
    assert plan.after_resume(None) == (plan.reset_capabilities(),)
    assert caps(plan.set_capabilities()) == [("events", True)]


def test_mapped_ram_is_loaded_with_the_capabilities_it_was_saved_with() -> None:
    _, record = forge("10.0", strategy=Strategy.MAPPED_RAM)
    assert set(record.memory.capabilities) >= {"mapped-ram", "multifd"}  # type: ignore[union-attr]
    plan = plan_restore(record)
    assert caps(plan.set_capabilities()) == [
        ("events", True),
        ("mapped-ram", True),
        ("multifd", True),
    ]
    assert caps(plan.reset_capabilities()) == [
        ("events", False),
        ("mapped-ram", False),
        ("multifd", False),
    ]
    assert plan.migration_uri(2) == "file:/dev/fdset/2"
    # Loaded on more channels than QEMU's 2 (faster), and the count the QEMU had set back last.
    assert plan.set_parameters() == Command(
        "migrate-set-parameters", {"multifd-channels": RESTORE_MULTIFD_CHANNELS}
    )
    assert RESTORE_MULTIFD_CHANNELS > DEFAULT_MULTIFD_CHANNELS
    back = Command("migrate-set-parameters", {"multifd-channels": 6})
    assert plan.after_resume(2, {"multifd-channels": 6, "downtime-limit": 300}) == (
        plan.release(2),
        plan.reset_capabilities(),
        back,
    )
    default = Command("migrate-set-parameters", {"multifd-channels": DEFAULT_MULTIFD_CHANNELS})
    assert plan.after_resume(2)[-1] == default  # parameters not read: QEMU's default
    with pytest.raises(ValueError, match="fdset"):
        plan.migrate_incoming(None)  # mapped-ram needs file:, never fd:


@pytest.mark.parametrize(("version", "strategy"), CASES)
def test_the_uri_is_the_enable_plans_one(version: str, strategy: Strategy) -> None:
    enable, record = forge(version, strategy=strategy)
    restore = plan_restore(record)
    assert restore.transport is enable.transport
    fdset = 9 if restore.uses_fdset else None
    assert restore.migration_uri(fdset) == migration_uri(
        enable.transport, fdset_id=fdset, fd_name=RESTORE_FD_NAME
    )
    if enable.transport is Transport.FDSET_FILE:  # the same file: URI as the save's
        assert restore.migration_uri(fdset) == enable.migration_uri(fdset)


@pytest.mark.parametrize(("version", "strategy"), CASES)
def test_every_command_of_the_discard_is_one_the_build_accepts(
    version: str, strategy: Strategy
) -> None:
    _, record = forge(version, strategy=strategy)
    plan = plan_restore(record)
    fdset = 1 if plan.uses_fdset else None
    commands = [
        QUERY_MACHINE_TYPE,
        QUIT,
        plan.set_capabilities(),
        QUERY_MIGRATE_PARAMETERS,
        *(() if plan.set_parameters() is None else (plan.set_parameters(),)),
        plan.migrate_incoming(fdset),
        QUERY_MIGRATE,
        CONT,
        *plan.after_resume(fdset, {"multifd-channels": 2}),
    ]
    for command in commands:
        assert accepted(version, command), command


def test_a_transport_the_plan_does_not_know_loads_by_fd_as_before() -> None:
    _, record = forge("10.0")
    assert record.memory is not None
    old = attrs.evolve(record, memory=attrs.evolve(record.memory, transport="fd"))
    assert plan_restore(old).transport is Transport.FD


def test_a_record_without_a_memory_file_has_no_restore() -> None:
    _, record = forge("10.0")
    with pytest.raises(ValueError, match="no memory file"):
        plan_restore(attrs.evolve(record, memory=None))


def test_the_plan_is_a_frozen_value() -> None:
    _, record = forge("10.0")
    plan = plan_restore(record)
    assert plan == plan_restore(record)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        plan.fd_name = "x"  # type: ignore[misc]
    assert isinstance(plan, RestorePlan)
