"""Retry policy and backoff arithmetic.

Backoff is a pure function of its inputs (as stamina's ``_compute_backoff``), so tests
check the schedule without sleeping. The engine draws the jitter from the policy's
random generator and sleeps through the event loop, so virtual time applies.

Full jitter ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015): the wait
before retry *n* is uniform in ``[0, min(max_wait, initial * multiplier ** (n - 1))]``.
What follows a failure (whether to retry, and a server's Retry-After, which the engine
waits exactly) is decided in :mod:`fanflow._decide`; this module is the backoff alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ._exceptions import ConfigError

__all__ = ["RetryPolicy", "compute_backoff"]


def compute_backoff(
    retry_number: int,
    *,
    initial: float,
    multiplier: float,
    max_wait: float,
    jitter: float | None,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before retry number ``retry_number`` (1 for the first retry).

    Args:
        retry_number: 1 for the wait before the second attempt, 2 before the third, ...
        initial: the ceiling of the first wait.
        multiplier: growth of the ceiling per retry.
        max_wait: the cap on the ceiling.
        jitter: a number in [0, 1) drawn by the caller (full jitter), or None for the
            ceiling itself (no jitter).
        retry_after: seconds the server asked for; the result is never below it (for
            callers of their own: the engine waits a Retry-After exactly instead).

    Returns:
        The wait in seconds.
    """
    if retry_number < 1:
        raise ValueError(f"retry_number starts at 1, got {retry_number}")
    ceiling = min(max_wait, initial * multiplier ** (retry_number - 1))
    wait = ceiling if jitter is None else ceiling * jitter
    if retry_after is not None and retry_after > wait:
        wait = retry_after
    return wait


@dataclass(frozen=True)
class RetryPolicy:
    """How a call is retried after a retryable error.

    Args:
        attempts: total attempts, the first included (1 means no retry).
        initial: ceiling of the first backoff, seconds.
        multiplier: growth of the ceiling per retry.
        max_wait: cap of the ceiling, seconds.
        jitter: full jitter when True; the ceiling itself when False.
        seed: seed of the jitter's random generator (None: unpredictable).
        hedge: the hedging policy (decision 0133): a duplicate attempt once one is
            slower than the 99th percentile of the handle's recent latencies (at least
            1.5x their median), duplicates at most 5% of the calls, within the handle's
            limits. None leaves it to the handle (on for HTTP APIs, off for local
            models and functions); a pattern's ``hedge_after=`` replaces it.
    """

    attempts: int = 4
    initial: float = 0.5
    multiplier: float = 2.0
    max_wait: float = 30.0
    jitter: bool = True
    seed: int | None = None
    hedge: bool | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(
                f"attempts must be >= 1 (the first try counts), got {self.attempts}; "
                "use RetryPolicy(attempts=1) for no retries"
            )
        if self.initial < 0 or self.max_wait < 0:
            raise ConfigError(
                f"initial and max_wait must be >= 0 seconds, got {self.initial}, {self.max_wait}"
            )
        if self.multiplier < 1:
            raise ConfigError(f"multiplier must be >= 1, got {self.multiplier}")
        object.__setattr__(self, "_rng", random.Random(self.seed))

    @classmethod
    def none(cls) -> RetryPolicy:
        """No retries: one attempt."""
        return cls(attempts=1)

    def __repr__(self) -> str:
        return (
            f"fanflow.RetryPolicy(attempts={self.attempts}, initial={self.initial}, "
            f"multiplier={self.multiplier}, max_wait={self.max_wait}, jitter={self.jitter})"
        )

    def backoff(self, retry_number: int, retry_after: float | None = None) -> float:
        """The wait before retry ``retry_number``, with jitter drawn from this policy."""
        jitter = self._rng.random() if self.jitter else None
        return compute_backoff(
            retry_number,
            initial=self.initial,
            multiplier=self.multiplier,
            max_wait=self.max_wait,
            jitter=jitter,
            retry_after=retry_after,
        )


DEFAULT_RETRY = RetryPolicy()
