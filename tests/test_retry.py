from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanflow import ConfigError, RetryPolicy


def test_ceiling_grows_then_caps() -> None:
    policy = RetryPolicy(initial=0.5, multiplier=2.0, max_wait=3.0, jitter=False)
    waits = [policy.backoff(n) for n in range(1, 6)]
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_full_jitter_scales_the_ceiling(seed: int) -> None:
    """The wait is the ceiling (4 s before retry 3) times the policy's draw in [0, 1)
    from its seeded generator."""
    policy = RetryPolicy(initial=1, multiplier=2, max_wait=60, seed=seed)
    assert policy.backoff(3) == 4.0 * random.Random(seed).random()


def test_retry_after_is_a_floor() -> None:
    jittered = RetryPolicy(initial=0.5, multiplier=2, max_wait=30, seed=0)
    assert jittered.backoff(1, retry_after=7) == 7  # any draw is under 0.5 s
    # A Retry-After shorter than the backoff does not shorten it.
    plain = RetryPolicy(initial=1, multiplier=2, max_wait=30, jitter=False)
    assert plain.backoff(4, retry_after=0.1) == 8


@given(
    n=st.integers(1, 50),
    initial=st.floats(0, 10),
    multiplier=st.floats(1, 4),
    max_wait=st.floats(0, 120),
    seed=st.integers(0, 2**32),
    retry_after=st.none() | st.floats(0, 600),
)
def test_wait_is_within_bounds(
    n: int,
    initial: float,
    multiplier: float,
    max_wait: float,
    seed: int,
    retry_after: float | None,
) -> None:
    policy = RetryPolicy(initial=initial, multiplier=multiplier, max_wait=max_wait, seed=seed)
    wait = policy.backoff(n, retry_after=retry_after)
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


def test_backoff_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        RetryPolicy(jitter=False).backoff(0)
