from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanflow import ConfigError, RetryPolicy
from fanflow._retry import compute_backoff


def test_ceiling_grows_then_caps() -> None:
    waits = [
        compute_backoff(n, initial=0.5, multiplier=2.0, max_wait=3.0, jitter=None)
        for n in range(1, 6)
    ]
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_full_jitter_scales_the_ceiling() -> None:
    assert compute_backoff(3, initial=1, multiplier=2, max_wait=60, jitter=0.25) == 1.0


def test_retry_after_is_a_floor() -> None:
    assert compute_backoff(1, initial=0.5, multiplier=2, max_wait=30, jitter=0.0, retry_after=7)
    assert (
        compute_backoff(1, initial=0.5, multiplier=2, max_wait=30, jitter=0.0, retry_after=7) == 7
    )
    # A Retry-After shorter than the backoff does not shorten it.
    assert (
        compute_backoff(4, initial=1, multiplier=2, max_wait=30, jitter=None, retry_after=0.1) == 8
    )


@given(
    n=st.integers(1, 50),
    initial=st.floats(0, 10),
    multiplier=st.floats(1, 4),
    max_wait=st.floats(0, 120),
    jitter=st.floats(0, 1, exclude_max=True),
    retry_after=st.none() | st.floats(0, 600),
)
def test_wait_is_within_bounds(
    n: int,
    initial: float,
    multiplier: float,
    max_wait: float,
    jitter: float,
    retry_after: float | None,
) -> None:
    wait = compute_backoff(
        n,
        initial=initial,
        multiplier=multiplier,
        max_wait=max_wait,
        jitter=jitter,
        retry_after=retry_after,
    )
    ceiling = min(max_wait, initial * multiplier ** (n - 1))
    assert wait >= 0
    if retry_after is None:
        assert wait <= ceiling
    else:
        assert wait >= retry_after
        assert wait <= max(ceiling, retry_after)


def test_seeded_policy_is_reproducible() -> None:
    a = [RetryPolicy(seed=7).backoff(n) for n in range(1, 5)]
    b = [RetryPolicy(seed=7).backoff(n) for n in range(1, 5)]
    assert a == b
    assert len(set(a)) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, "attempts must be >= 1"),
        ({"initial": -1}, "must be >= 0 seconds"),
        ({"multiplier": 0.5}, "multiplier must be >= 1"),
    ],
)
def test_policy_validates_with_the_fix(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_compute_backoff_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        compute_backoff(0, initial=1, multiplier=2, max_wait=3, jitter=None)
