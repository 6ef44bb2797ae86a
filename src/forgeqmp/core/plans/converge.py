"""A live commit that always finishes: when a disk's ``block-commit`` does not converge, the
guest's writes to that disk are bounded below the copy rate until the disk is merged (sans-IO).

Why: the active commit copies what the overlay holds into the original while the guest keeps
writing into the overlay; every guest write dirties what it touches again. QEMU has no mode in
which ``block-commit`` blocks the guest's writes, so a guest that dirties faster than the job
copies keeps the job from ever becoming ``ready``, and the commit would only end at its
deadline.

What: the commit samples each job's ``offset`` (copied) and ``len`` (copied + still dirty)
while it waits for ``ready``. Once the remaining bytes do not shrink fast enough to be ready in
:data:`DEADLINE_SHARE` of the time left (:func:`converging`) while the guest dirties a real
share of what the job copies (:func:`needs_bound`), it bounds the guest's writes on that
device's BlockBackend with ``block_set_io_throttle``, hard and at once (:func:`first_bound`):
at most :data:`HARD_WRITE_BPS` and :data:`HARD_WRITE_IOPS`, and lower still when the copy
measured is slow (:func:`write_bound`: the guest then dirties at most half of it, a quarter in
bytes and a quarter in extra bitmap granules, :data:`MAX_GRANULARITY`).

Why hard at once rather than from the copy rate: while the job keeps pace with the guest, the
rate QEMU shows *is* the guest's write rate, so a bound derived from it starts as loose as the
guest is fast, and halving from there takes many windows. And keeping pace is not enough: QEMU
makes the job ``ready`` only at an instant when nothing is dirty and nothing is in flight, so a
guest whose every write lands before the job finished copying the previous one keeps it from
ready for ever, even at a trickle (the job shows 100 % and waits). Under the hard bound the
guest's writes are few and small, so the remaining bytes shrink at nearly the full copy rate
and most copies of a write end before the next write arrives: the job becomes ready within
about ``remaining / copy rate`` plus a few of those copies (measured: seconds). Should a window
under the bound still see the guest dirty more than half of what the job copies (the copy
slowed), the bound is halved (:func:`tighter`, down to :data:`MIN_WRITE_BPS` and one write a
second). The guest is never paused for that: its writes to that disk are slowed, its reads are
not, and the switch at the end is the usual pause of milliseconds.

The platform's own throttle is read from ``query-block`` first and recorded (the disk's
``throttle`` field) before forgeqmp's is applied; the bound never loosens it (each limit is the
smaller of the two), forgeqmp's uses a throttle group of its own (so a group the device shares
with other devices is not changed), and once the disk is merged, or the commit stops, exactly
the platform's values (and group) are set back. A throttle left applied by a killed commit is
put back the same way by recover.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from forgeqmp.core.plans.command import Command

__all__ = [
    "DEADLINE_SHARE",
    "HARD_WRITE_BPS",
    "HARD_WRITE_IOPS",
    "MAX_GRANULARITY",
    "MIN_WRITE_BPS",
    "THROTTLE_KEYS",
    "WINDOW_S",
    "JobSample",
    "bounded_limits",
    "converging",
    "copy_rate",
    "dirty_rate",
    "first_bound",
    "needs_bound",
    "platform_limits",
    "set_throttle",
    "tighter",
    "write_bound",
]

#: The limits ``block_set_io_throttle`` takes and ``query-block`` reports (``inserted``), every
#: one of which is recorded and set back; the first six are the command's required arguments.
THROTTLE_KEYS: Final = (
    "bps",
    "bps_rd",
    "bps_wr",
    "iops",
    "iops_rd",
    "iops_wr",
    "bps_max",
    "bps_rd_max",
    "bps_wr_max",
    "iops_max",
    "iops_rd_max",
    "iops_wr_max",
    "bps_max_length",
    "bps_rd_max_length",
    "bps_wr_max_length",
    "iops_max_length",
    "iops_rd_max_length",
    "iops_wr_max_length",
    "iops_size",
    "group",
)
_REQUIRED: Final = THROTTLE_KEYS[:6]
#: The largest dirty-bitmap granule QEMU uses for a commit job (its default granularity is the
#: target's cluster size clamped to 4 KiB .. 64 KiB): a guest write of ``n`` bytes dirties at
#: most ``n + 2 * MAX_GRANULARITY`` bytes.
MAX_GRANULARITY: Final = 64 << 10
#: The job must be able to become ready within this share of the time left to the deadline.
DEADLINE_SHARE: Final = 0.5
#: The samples a decision is made on span at least this long (s).
WINDOW_S: Final = 2.0
#: The lowest write bound (bytes/s): below, the job cannot copy anyway.
MIN_WRITE_BPS: Final = 4096
#: The first bound of a disk found not converging, bytes/s and writes/s: a guest held to it
#: dirties at most 1 MiB/s (its bytes plus two granules a write), far below any copy rate a
#: commit would otherwise finish with, so the job becomes ready within seconds of the bound.
HARD_WRITE_BPS: Final = 512 << 10
HARD_WRITE_IOPS: Final = 4


@attrs.frozen
class JobSample:
    """One ``query-jobs`` reading of a commit job: when (monotonic s), bytes copied
    (``current-progress``) and copied + still to copy (``total-progress``)."""

    at: float
    done: int
    total: int

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done)


def _window(samples: Sequence[JobSample]) -> tuple[JobSample, JobSample] | None:
    """The first and last sample of the last :data:`WINDOW_S` (None: not that long yet)."""
    if len(samples) < 2:
        return None
    last = samples[-1]
    first = next((s for s in reversed(samples) if last.at - s.at >= WINDOW_S), None)
    return None if first is None else (first, last)


def copy_rate(samples: Sequence[JobSample]) -> float | None:
    """Bytes/s the job copied over the last window; None: no full window yet."""
    window = _window(samples)
    if window is None:
        return None
    first, last = window
    return max(0.0, (last.done - first.done) / (last.at - first.at))


def converging(samples: Sequence[JobSample], time_left: float) -> bool | None:
    """Whether the job, at the pace of the last window, becomes ready within
    :data:`DEADLINE_SHARE` of ``time_left`` (s). None: no full window yet (no decision)."""
    window = _window(samples)
    if window is None:
        return None
    first, last = window
    # No shortcut for a sample with nothing left: a job that copies each write as it comes is
    # at zero between two writes and still never ready (QEMU needs nothing dirty and nothing in
    # flight at once); a job about to be ready is ready before the window ends.
    shrink = (first.remaining - last.remaining) / (last.at - first.at)
    if shrink <= 0:
        return False
    return last.remaining / shrink <= DEADLINE_SHARE * max(0.0, time_left)


def dirty_rate(samples: Sequence[JobSample]) -> float | None:
    """Bytes/s the guest dirtied anew over the last window (the growth of the job's total);
    None: no full window yet."""
    window = _window(samples)
    if window is None:
        return None
    first, last = window
    return max(0.0, (last.total - first.total) / (last.at - first.at))


def needs_bound(
    samples: Sequence[JobSample], time_left: float, bound: tuple[int, int] | None
) -> bool:
    """Whether the guest's writes must be bounded (more tightly, when ``bound`` is already
    applied) for the job to become ready in time: it does not converge fast enough
    (:func:`converging`) *and* the guest dirties a real share of what the job copies: more than
    an eighth before any bound (a copy merely too slow for the deadline is not helped by
    slowing the guest), more than half under one (the bound did not hold it: the copy slowed)."""
    if converging(samples, time_left) is not False:
        return False
    copied, dirtied = copy_rate(samples), dirty_rate(samples)
    if copied is None or dirtied is None or copied <= 0:
        return False
    return dirtied > copied / (8 if bound is None else 2)


def write_bound(rate: float) -> tuple[int, int]:
    """The guest's write bound (bytes/s, writes/s) under which it dirties at most half of
    ``rate`` (the copy rate, bytes/s): a quarter in bytes, a quarter in extra granules."""
    quarter = rate / 4
    return max(MIN_WRITE_BPS, int(quarter)), max(1, int(quarter // (2 * MAX_GRANULARITY)))


def first_bound(rate: float) -> tuple[int, int]:
    """The bound (bytes/s, writes/s) a disk's guest writes get as soon as its merge is found not
    converging: the hard one (:data:`HARD_WRITE_BPS`, :data:`HARD_WRITE_IOPS`), or the one
    derived from ``rate`` (the copy rate measured, bytes/s; :func:`write_bound`) when that is
    lower (a copy slower than the hard bound assumes)."""
    bps, iops = write_bound(rate)
    return min(bps, HARD_WRITE_BPS), min(iops, HARD_WRITE_IOPS)


def tighter(bound: tuple[int, int]) -> tuple[int, int]:
    """The next bound when the last one did not make the job converge: half of it."""
    bps, iops = bound
    return max(MIN_WRITE_BPS, bps // 2), max(1, iops // 2)


def platform_limits(inserted: Mapping[str, Any]) -> dict[str, int | str]:
    """The throttle a device has now, from its ``query-block`` entry's ``inserted`` (the
    platform's, recorded before forgeqmp changes it): every limit it reports, zeros when it has
    none."""
    limits: dict[str, int | str] = {k: 0 for k in _REQUIRED}
    for key in THROTTLE_KEYS:
        value = inserted.get(key)
        if key == "group":
            if isinstance(value, str) and value:
                limits[key] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            limits[key] = value
    return limits


def _min_limit(platform: int | str | None, ours: int) -> int:
    """The smaller of two limits, where 0 (or absent) means none."""
    if isinstance(platform, int) and platform > 0:
        return min(platform, ours)
    return ours


def bounded_limits(
    platform: Mapping[str, int | str], bound: tuple[int, int], group: str
) -> dict[str, int | str]:
    """The limits forgeqmp sets while a disk merges: the platform's, with writes bounded by
    ``bound`` (bytes/s, writes/s) and never looser than the platform's own; in forgeqmp's own
    throttle ``group``. A platform limit on reads and writes together (``bps``, ``iops``, which
    QEMU does not combine with per-direction ones) is itself lowered to the bound; write bursts
    are dropped (a burst would exceed the bound)."""
    bps, iops = bound
    limits: dict[str, int | str] = {
        k: v for k, v in platform.items() if k in THROTTLE_KEYS and k != "group"
    }
    for total, write, value in (("bps", "bps_wr", bps), ("iops", "iops_wr", iops)):
        if isinstance(platform.get(total), int) and int(platform[total]) > 0:
            limits[total] = _min_limit(platform.get(total), value)
            limits[f"{total}_max"] = 0
            limits[f"{total}_max_length"] = 1
        else:
            limits[write] = _min_limit(platform.get(write), value)
        limits[f"{write}_max"] = 0
        limits[f"{write}_max_length"] = 1
    for key in _REQUIRED:
        limits.setdefault(key, 0)
    limits["group"] = group
    return limits


def set_throttle(qdev: str, limits: Mapping[str, int | str]) -> Command:
    """``block_set_io_throttle`` of the device ``qdev`` (its BlockBackend: the guest's I/O, not
    the commit job's) to ``limits``; all zeros and no group: no throttle."""
    args: dict[str, Any] = {"id": qdev}
    args.update({k: 0 for k in _REQUIRED})
    args.update({k: v for k, v in limits.items() if k in THROTTLE_KEYS})
    return Command("block_set_io_throttle", args)
