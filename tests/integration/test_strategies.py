"""Every memory-save strategy a QEMU build offers, on real QEMU: enable with it, change the disk,
discard → the guest resumes from that strategy's memory file on the reverted disk. A strategy the
build lacks is refused up front with nothing changed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import forgeqmp
from forgeqmp.core.plans.enable import Strategy, choose_strategy

from .helpers import block_graph, discard, enable, features, files_under, qmp, run

pytestmark = pytest.mark.qemu


def _supported(offered: forgeqmp.Features) -> list[Strategy]:
    usable = []
    for strategy in Strategy:
        try:
            choose_strategy(offered, strategy)
        except forgeqmp.FeatureMissing:
            continue
        usable.append(strategy)
    return usable


def test_each_offered_strategy_round_trips(qemu_factory, qemu_build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vm = qemu_factory(memory_mib=256)
    offered = run(features, vm.qmp_socket)
    usable = _supported(offered)
    # What the feature probe must offer on the two supported builds (not derived from versions
    # in the code: asserted here so a regression in the probe shows).
    expected = {Strategy.PRECOPY, Strategy.BACKGROUND_SNAPSHOT}
    if qemu_build.version_tuple >= (9, 0, 0):
        expected.add(Strategy.MAPPED_RAM)
    assert set(usable) == expected

    before = vm.write_disk("disk0", 4, seed="before")
    parameters = run(qmp, vm.qmp_socket, "query-migrate-parameters")
    for i, strategy in enumerate(usable):
        state = tmp_path / f"state-{i}"
        _boot, at_enable = vm.wait_counter()
        record = run(enable, vm.qmp_socket, state, strategy=strategy)
        assert record.strategy == strategy.value
        assert record.state is forgeqmp.State.ACTIVE
        assert record.pause_ms is not None
        assert record.memory is not None
        assert record.memory.digest is not None
        vm.write_disk("disk0", 4, seed=f"after-{strategy.value}")
        _boot, later = vm.wait_counter(min_value=at_enable + 20)

        asked = time.monotonic()
        done = run(discard, vm.qmp_socket, state)
        assert done.state is forgeqmp.State.DISCARDED
        assert done.memory_restored is True, done.error
        (boot, last), (resumed_boot, resumed) = vm.wait_counter_rewind(since=asked)
        assert resumed_boot == boot, (strategy, boot, resumed_boot)  # not a cold boot
        assert last >= later, (strategy, last, later)  # the old guest ran up to the discard
        assert at_enable <= resumed < later, (strategy, at_enable, resumed, later)
        assert vm.disk_md5("disk0", 4) == before, strategy
        # The restored VM's migration settings are QEMU's defaults again, not the restore's.
        caps = run(qmp, vm.qmp_socket, "query-migrate-capabilities")
        assert [c["capability"] for c in caps if c["state"]] == [], strategy
        # Its parameters too (a mapped-ram load runs on more multifd channels: set back).
        assert run(qmp, vm.qmp_socket, "query-migrate-parameters") == parameters, strategy

    # What the build lacks (mapped-ram on 7.2) is refused before anything changes.
    graph = block_graph(vm.qmp_socket)
    files = files_under(vm.workdir, tmp_path)
    for strategy in set(Strategy) - set(usable):
        with pytest.raises(forgeqmp.FeatureMissing, match=strategy.value):
            run(enable, vm.qmp_socket, tmp_path / "refused", strategy=strategy)
    assert block_graph(vm.qmp_socket) == graph
    # The state dir may hold the instance's lock file, nothing else.
    new = files_under(vm.workdir, tmp_path) - files
    assert {Path(p).name for p in new} <= {"lock"}, new
