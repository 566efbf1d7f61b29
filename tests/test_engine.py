"""The engine in virtual time: every wait is asserted to the exact loop time."""

from __future__ import annotations

import asyncio

import pytest

import fanflow
from fanflow import Limits, RetryPolicy, Status
from fanflow.events import AttemptFailed, AttemptStarted, CallEnded, CallStarted, Event
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime

NO_JITTER = RetryPolicy(attempts=4, initial=0.5, multiplier=2.0, max_wait=30.0, jitter=False)


async def test_backoff_schedule_is_exact() -> None:
    llm = ScriptedLLM(
        latency=0.1,
        failures={0: Fault.server_error(), 1: Fault.server_error(), 2: Fault.server_error()},
    )
    record = await fanflow.call(llm, "x", retry=NO_JITTER).record()
    assert record.status is Status.SUCCEEDED
    # Attempts fail at once; waits 0.5, 1.0, 2.0 before attempts 2, 3, 4.
    assert llm.started_at == [0.0, 0.5, 1.5, 3.5]
    assert [a.wait_before for a in record.attempts] == [0.0, 0.5, 1.0, 2.0]
    assert record.retries == 3
    assert record.end == pytest.approx(3.6)


async def test_gives_up_after_the_attempts_and_keeps_the_last_error() -> None:
    llm = ScriptedLLM(failure_rate=1.0, failure=Fault.server_error())
    record = await fanflow.call(llm, "x", retry=NO_JITTER).record()
    assert record.status is Status.FAILED
    assert isinstance(record.error, fanflow.errors.ServerError)
    assert llm.calls == 4
    assert len(record.attempts) == 4


async def test_retry_after_is_never_undercut() -> None:
    llm = ScriptedLLM(failures={0: Fault.rate_limited(retry_after=7.0)})
    record = await fanflow.call(llm, "x", retry=NO_JITTER).record()
    assert record.ok
    assert llm.started_at == [0.0, 7.0]


async def test_a_5xx_retry_after_is_waited_exactly_even_below_the_backoff() -> None:
    # Decision 0240: one Retry-After rule for every status. The third attempt's backoff
    # would be 1 s; the server asked for 0.2 s, and 0.2 s it is.
    after = fanflow.errors.ServerError("HTTP 503", status_code=503, retry_after=0.2)
    llm = ScriptedLLM(failures={0: Fault.server_error(), 1: Fault.raises(after)})
    record = await fanflow.call(llm, "x", retry=NO_JITTER).record()
    assert record.ok
    assert llm.started_at == [0.0, 0.5, pytest.approx(0.7)]


async def test_jittered_waits_stay_under_the_ceiling() -> None:
    llm = ScriptedLLM(failures={i: Fault.server_error() for i in range(3)})
    policy = RetryPolicy(attempts=4, initial=1.0, multiplier=2.0, seed=3)
    record = await fanflow.call(llm, "x", retry=policy).record()
    waits = [a.wait_before for a in record.attempts[1:]]
    assert all(0 <= w <= c for w, c in zip(waits, [1.0, 2.0, 4.0], strict=True))
    assert llm.started_at[-1] == pytest.approx(sum(waits))


async def test_non_retryable_errors_are_not_retried() -> None:
    llm = ScriptedLLM(failures={0: fanflow.errors.AuthenticationError("bad key", status_code=401)})
    record = await fanflow.call(llm, "x", retry=NO_JITTER).record()
    assert record.status is Status.FAILED
    assert llm.calls == 1
    assert isinstance(record.error, fanflow.errors.AuthenticationError)


async def test_user_exceptions_fail_the_call_without_retry() -> None:
    def boom(request: fanflow.Request) -> str:
        raise ValueError("bug in my function")

    record = await fanflow.call(fanflow.function(boom), "x").record()
    assert record.status is Status.FAILED
    assert isinstance(record.error, ValueError)
    assert len(record.attempts) == 1


async def test_hanging_call_times_out_and_its_task_is_cancelled(looptime: float) -> None:
    llm = ScriptedLLM(failure_rate=1.0, failure=Fault.hang())
    record = await fanflow.call(llm, "x", timeout=5.0, retry=RetryPolicy.none()).record()
    assert record.status is Status.TIMED_OUT
    assert isinstance(record.error, fanflow.errors.CallTimeout)
    assert "within 5 s" in str(record.error)
    assert looptime == 5.0
    assert llm.in_flight == 0  # the hanging coroutine was really cancelled


async def test_timeouts_are_retried_per_attempt(looptime: float) -> None:
    llm = ScriptedLLM(failures={0: Fault.hang(), 1: Fault.hang()}, latency=1.0)
    record = await fanflow.call(llm, "x", timeout=2.0, retry=NO_JITTER).record()
    assert record.ok
    assert [a.status for a in record.attempts] == [
        Status.TIMED_OUT,
        Status.TIMED_OUT,
        Status.SUCCEEDED,
    ]
    # 2 s timeout, 0.5 wait, 2 s timeout, 1.0 wait, 1 s answer.
    assert looptime == 6.5


async def test_handle_timeout_applies_when_the_call_sets_none(looptime: float) -> None:
    llm = ScriptedLLM(failure_rate=1.0, failure=Fault.hang(), timeout=3.0)
    record = await fanflow.call(llm, "x", retry=RetryPolicy.none()).record()
    assert record.status is Status.TIMED_OUT
    assert looptime == 3.0


async def test_deadline_bounds_retries_and_waits(looptime: float) -> None:
    llm = ScriptedLLM(failure_rate=1.0, failure=Fault.rate_limited(retry_after=4.0))
    record = await fanflow.call(
        llm, "x", deadline=10.0, retry=RetryPolicy(attempts=10, jitter=False)
    ).record()
    # Attempts at 0, 4, 8; the next would start at 12, past the deadline: stop at 8.
    assert llm.started_at == [0.0, 4.0, 8.0]
    assert record.status is Status.FAILED
    assert isinstance(record.error, fanflow.errors.RateLimited)
    assert looptime == 8.0


async def test_deadline_cuts_a_slow_attempt(looptime: float) -> None:
    llm = ScriptedLLM(latency=100.0)
    record = await fanflow.call(llm, "x", deadline=10.0, timeout=60.0).record()
    assert record.status is Status.TIMED_OUT
    assert "deadline" in str(record.error)
    assert looptime == 10.0


async def test_hedge_starts_after_the_delay_and_the_first_success_wins(looptime: float) -> None:
    # The first attempt would take 10 s; the hedge (call 1) takes 1 s.
    llm = ScriptedLLM(latency=lambda rng, req: 10.0 if not llm.started_at[1:] else 1.0)
    record = await fanflow.call(llm, "x", hedge_after=2.0).record()
    assert record.ok
    assert looptime == 3.0
    assert llm.started_at == [0.0, 2.0]
    assert [(a.hedge, a.status) for a in record.attempts] == [
        (False, Status.CANCELLED),
        (True, Status.SUCCEEDED),
    ]
    assert record.retries == 0
    assert llm.in_flight == 0


async def test_no_hedge_when_the_first_attempt_is_fast(looptime: float) -> None:
    llm = ScriptedLLM(latency=1.0)
    record = await fanflow.call(llm, "x", hedge_after=2.0).record()
    assert record.ok
    assert llm.calls == 1
    assert looptime == 1.0


async def test_hedge_survives_a_failing_primary(looptime: float) -> None:
    llm = ScriptedLLM(
        failures={0: Fault.server_error(after=5.0)},
        latency=lambda rng, req: 4.0,
    )
    record = await fanflow.call(llm, "x", hedge_after=1.0, retry=RetryPolicy.none()).record()
    # Primary fails at t=5; the hedge, started at t=1, answers at t=5 as well... the
    # hedge's 4 s end exactly at 5: whichever wins, the call succeeds at t=5.
    assert record.ok
    assert looptime == 5.0


async def test_when_a_hedged_attempt_and_its_duplicate_both_fail_the_attempts_error_stands(
    looptime: float,
) -> None:
    # Decision 0241: the attempt fails at t=3, its duplicate (sent at t=1) at t=6; the
    # call waits for the duplicate, then ends with the attempt's error.
    first = fanflow.errors.ServerError("the attempt's 500", status_code=500)
    second = fanflow.errors.ServerError("the duplicate's 502", status_code=502)
    llm = ScriptedLLM(
        failures={0: Fault.raises(first, after=3.0), 1: Fault.raises(second, after=5.0)}
    )
    record = await fanflow.call(llm, "x", hedge_after=1.0, retry=RetryPolicy.none()).record()
    assert record.error is first
    assert looptime == 6.0
    assert [(a.hedge, a.status) for a in record.attempts] == [
        (False, Status.FAILED),
        (True, Status.FAILED),
    ]


async def test_events_tell_the_story(looptime: float) -> None:
    events: list[Event] = []
    llm = ScriptedLLM(failures={0: Fault.rate_limited(retry_after=3.0)}, latency=1.0)
    record = await fanflow.call(llm, "x", retry=NO_JITTER, hooks=[events.append]).record()
    kinds = [type(e) for e in events]
    assert kinds == [CallStarted, AttemptStarted, AttemptFailed, AttemptStarted, CallEnded]
    failed = events[2]
    assert isinstance(failed, AttemptFailed)
    assert failed.wait == 3.0
    assert isinstance(failed.error, fanflow.errors.RateLimited)
    assert [e.time for e in events] == [0.0, 0.0, 0.0, 3.0, 4.0]
    ended = events[-1]
    assert isinstance(ended, CallEnded)
    assert ended.record is record


async def test_a_raising_hook_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def bad_hook(event: Event) -> None:
        raise RuntimeError("hook bug")

    record = await fanflow.call(ScriptedLLM(), "x", hooks=[bad_hook]).record()
    assert record.ok
    assert "hook" in caplog.text


async def test_awaiting_a_call_raises_its_error() -> None:
    llm = ScriptedLLM(failures={0: fanflow.errors.BadRequest("nope", status_code=400)})
    with pytest.raises(fanflow.errors.BadRequest, match="nope"):
        await fanflow.call(llm, "x")
    response = await fanflow.call(llm, "y")
    assert response.text == "echo: y"


async def test_cancelling_a_call_propagates_and_stops_the_model() -> None:
    llm = ScriptedLLM(latency=100.0)
    task = asyncio.ensure_future(fanflow.call(llm, "x").record())
    await asyncio.sleep(1.0)
    assert llm.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.in_flight == 0


async def test_handle_defaults_fill_unset_request_fields() -> None:
    llm = ScriptedLLM(defaults={"temperature": 0.3, "max_tokens": 10})
    await fanflow.call(llm, "x", temperature=0.9)
    request = llm.requests[0]
    assert request.temperature == 0.9
    assert request.max_tokens == 10
    assert request.model == "scripted"


def test_unknown_default_is_a_config_error() -> None:
    with pytest.raises(fanflow.ConfigError, match="unknown request defaults \\['temprature'\\]"):
        ScriptedLLM(defaults={"temprature": 0.3})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": 0}, "timeout must be > 0"),
        ({"hedge_after": -1}, "hedge_after must be > 0"),
        ({"deadline": 0}, "deadline must be > 0"),
    ],
)
async def test_bad_options_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(fanflow.ConfigError, match=message):
        await fanflow.call(ScriptedLLM(), "x", **kwargs)  # type: ignore[arg-type]


async def test_a_hedged_call_has_stopped_every_task_it_started_when_it_returns(
    looptime: float,
) -> None:
    # The attempt fails before it is sent (a request no token limit can ever admit), so
    # the "sent" waiter is still pending when the attempt ends: it is cancelled and
    # awaited before the call returns, not left for the loop to finish later.
    llm = ScriptedLLM(limits=Limits(tpm=10))
    record = await fanflow.call(llm, "x " * 200, hedge_after=1.0).record()
    assert isinstance(record.error, fanflow.errors.RequestTooLarge)
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
