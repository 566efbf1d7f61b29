"""The one decision after a failed attempt (fanflow._decide, decision 0240), as a table:
an error and what the handle had seen in, a verdict out."""

from __future__ import annotations

import pytest

from fanflow import RetryPolicy
from fanflow._decide import MAX_REQUEUES, TAIL_RETRY_NOTE, Seen, Verdict, decide
from fanflow.errors import (
    AuthenticationError,
    BadRequest,
    Overloaded,
    ProviderTimeout,
    RateLimited,
    ServerError,
)

# No jitter: the backoff before retry n is 0.5 * 2 ** (n - 1), at most 30 s.
POLICY = RetryPolicy(attempts=4, jitter=False)

NO_USABLE = "no usable Retry-After (missing, zero, negative, a past date or unreadable)"


def _429(after: float | None = None) -> RateLimited:
    return RateLimited("HTTP 429", status_code=429, retry_after=after)


def _529(after: float | None = None) -> Overloaded:
    return Overloaded("HTTP 529", status_code=529, retry_after=after)


def _5xx(after: float | None = None, status: int = 500) -> ServerError:
    return ServerError(f"HTTP {status}", status_code=status, retry_after=after)


OWN = {"succeeded_since_sent": True}
TAIL = {"succeeded_since_call": True, "draining": True}

TABLE: list[tuple[str, BaseException, Seen, Verdict]] = [
    # 1. Not retryable: stop, whatever was seen.
    ("400 stops", BadRequest("HTTP 400", status_code=400), Seen(tries=1), Verdict(None)),
    ("401 stops", AuthenticationError("HTTP 401", status_code=401), Seen(1, **OWN), Verdict(None)),
    ("a bug stops", ValueError("boom"), Seen(tries=1), Verdict(None)),
    # 2. A 429/529 of the handle's own load is requeued: no attempt used, even the last.
    ("own-load 429, exact", _429(2.0), Seen(1, **OWN), Verdict(2.0, requeued=True)),
    ("own-load 529, exact", _529(3.0), Seen(4, **OWN), Verdict(3.0, requeued=True)),
    (
        "accepted call still in flight",
        _429(1.0),
        Seen(tries=2, accepted_in_flight=True),
        Verdict(1.0, requeued=True),
    ),
    (
        "own load, no Retry-After: backoff of the tries before it",
        _429(),
        Seen(tries=3, **OWN),
        Verdict(1.0, requeued=True, note=f"{NO_USABLE}: waited 1 s (backoff)"),
    ),
    (
        "requeues run out",
        _429(1.0),
        Seen(tries=4, requeues=MAX_REQUEUES, **OWN),
        Verdict(None),
    ),
    # ... any other 429 uses up an attempt, and one to a lone unanswered call is a refusal.
    ("a 429 uses an attempt", _429(1.0), Seen(tries=1), Verdict(1.0)),
    ("last attempt used", _429(1.0), Seen(tries=4), Verdict(None)),
    (
        "refused: alone, never answered",
        _429(1.0),
        Seen(tries=1, alone_unanswered=True),
        Verdict(1.0, refused=True),
    ),
    (
        "refused on the last attempt",
        _429(),
        Seen(tries=4, alone_unanswered=True),
        Verdict(None, refused=True),
    ),
    ("a 529 is never a refusal", _529(1.0), Seen(1, alone_unanswered=True), Verdict(1.0)),
    # 3. A Retry-After is waited exactly, for a 5xx too, at most max_wait.
    ("503 with Retry-After: exact", _5xx(0.7, 503), Seen(tries=1), Verdict(0.7)),
    ("shorter than the backoff: exact", _5xx(0.1, 503), Seen(tries=3), Verdict(0.1)),
    (
        "longer than max_wait",
        _429(120.0),
        Seen(tries=1),
        Verdict(
            30.0,
            note="the server asked to wait 120 s (Retry-After); waited 30 s, the retry "
            "policy's max_wait",
        ),
    ),
    (
        "zero Retry-After: backoff",
        _429(0.0),
        Seen(tries=2),
        Verdict(1.0, note=f"{NO_USABLE}: waited 1 s (backoff)"),
    ),
    # 4. A plain 5xx in the tail goes again at once while the server is up.
    ("tail, draining", _5xx(), Seen(tries=1, **TAIL), Verdict(0.0, note=TAIL_RETRY_NOTE)),
    (
        "tail, free slots",
        _5xx(),
        Seen(tries=2, succeeded_since_call=True, idle=True),
        Verdict(0.0, note=TAIL_RETRY_NOTE),
    ),
    ("tail, but a failing server", _5xx(), Seen(1, draining=True), Verdict(0.5)),
    ("mid-batch", _5xx(), Seen(tries=1, succeeded_since_call=True), Verdict(0.5)),
    ("tail, but a Retry-After", _5xx(2.0, 503), Seen(tries=1, **TAIL), Verdict(2.0)),
    (
        "tail, but an overload",
        _529(),
        Seen(tries=1, **TAIL),
        Verdict(0.5, note=NO_USABLE + ": waited 0.5 s (backoff)"),
    ),
    ("tail, but a timeout", ProviderTimeout("slow"), Seen(tries=1, **TAIL), Verdict(0.5)),
    ("tail, last attempt used", _5xx(), Seen(tries=4, **TAIL), Verdict(None)),
    # 5. Otherwise the backoff, growing with the tries.
    ("backoff 1", _5xx(), Seen(tries=1), Verdict(0.5)),
    ("backoff 3", _5xx(), Seen(tries=3), Verdict(2.0)),
    ("timeout backoff", ProviderTimeout("slow"), Seen(tries=2), Verdict(1.0)),
    # 6. A wait that would reach the deadline stops instead.
    (
        "the deadline passes during the wait",
        _429(5.0),
        Seen(tries=1, time_left=5.0),
        Verdict(None, note="the deadline would pass during the 5 s wait: stopped"),
    ),
    (
        "a requeue stopped by the deadline",
        _429(5.0),
        Seen(tries=1, time_left=1.0, **OWN),
        Verdict(None, requeued=True, note="the deadline would pass during the 5 s wait: stopped"),
    ),
    ("time enough", _429(5.0), Seen(tries=1, time_left=5.5), Verdict(5.0)),
]


@pytest.mark.parametrize(
    ("error", "seen", "verdict"), [r[1:] for r in TABLE], ids=[r[0] for r in TABLE]
)
def test_the_verdict(error: BaseException, seen: Seen, verdict: Verdict) -> None:
    assert decide(error, seen, POLICY) == verdict


def test_the_attempts_allowed_may_be_given() -> None:
    assert decide(_5xx(), Seen(tries=4), POLICY, attempts=6) == Verdict(4.0)
    assert decide(_5xx(), Seen(tries=2), POLICY, attempts=2) == Verdict(None)


def test_the_jittered_backoff_stays_under_its_ceiling() -> None:
    policy = RetryPolicy(attempts=10, seed=3)
    for tries in range(1, 10):
        wait = decide(_5xx(), Seen(tries=tries), policy).wait
        assert wait is not None
        assert 0 <= wait <= min(30.0, 0.5 * 2 ** (tries - 1))
