"""Progress of a transfer: how far a QEMU job got, its rate and the time left (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgeqmp.core.progress import JobProgress, RateEstimate

MiB = 1 << 20


def test_eta_from_the_rate_measured_since_the_first_sample() -> None:
    # A job continued by a retry: 300 MiB were copied before this process looked, and do not
    # count as copied in no time.
    estimate = RateEstimate(started_at=10.0, started_done=300 * MiB)
    assert estimate.rate(12.0, 500 * MiB) == pytest.approx(100 * MiB)
    assert estimate.eta(12.0, 500 * MiB, 1000 * MiB) == pytest.approx(5.0)
    # The guest wrote meanwhile: the total grew, the estimate follows.
    assert estimate.eta(12.0, 500 * MiB, 1100 * MiB) == pytest.approx(6.0)


def test_eta_is_unknown_before_anything_was_measured_and_zero_once_done() -> None:
    estimate = RateEstimate(started_at=5.0, started_done=0)
    assert estimate.eta(5.0, 0, MiB) is None  # no time has passed
    assert estimate.eta(6.0, 0, MiB) is None  # nothing copied yet
    assert estimate.rate(6.0, 0) is None
    assert estimate.eta(5.0, MiB, MiB) == 0.0  # done between two polls: done, not unknown
    assert estimate.eta(7.0, 2 * MiB, MiB) == 0.0


def test_detail_is_the_progress_event_payload() -> None:
    estimate = RateEstimate(started_at=0.0, started_done=0)
    assert estimate.detail(2.0, 64 * MiB, 256 * MiB) == {
        "done": 64 * MiB,
        "total": 256 * MiB,
        "eta_s": 6.0,
        "bytes_per_second": 32 * MiB,
    }
    assert estimate.detail(0.0, 0, 256 * MiB)["eta_s"] is None


@given(
    start=st.floats(0, 1e6),
    elapsed=st.floats(1e-3, 1e5),
    before=st.integers(0, 1 << 40),
    copied=st.integers(1, 1 << 40),
    left=st.integers(0, 1 << 40),
)
def test_eta_is_what_is_left_at_the_measured_rate(
    start: float, elapsed: float, before: int, copied: int, left: int
) -> None:
    estimate = RateEstimate(start, before)
    now, done = start + elapsed, before + copied
    eta = estimate.eta(now, done, done + left)
    assert eta is not None
    assert eta >= 0
    assert eta == pytest.approx(left * (now - start) / copied, rel=1e-6, abs=1e-9)


def test_job_progress_from_query_jobs() -> None:
    job = JobProgress.from_job(
        {"id": "fq1-0-commit", "status": "running", "current-progress": 3 * MiB,
         "total-progress": 12 * MiB, "type": "commit"}
    )  # fmt: skip
    assert job == JobProgress("fq1-0-commit", "running", 3 * MiB, 12 * MiB)
    assert job.describe() == "3.0 of 12.0 MiB (25%)"
    assert JobProgress("j", "created", 0, 0).describe() == "0.0 of 0.0 MiB (0%)"
