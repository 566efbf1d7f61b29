"""Admission in virtual time: pacing, token reservations, pauses, ramp-up, adaptive."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

import fanflow
from fanflow import Limits, Request, Response, RetryPolicy, Usage
from fanflow.results import RateLimitState
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


async def test_rpm_paces_at_97_percent_after_half_a_second_of_burst(looptime: float) -> None:
    # The pacing rule (decision 0130): 1,200 RPM = 20/s sends a burst of 10 (half a
    # second of budget), then one every 1 / (0.97 * 20) s.
    llm = ScriptedLLM(latency=0.1, limits=Limits(rpm=1200))
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(30)])
    assert result.ok
    expected = [max(0.0, (i - 9) / 19.4) for i in range(30)]
    assert llm.started_at == pytest.approx(expected, abs=1e-5)  # looptime: 1 us steps
    assert float(looptime) == pytest.approx(20 / 19.4 + 0.1, abs=1e-5)


async def test_no_minute_sees_more_than_rpm(looptime: float, max_in_window: Any) -> None:
    # 600 RPM: a burst of 10, then one every 0.1 s; 1,300 items span two minutes.
    llm = ScriptedLLM(latency=0.5, limits=Limits(rpm=600))
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(1300)])
    assert result.ok
    times = llm.started_at
    assert max_in_window(times, [1] * len(times), 60.0) <= 600
    assert max_in_window(times, [1] * len(times), 1.0) <= 20  # burst + one second
    # And the allowance less the 3% margin is used: 1,295 sends after the burst of 5
    # at 9.7/s take 133.5 s.
    assert times[-1] == pytest.approx(1295 / 9.7)


async def test_two_maps_sharing_a_handle_stay_within_its_limit(
    looptime: float, max_in_window: Any
) -> None:
    llm = ScriptedLLM(latency=0.2, limits=Limits(rpm=60, burst=0.0, margin=0.0))
    a, b = await asyncio.gather(
        fanflow.map(llm, "a {input}", [str(i) for i in range(30)]),
        fanflow.map(llm, "b {input}", [str(i) for i in range(30)]),
    )
    assert a.ok
    assert b.ok
    times = llm.started_at
    assert max_in_window(times, [1] * 60, 60.0) <= 60
    assert times == [float(i) for i in range(60)]  # one per second, shared


def _reply(tokens_out: int) -> Any:
    def reply(request: Request) -> Response:
        return Response("ok", usage=Usage(5, tokens_out), model="m")

    return reply


async def test_tokens_are_reserved_then_settled_against_usage(looptime: float) -> None:
    # 600 TPM = 10 tokens/s, burst 10. Each request reserves its prompt estimate
    # (8 chars = 2 tokens + 6 of chat overhead) plus max_tokens=100, but reports 5 in +
    # 0 out: settlement gives the rest back.
    llm = ScriptedLLM(_reply(0), latency=1.0, limits=Limits(tpm=600, burst=1.0))
    lane = llm.lane()
    request = Request.of("x" * 8, max_tokens=100)
    await fanflow.call(llm, request)
    # 108 reserved at t=0 went into debt (10.8 s); the 5 used leave 0.5 s of it.
    await fanflow.call(llm, request)
    assert llm.started_at == [0.0, 1.0]
    # Without settlement the second call would have waited until t=9.8.
    assert lane.statistics().concurrency.in_flight == 0


async def test_without_refunds_the_reservation_stands(looptime: float) -> None:
    # As above, but for a server that charges max_tokens up front: nothing comes back,
    # so the second call waits for the whole 108-token reservation (10.8 s of debt).
    llm = ScriptedLLM(_reply(0), latency=1.0, limits=Limits(tpm=600, refund=False, margin=0))
    request = Request.of("x" * 8, max_tokens=100)
    await fanflow.call(llm, request)
    await fanflow.call(llm, request)
    assert llm.started_at == [0.0, 10.8]


async def test_token_budget_per_minute_holds(looptime: float, max_in_window: Any) -> None:
    llm = ScriptedLLM(_reply(40), latency=1.0, limits=Limits(tpm=3000))
    items = [str(i) for i in range(150)]
    result = await fanflow.map(llm, "{input}", items, max_tokens=40)
    assert result.ok
    used = [45] * len(llm.started_at)  # 5 in + 40 out, as reported
    assert max_in_window(llm.started_at, used, 60.0) <= 3000
    # 150 * 45 = 6,750 tokens at 3,000 per minute: about 2.25 minutes.
    assert 125.0 <= looptime <= 145.0


async def test_a_request_larger_than_the_bucket_fails_at_once(looptime: float) -> None:
    llm = ScriptedLLM(limits=Limits(tpm=1000))
    result = await fanflow.map(llm, "{input}", ["short", "x" * 8000], max_tokens=100)
    assert result.records[0].ok
    error = result.records[1].error
    assert isinstance(error, fanflow.errors.RequestTooLarge)
    assert "item 1" in str(error)
    assert "tpm=1,000" in str(error)
    assert result.records[1].status is fanflow.Status.FAILED
    assert llm.calls == 1
    assert looptime == 0


async def test_input_and_output_tpm_count_apart(looptime: float) -> None:
    # Output tokens are limited to 60/min = 1/s and each call reserves max_tokens=5.
    llm = ScriptedLLM(_reply(5), limits=Limits(input_tpm=100_000, output_tpm=60, burst=0, margin=0))
    await fanflow.map(llm, "{input}", ["a", "b", "c"], max_tokens=5)
    assert llm.started_at == [0.0, 5.0, 10.0]


async def test_a_429_with_retry_after_pauses_a_fixed_lane_exactly_then_resumes_at_half(
    looptime: float,
) -> None:
    llm = ScriptedLLM(
        latency=1.0,
        failures={0: Fault.rate_limited(retry_after=10.0, after=0.5)},
        limits=Limits(concurrency=8),
        retry=RetryPolicy(attempts=3, jitter=False, initial=0.5),
    )
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(20)])
    assert result.ok
    # Call 0 got its 429 at t=0.5; calls 1-7 were in flight already (sent at t=0).
    assert llm.started_at[:8] == [0.0] * 8
    later = llm.started_at[8:]
    # Nothing was sent during the pause, which ends exactly when the server asked
    # (t=10.5), not later...
    assert min(later) == 10.5
    # ...and then half the limit goes at once (4 of 8), one more per success: the
    # four successes at t=11.5 reopen all 8 slots.
    assert later[:4] == [10.5] * 4
    assert later[4:12] == [11.5] * 8
    assert llm.statistics().pauses == 1


async def test_cancelling_a_waiter_gives_back_its_reservation(looptime: float) -> None:
    llm = ScriptedLLM(limits=Limits(rpm=60, burst=0.0, margin=0.0))
    lane = llm.lane()
    first = await lane.acquire()
    waiter = asyncio.ensure_future(lane.acquire())
    await asyncio.sleep(0.5)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    lane.finish(first, 0.0)
    # The cancelled reservation (t=1) was returned; the next send is at t=1, not t=2.
    await lane.acquire()
    assert looptime == 1.0


@dataclass(frozen=True)
class _Reply(Response):
    rate_limit: Any = None


async def test_headers_with_nothing_remaining_hold_sends_until_it_refills(
    looptime: float,
) -> None:
    def reply(request: Request) -> Response:
        # Full again in 8 s: 8 requests refill at 1 per second.
        state = RateLimitState(requests_limit=8, requests_remaining=0, requests_reset=8.0)
        return _Reply("ok", usage=Usage(1, 1), rate_limit=state)

    # The headers count at the request's arrival: with no latency the reply says
    # "nothing left" as of now, so the next call waits for one request to refill.
    # ``remaining`` is rounded down (the bucket may hold up to one more), so fanflow
    # counts 1% of the limit less as used (decision 0176): 7.92 in 8 s.
    llm = ScriptedLLM(reply, latency=0.0, limits=Limits(concurrency=1))
    await fanflow.map(llm, "{input}", ["a", "b"])
    assert llm.started_at == [0.0, pytest.approx(8 / 7.92)]


async def test_headers_count_the_refill_since_the_request_arrived(looptime: float) -> None:
    def reply(request: Request) -> Response:
        state = RateLimitState(requests_limit=8, requests_remaining=0, requests_reset=8.0)
        return _Reply("ok", usage=Usage(1, 1), rate_limit=state)

    # "Nothing left" was counted when the request arrived, 1 s before the reply: 0.99
    # of a request has refilled since (``remaining`` is rounded down, so fanflow counts
    # 1% of the limit less as used, decision 0176); the rest of one comes just after.
    llm = ScriptedLLM(reply, latency=1.0, limits=Limits(concurrency=1))
    await fanflow.map(llm, "{input}", ["a", "b"])
    assert llm.started_at == [0.0, pytest.approx(8 / 7.92)]


async def test_headers_without_a_limit_hold_until_the_reset(looptime: float) -> None:
    def reply(request: Request) -> Response:
        state = RateLimitState(requests_remaining=0, requests_reset=7.0)
        return _Reply("ok", usage=Usage(1, 1), rate_limit=state)

    llm = ScriptedLLM(reply, latency=1.0, limits=Limits(concurrency=1))
    await fanflow.map(llm, "{input}", ["a", "b"])
    assert llm.started_at == [0.0, 8.0]


async def test_headers_with_little_remaining_send_what_is_left_without_a_margin(
    looptime: float,
) -> None:
    def reply(request: Request) -> Response:
        # 5 of 100 left, full in 19 s: refilling at 5 per second.
        state = RateLimitState(requests_limit=100, requests_remaining=5, requests_reset=19.0)
        return _Reply("ok", usage=Usage(1, 1), rate_limit=state)

    llm = ScriptedLLM(reply, latency=0.0, limits=Limits(concurrency=1))
    await fanflow.map(llm, "{input}", ["a", "b", "c", "d"])
    # Each reply says 5 are left: they are (decision 0176; before, they were spaced
    # at the refill rate less the 3% margin, one every 1 / (5 x 0.97) s).
    assert llm.started_at == [0.0, 0.0, 0.0, 0.0]


class _CapacityServer(fanflow.BaseLLM):
    """A server that takes at most ``capacity`` calls at once and 429s the rest."""

    def __init__(self, capacity: int, latency: float, limits: Limits) -> None:
        super().__init__(model="sim", limits=limits, retry=RetryPolicy(attempts=50, seed=1))
        self.capacity = capacity
        self.latency = latency
        self.in_flight = 0
        self.rejected = 0
        self.done: list[float] = []

    async def complete(self, request: Request) -> Response:
        loop = asyncio.get_running_loop()
        if self.in_flight >= self.capacity:
            self.rejected += 1
            await asyncio.sleep(0.001)
            raise fanflow.errors.RateLimited("429: too many in flight", status_code=429)
        self.in_flight += 1
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        self.done.append(loop.time())
        return Response("ok", usage=Usage(1, 1))


async def test_adaptive_concurrency_finds_the_servers_capacity(looptime: float) -> None:
    server = _CapacityServer(capacity=40, latency=1.0, limits=Limits.adaptive(initial=2))
    result = await fanflow.map(server, "{input}", [str(i) for i in range(4000)])
    assert result.ok
    done = server.done
    # After warm-up (the first quarter), throughput is at least 90% of capacity (40/s).
    t0, t1 = done[len(done) // 4], done[-1]
    throughput = (len(done) - len(done) // 4) / (t1 - t0)
    assert throughput >= 0.9 * 40
    level = server.statistics().adaptive_limit
    assert level is not None
    assert 30 <= level <= 48


async def test_adaptive_limit_stays_within_bounds(looptime: float) -> None:
    server = _CapacityServer(capacity=1, latency=0.1, limits=Limits.adaptive(initial=4, min=2))
    await fanflow.map(server, "{input}", [str(i) for i in range(50)])
    level = server.statistics().adaptive_limit
    assert level is not None
    assert level >= 2


def test_limits_validate_with_the_fix_in_the_message() -> None:
    with pytest.raises(fanflow.ConfigError, match="rpm must be > 0"):
        Limits(rpm=0)
    with pytest.raises(fanflow.ConfigError, match="burst"):
        Limits(rpm=10, burst=-1)
    with pytest.raises(fanflow.ConfigError, match="min <= initial <= max"):
        Limits.adaptive(initial=0)
    assert repr(Limits(rpm=60, tpm=1000)) == "fanflow.Limits(concurrency=None, rpm=60, tpm=1000)"
    assert "fanflow.limits.Adaptive(" in repr(Limits.adaptive())


async def test_headers_with_too_few_tokens_left_hold_until_the_reset(looptime: float) -> None:
    def reply(request: Request) -> Response:
        state = RateLimitState(tokens_remaining=20, tokens_reset=3.0)
        return _Reply("ok", usage=Usage(5, 5), rate_limit=state)

    # Metered: each call reserves 7 + 50 = 57 tokens, more than the 20 remaining.
    llm = ScriptedLLM(reply, latency=1.0, limits=Limits(concurrency=1, tpm=1_000_000))
    await fanflow.map(llm, "{input}", ["a", "b"], max_tokens=50)
    assert llm.started_at == [0.0, 4.0]


async def test_a_deadline_while_waiting_for_the_rate_says_so(looptime: float) -> None:
    llm = ScriptedLLM(latency=0.1, limits=Limits(rpm=60, burst=0.0, margin=0.0))
    result = await fanflow.map(llm, "{input}", ["a", "b", "c"], deadline=1.5)
    assert [r.status for r in result.records] == [
        fanflow.Status.SUCCEEDED,
        fanflow.Status.SUCCEEDED,
        fanflow.Status.TIMED_OUT,
    ]
    assert "turn under the rate limits" in str(result.records[2].error)
    assert looptime == 1.5
    # The timed-out call's reservation was given back: the next send is at t=2, not 3.
    await fanflow.call(llm, "d")
    assert llm.started_at[-1] == 2.0


async def test_a_burst_of_529s_cuts_to_what_the_server_kept_in_flight(looptime: float) -> None:
    llm = ScriptedLLM(
        latency=1.0,
        failures={i: Fault.overloaded(after=0.5) for i in range(3)},
        limits=Limits.adaptive(initial=10, decrease=0.5),
        retry=RetryPolicy.none(),
    )
    await fanflow.map(llm, "{input}", [str(i) for i in range(10)])
    stats = llm.statistics()
    assert stats.rate_limited == 3
    # Each 529 sets the limit to decrease x the calls still in flight, never raising it:
    # 0.5 x 9, then 0.5 x 8, then 0.5 x 7 = 3.5 (three compounding cuts would have left
    # 1.25). That level is remembered; above it the 7 successes half a second later
    # probe by 0.5% per second: 3.5 x (1 + 0.005 x 0.5).
    assert stats.adaptive_limit == pytest.approx(3.5 * (1 + 0.005 * 0.5))
    assert stats.concurrency.limit == 4
