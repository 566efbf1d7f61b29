"""A 5xx in a batch's tail is retried at once when slots are free and the handle's
other calls succeed; mid-batch and against a failing server the backoff stands
(decision 0151)."""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Limits, RetryPolicy, Status
from fanflow.testing import Fault, ScriptedLLM

# The note a tail retry leaves on its failed attempt (Attempt.note, shown in records and
# reports; decision 0151), word for word.
TAIL_RETRY_NOTE = (
    "retried at once (no backoff): a 5xx in the batch's tail (every item started, or "
    "free slots), the handle's other calls succeeding"
)
pytestmark = pytest.mark.looptime

# No jitter: the backoff before the first retry is exactly 0.5 s.
RETRY = RetryPolicy(jitter=False, hedge=False)


async def test_a_5xx_in_the_last_round_is_retried_without_backoff(looptime: float) -> None:
    # 20 items, 10 at a time, 1 s each: call 15 (second and last round) gets a 500 at
    # t=2 while calls 10-14 succeed; nothing waits for its slot.
    llm = ScriptedLLM(
        latency=1.0, failures={15: Fault.server_error(after=1.0)}, retry=RETRY, limits=Limits()
    )
    result = await fanflow.map(llm, "{input}", range(20), concurrency=10)
    assert result.ok
    retried = [r for r in result.records if len(r.attempts) > 1]
    assert len(retried) == 1
    first, second = retried[0].attempts
    assert first.status is Status.FAILED
    assert first.note == TAIL_RETRY_NOTE
    assert second.wait_before == 0.0
    assert looptime == 3.0  # with the 0.5 s backoff it was 3.5


async def test_mid_batch_the_backoff_stands(looptime: float) -> None:
    # Call 5 fails at t=1 while 20 items still wait for slots.
    llm = ScriptedLLM(
        latency=1.0, failures={5: Fault.server_error(after=1.0)}, retry=RETRY, limits=Limits()
    )
    result = await fanflow.map(llm, "{input}", range(30), concurrency=10)
    assert result.ok
    (retried,) = [r for r in result.records if len(r.attempts) > 1]
    assert retried.attempts[0].note is None
    assert retried.attempts[1].wait_before == 0.5


async def test_a_failing_server_still_gets_the_backoff(looptime: float) -> None:
    llm = ScriptedLLM(
        latency=1.0, failure_rate=1.0, failure=Fault.server_error(), retry=RETRY, limits=Limits()
    )
    result = await fanflow.map(llm, "{input}", range(5), concurrency=10)
    assert not result.ok
    for record in result.records:
        assert [a.wait_before for a in record.attempts][1:] == [0.5, 1.0, 2.0]
        assert all(a.note is None for a in record.attempts)


async def test_a_5xx_that_says_when_waits_its_retry_after(looptime: float) -> None:
    error = fanflow.errors.ServerError("HTTP 503", status_code=503, retry_after=0.7)
    llm = ScriptedLLM(
        latency=1.0, failures={15: Fault.raises(error, after=1.0)}, retry=RETRY, limits=Limits()
    )
    result = await fanflow.map(llm, "{input}", range(20), concurrency=10)
    (retried,) = [r for r in result.records if len(r.attempts) > 1]
    assert retried.attempts[1].wait_before == pytest.approx(0.7)


async def test_a_second_5xx_in_the_tail_goes_again_at_once(looptime: float) -> None:
    # Call 20 is item 15's retry: it fails at once, at the same instant as the first
    # failure; the handle's successes since the call began still count.
    llm = ScriptedLLM(
        latency=1.0,
        failures={15: Fault.server_error(after=1.0), 20: Fault.server_error()},
        retry=RETRY,
        limits=Limits(),
    )
    result = await fanflow.map(llm, "{input}", range(20), concurrency=10)
    assert result.ok
    (retried,) = [r for r in result.records if len(r.attempts) > 1]
    assert [a.wait_before for a in retried.attempts] == [0.0, 0.0, 0.0]
    assert looptime == 3.0


@pytest.mark.parametrize(
    ("items", "at_once"),
    [(25, True), (60, False)],
    ids=["last-item-handed-out", "items-still-to-hand-out"],
)
async def test_a_5xx_goes_again_at_once_once_every_item_is_started(
    looptime: float, items: int, at_once: bool
) -> None:
    # Decision 0157: 10 at a time, 1 s each; call 10 fails at t=1.1 while items wait
    # for slots (the gate is not idle). With 25 items the batch's 20 workers handed out
    # the last one at t=1: the tail has begun, no backoff. With 60, items are still to
    # be handed out: the 0.5 s backoff stands.
    llm = ScriptedLLM(
        latency=1.0, failures={10: Fault.server_error(after=0.1)}, retry=RETRY, limits=Limits()
    )
    result = await fanflow.map(llm, "{input}", range(items), concurrency=10)
    assert result.ok
    (retried,) = [r for r in result.records if len(r.attempts) > 1]
    first, second = retried.attempts
    assert first.end == pytest.approx(1.1)
    assert first.note == (TAIL_RETRY_NOTE if at_once else None)
    assert second.wait_before == (0.0 if at_once else 0.5)
