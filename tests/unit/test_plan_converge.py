"""The write bound of a live commit that does not converge (issue 14), as data: when a disk's
guest writes get bounded, how hard, what is sent to QEMU (checked against each recorded build's
schema), that the platform's own throttle is recorded and set back exactly, and what recover
plans for a commit killed while a bound was on."""

from __future__ import annotations

from typing import Any

import pytest
from forged import VERSIONS, accepted
from records import make_disk
from test_recover import TAG, disk, files_of, qemu_on, record  # the recover tests' d0, d1

from forgeqmp.adapters import crashpoints
from forgeqmp.core import names
from forgeqmp.core.plans import converge as cv
from forgeqmp.core.reconcile import (
    JobView,
    Observation,
    RestoreThrottle,
    Where,
    reconcile,
)
from forgeqmp.core.states import State
from forgeqmp.core.steps import ThrottleStep

MIB = 1 << 20
QDEV = "/machine/peripheral/d0/virtio-backend"
#: A platform's throttle as query-block reports it (a group of its own, reads and writes limited).
PLATFORM: dict[str, Any] = {
    "bps": 0,
    "bps_rd": 50 * MIB,
    "bps_wr": 20 * MIB,
    "iops": 0,
    "iops_rd": 0,
    "iops_wr": 5000,
    "bps_wr_max": 40 * MIB,
    "bps_wr_max_length": 2,
    "iops_size": 4096,
    "group": "plat",
}


def samples(*points: tuple[float, int, int]) -> list[cv.JobSample]:
    return [cv.JobSample(at, done, total) for at, done, total in points]


def keeping_pace(rate: int, seconds: int = 4) -> list[cv.JobSample]:
    """A job that copies each guest write as it comes: 100 % at every look, never ready (QEMU
    wants nothing dirty and nothing in flight at once), ``rate`` bytes/s copied and dirtied."""
    return samples(*((float(t), 4 * MIB + rate * t, 4 * MIB + rate * t) for t in range(seconds)))


def outwritten(copy: int, seconds: int = 4) -> list[cv.JobSample]:
    """A job copying ``copy`` bytes/s while the guest re-dirties as much: 4 MiB stay left."""
    return samples(*((float(t), copy * t, 4 * MIB + copy * t) for t in range(seconds)))


# --- when ----------------------------------------------------------------------------------------


def test_no_decision_before_a_full_window() -> None:
    short = keeping_pace(10 * MIB, seconds=2)  # one second of samples
    assert cv.converging(short, 100.0) is None
    assert not cv.needs_bound(short, 100.0, None)


@pytest.mark.parametrize("history", [keeping_pace(100 * MIB), outwritten(2 * MIB)])
def test_a_job_the_guest_keeps_from_ready_gets_bounded(history: list[cv.JobSample]) -> None:
    # Also at 100 %: a job that keeps pace but is never clean at the instant it looks is no
    # nearer to ready than one that falls behind.
    assert cv.converging(history, 600.0) is False
    assert cv.needs_bound(history, 600.0, None)


def test_a_converging_job_is_left_alone() -> None:
    history = samples((0.0, 0, 64 * MIB), (1.0, 20 * MIB, 66 * MIB), (2.0, 40 * MIB, 68 * MIB))
    assert cv.converging(history, 600.0) is True
    assert not cv.needs_bound(history, 600.0, None)


def test_a_copy_merely_slow_does_not_slow_the_guest() -> None:
    # The guest writes nothing: slowing it would not make the job faster.
    history = samples((0.0, 0, 64 * MIB), (1.0, MIB, 64 * MIB), (2.0, 2 * MIB, 64 * MIB))
    assert cv.converging(history, 10.0) is False
    assert not cv.needs_bound(history, 10.0, None)


def test_a_job_resting_between_bursts_is_not_tightened() -> None:
    # QEMU shows nothing new while the job rests (its speed limit, a stalled host): no copy
    # measured, no decision under a bound.
    history = samples((0.0, 4 * MIB, 4 * MIB), (1.0, 4 * MIB, 4 * MIB), (2.5, 4 * MIB, 4 * MIB))
    assert not cv.needs_bound(history, 100.0, (cv.HARD_WRITE_BPS, cv.HARD_WRITE_IOPS))


# --- how hard ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [2 * MIB, 100 * MIB, 2000 * MIB])
def test_the_first_bound_is_hard_whatever_the_rate_qemu_shows(rate: int) -> None:
    # While the job keeps pace the rate QEMU shows is the guest's own: a bound derived from it
    # would be as loose as the guest is fast. The first bound is the hard one (or lower).
    bps, iops = cv.first_bound(rate)
    assert 0 < bps <= cv.HARD_WRITE_BPS
    assert 0 < iops <= cv.HARD_WRITE_IOPS
    assert (bps, iops) == (cv.HARD_WRITE_BPS, cv.HARD_WRITE_IOPS) or rate < 8 * MIB


@pytest.mark.parametrize("rate", [64 << 10, 256 << 10, MIB, 2 * MIB, 4 * MIB, 100 * MIB])
def test_under_the_first_bound_the_guest_dirties_at_most_half_the_copy(rate: int) -> None:
    # Each write dirties its bytes plus at most two granules: the remaining bytes shrink at
    # least at half the copy rate, and most copies end before the next write comes. Every
    # copy of at least 4 MiB/s is covered by the hard bound itself.
    bps, iops = cv.first_bound(rate)
    dirtied = bps + iops * 2 * cv.MAX_GRANULARITY
    assert dirtied <= max(rate, 4 * MIB) / 2 or bps == cv.MIN_WRITE_BPS


def test_the_hard_bound_is_a_slowdown_not_a_pause() -> None:
    assert cv.HARD_WRITE_BPS >= 64 << 10
    assert cv.HARD_WRITE_IOPS >= 1


def test_a_bound_that_did_not_hold_is_halved_down_to_a_floor() -> None:
    bound = cv.first_bound(100 * MIB)
    seen = [bound]
    for _ in range(40):
        bound = cv.tighter(bound)
        seen.append(bound)
    assert seen[1] == (cv.HARD_WRITE_BPS // 2, cv.HARD_WRITE_IOPS // 2)
    assert seen[-1] == (cv.MIN_WRITE_BPS, 1)
    assert all(b[0] >= cv.MIN_WRITE_BPS and b[1] >= 1 for b in seen)


# --- what is sent --------------------------------------------------------------------------------


def test_the_platform_throttle_is_read_whole() -> None:
    inserted = {**PLATFORM, "node-name": "d0-fmt", "ro": False, "detect_zeroes": "off"}
    assert cv.platform_limits(inserted) == PLATFORM
    assert cv.platform_limits({"node-name": "d0-fmt"}) == dict.fromkeys(
        ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"), 0
    )


def test_the_bound_only_tightens_the_platform_writes_in_a_group_of_its_own() -> None:
    group = names.throttle_group("3f2a9c1e-4b7d-4e8a-9c3b-2d1e0f9a8b7c", 0)
    limits = cv.bounded_limits(PLATFORM, (cv.HARD_WRITE_BPS, cv.HARD_WRITE_IOPS), group)
    assert limits["group"] == group != PLATFORM["group"]
    assert limits["bps_rd"] == PLATFORM["bps_rd"]  # reads as the platform has them
    assert limits["bps_wr"] == cv.HARD_WRITE_BPS
    assert limits["iops_wr"] == cv.HARD_WRITE_IOPS
    assert limits["bps_wr_max"] == 0  # no burst above the bound
    # Never looser than the platform's own write limit.
    tight = {**PLATFORM, "bps_wr": 100 << 10, "iops_wr": 2}
    bounded = cv.bounded_limits(tight, (cv.HARD_WRITE_BPS, cv.HARD_WRITE_IOPS), group)
    assert (bounded["bps_wr"], bounded["iops_wr"]) == (100 << 10, 2)
    # A platform limit on reads and writes together is lowered itself (QEMU refuses a total
    # with a per-direction limit).
    total = {"bps": 10 * MIB, "bps_rd": 0, "bps_wr": 0, "iops": 100, "iops_rd": 0, "iops_wr": 0}
    both = cv.bounded_limits(total, (cv.HARD_WRITE_BPS, cv.HARD_WRITE_IOPS), group)
    assert (both["bps"], both["iops"], both["bps_wr"], both["iops_wr"]) == (
        cv.HARD_WRITE_BPS,
        cv.HARD_WRITE_IOPS,
        0,
        0,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_the_throttle_commands_are_ones_the_build_accepts(version: str) -> None:
    group = names.throttle_group("3f2a9c1e-4b7d-4e8a-9c3b-2d1e0f9a8b7c", 1)
    bound = cv.set_throttle(QDEV, cv.bounded_limits(PLATFORM, cv.first_bound(MIB), group))
    back = cv.set_throttle(QDEV, PLATFORM)
    none = cv.set_throttle(QDEV, cv.platform_limits({}))
    for command in (bound, back, none):
        assert accepted(version, command), command
    assert back.arguments == {"id": QDEV, **PLATFORM}  # exactly the platform's again
    assert none.arguments == {"id": QDEV, **dict.fromkeys(cv.THROTTLE_KEYS[:6], 0)}


def test_the_speed_hook_is_off_unless_both_test_variables_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(crashpoints.ENABLE_ENV, raising=False)
    monkeypatch.setenv(crashpoints.SPEED_ENV, "1000")
    assert crashpoints.commit_speed() is None
    monkeypatch.setenv(crashpoints.ENABLE_ENV, "1")
    assert crashpoints.commit_speed() == 1000
    for bad in ("0", "-5", "fast", ""):
        monkeypatch.setenv(crashpoints.SPEED_ENV, bad)
        assert crashpoints.commit_speed() is None
    assert crashpoints.CONDITIONAL_STEPS["commit"] == tuple(s.value for s in ThrottleStep)


# --- recover after a kill ------------------------------------------------------------------------


def _committing(throttle: dict[str, Any] | None, **record_changes: Any) -> Any:
    disks = (disk(0, merged=True, commit_job=f"{TAG}-0-commit", throttle=throttle), disk(1))
    return record(State.COMMITTING, step="committing", disks=disks, **record_changes)


def test_a_commit_killed_while_bounding_gets_the_platform_throttle_back() -> None:
    # Whichever step the kill came at (recorded, applied, set back but still recorded: the
    # record says all three with the disk's throttle alone), the same QEMU gets exactly the
    # recorded limits, after the merge the bound was helping, and the record forgets them.
    rec = _committing(PLATFORM)
    jobs = (JobView(f"{TAG}-0-commit", "commit", "running"),)
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY, jobs=jobs), files_of(rec)))
    restores = [a for a in plan.actions if isinstance(a, RestoreThrottle)]
    assert restores == [RestoreThrottle("d0", rec.disks[0].qdev, tuple(PLATFORM.items()))]
    assert restores[0].commands() == (cv.set_throttle(rec.disks[0].qdev, PLATFORM),)
    kinds = [type(a).__name__ for a in plan.actions]
    assert kinds.index("FinishJob") < kinds.index("RestoreThrottle")
    assert all(d.throttle is None for d in plan.record.disks)
    assert any("throttle" in f for f in plan.findings)


def test_a_restarted_qemu_has_no_bound_of_ours_to_take_back() -> None:
    rec = _committing(PLATFORM)
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY, pid=5151), files_of(rec)))
    assert not [a for a in plan.actions if isinstance(a, RestoreThrottle)]
    assert all(d.throttle is None for d in plan.record.disks)


def test_a_commit_that_never_bounded_plans_no_throttle() -> None:
    rec = _committing(None)
    jobs = (JobView(f"{TAG}-0-commit", "commit", "running"),)
    plan = reconcile(rec, Observation(qemu_on(rec, Where.OVERLAY, jobs=jobs), files_of(rec)))
    assert not [a for a in plan.actions if isinstance(a, RestoreThrottle)]


def test_the_throttle_field_survives_json_and_old_records_load_without_it() -> None:
    from forgeqmp.core.record import ADDED_FIELDS

    assert "throttle" in ADDED_FIELDS["DiskRecord"]
    disk = make_disk(0, throttle=PLATFORM)
    assert dict(disk.throttle or {}) == PLATFORM
