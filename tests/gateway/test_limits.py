"""The per-key limiter over plain data (no clock, no server): exact sliding windows, the
Retry-After they give, concurrency, and a request larger than the limit itself."""

from __future__ import annotations

import pytest

from control_plane.limits import KeyLimiter, Limit, Limits, SlidingWindow


def test_a_window_refuses_until_its_oldest_entries_age_out() -> None:
    window = SlidingWindow(limit=3, window_s=60)
    for at in (0.0, 10.0, 20.0):
        assert window.wait(at, 1) == 0.0
        window.take(at, 1)
    assert window.wait(30.0, 1) == pytest.approx(30.0)  # the entry of t=0 leaves at t=60
    assert window.wait(60.0, 1) == 0.0
    assert window.wait(60.0, 2) == pytest.approx(10.0)  # two must leave: t=0 and t=10
    assert window.used(75.0) == 1
    assert window.wait(75.0, 4) is None  # never: larger than the limit


def test_rpm_admits_exactly_the_limit_per_rolling_minute() -> None:
    limiter = KeyLimiter(Limits(rpm=10))
    admitted = [t for t in range(0, 120) if limiter.admit(float(t), 0) is None]
    for t in admitted:
        limiter.finish(float(t), 0)
    # Over any 60 s, at most 10; at t=0..9 then t=60..69.
    assert admitted == [*range(10), *range(60, 70)]
    refusal = limiter.admit(70.0, 0)
    assert refusal is not None and refusal.limit is Limit.REQUESTS
    assert refusal.retry_after == 50  # t=60's request leaves the window at t=120
    assert "rpm" in refusal.message and "limit 10" in refusal.message


def test_tpm_counts_the_prompt_on_admission_and_the_output_when_it_ends() -> None:
    limiter = KeyLimiter(Limits(tpm=1000))
    assert limiter.admit(0.0, 400) is None
    limiter.finish(1.0, 500)  # 900 in the window
    assert limiter.admit(2.0, 100) is None
    refusal = limiter.admit(3.0, 1)
    assert refusal is not None and refusal.limit is Limit.TOKENS
    assert refusal.retry_after == 57  # the prompt of t=0 (400) leaves at t=60
    assert limiter.admit(60.5, 1) is None


def test_a_prompt_larger_than_tpm_is_refused_without_a_retry_time() -> None:
    limiter = KeyLimiter(Limits(tpm=100))
    refusal = limiter.admit(0.0, 101)
    assert refusal is not None and refusal.retry_after is None
    assert "too large" in refusal.message


def test_max_concurrent_counts_requests_in_flight() -> None:
    limiter = KeyLimiter(Limits(max_concurrent=2))
    assert limiter.admit(0.0, 10) is None
    assert limiter.admit(0.0, 10) is None
    refusal = limiter.admit(0.0, 10)
    assert refusal is not None and refusal.limit is Limit.CONCURRENCY
    limiter.finish(1.0, 5)
    assert limiter.admit(1.0, 10) is None


def test_a_refused_request_takes_nothing_from_any_window() -> None:
    limiter = KeyLimiter(Limits(rpm=5, tpm=100))
    assert limiter.admit(0.0, 90) is None
    assert limiter.admit(1.0, 20) is not None  # tokens refuse it ...
    assert limiter.requests is not None and limiter.requests.used(1.0) == 1  # ... rpm unchanged
    assert limiter.in_flight == 1


def test_no_limits_is_falsy() -> None:
    assert not Limits()
    assert Limits(rpm=1)
