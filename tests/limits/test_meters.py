"""Each meter of a lane's stack against its own seam: ``acquire(permit)`` and
``release(permit, outcome)``, in virtual time, with exact times."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

import fanflow
from fanflow import Limits, Request, Response, Usage
from fanflow._gate import Gate
from fanflow._hedge import Hedger
from fanflow._leases import GlobalLane, GrantQueue, LeasedGate, SlotLease
from fanflow._limits import Lane
from fanflow._meters import (
    REQUESTS,
    TOTAL,
    AdaptiveMeter,
    GateMeter,
    Outcome,
    PaceMeter,
    PauseMeter,
    Permit,
    RateMeter,
    Turn,
)
from fanflow._rate import Credit
from fanflow._steer import HeaderMeter, SteerMeter
from fanflow.errors import RateLimited
from fanflow.limits import Adaptive, Pacing
from fanflow.results import RateLimitState
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime


def _now() -> float:
    return asyncio.get_running_loop().time()


def _ok(start: float = 0.0, sent: int = 1, usage: Usage | None = None) -> Outcome:
    response = Response("ok", usage=usage or Usage(1, 1))
    return Outcome(start, _now(), response, None, sent)


def _refused(start: float = 0.0, sent: int = 1, retry_after: float | None = None) -> Outcome:
    error = RateLimited("429", status_code=429, retry_after=retry_after)
    return Outcome(start, _now(), None, error, sent)


async def test_the_gate_meter_holds_one_slot_per_call(looptime: float) -> None:
    gate = Gate(1)
    meter = GateMeter(gate, Hedger())
    first = await meter.acquire(Permit(0, 0, []))
    waiter = asyncio.ensure_future(meter.acquire(Permit(0, 0, [])))
    await asyncio.sleep(1.0)
    assert not waiter.done()
    meter.release(first, _ok())
    await waiter
    assert gate.statistics().in_flight == 1
    assert looptime == 1.0


def _hedger(*latencies: float) -> Hedger:
    hedger = Hedger()
    for latency in latencies:
        hedger.observe(latency)
    return hedger


async def test_a_refusal_that_says_nothing_keeps_its_slot_a_median_latency(
    looptime: float,
) -> None:
    gate = Gate(1)
    meter = GateMeter(gate, _hedger(0.5, 2.0, 3.0))  # median 2.0
    permit = await meter.acquire(Permit(0, 0, []))
    await asyncio.sleep(0.25)
    meter.release(permit, _refused(start=0.0))
    assert gate.statistics().in_flight == 1  # held: an answer would take 2 s
    await meter.acquire(Permit(0, 0, []))
    assert looptime == 2.0


@pytest.mark.parametrize(
    ("hedger", "outcome"),
    [
        (_hedger(2.0), lambda: _refused(retry_after=1.0)),  # the server said when
        (_hedger(), lambda: _refused()),  # no answer yet: nothing to measure
        (_hedger(0.1), lambda: _refused()),  # already longer than an answer
        (_hedger(2.0), lambda: _ok()),
    ],
    ids=["retry-after", "no-latency-yet", "late-refusal", "success"],
)
async def test_other_endings_give_the_slot_back_at_once(
    looptime: float, hedger: Hedger, outcome: object
) -> None:
    gate = Gate(1)
    meter = GateMeter(gate, hedger)
    permit = await meter.acquire(Permit(0, 0, []))
    await asyncio.sleep(0.25)
    meter.release(permit, outcome())  # type: ignore[operator]
    assert gate.statistics().in_flight == 0


async def test_a_refusal_with_rate_limit_headers_gives_the_slot_back_at_once(
    looptime: float,
) -> None:
    gate = Gate(1)
    meter = GateMeter(gate, _hedger(2.0))
    permit = await meter.acquire(Permit(0, 0, []))
    error = RateLimited("429", status_code=429)
    error.rate_limit = RateLimitState(requests_limit=10, requests_remaining=0)
    meter.release(permit, Outcome(0.0, _now(), None, error, 1))
    assert gate.statistics().in_flight == 0


async def test_a_retry_after_pauses_then_ramps_from_half_the_limit(looptime: float) -> None:
    pause = PauseMeter(Turn(simple=True), concurrency=8, adaptive=False)
    pause.release(None, _refused(retry_after=2.0, sent=8))
    assert pause.until == 2.0
    assert pause.pauses == 1
    ramp = pause.ramp
    assert ramp is not None
    assert ramp.limit == 4
    permit = await pause.acquire(Permit(0, 0, []))
    assert permit.ramp is ramp
    pause.release(permit, _ok())  # one more per success
    assert ramp.limit == 5


async def test_the_ramp_ends_at_the_limit(looptime: float) -> None:
    pause = PauseMeter(Turn(simple=True), concurrency=2, adaptive=False)
    pause.pause(1.0, sent=2)
    permit = await pause.acquire(Permit(0, 0, []))
    pause.release(permit, _ok())
    assert pause.ramp is None  # 1 + 1 reached the goal of 2: no ramp any more


async def test_an_adaptive_lane_is_not_paused_by_a_retry_after(looptime: float) -> None:
    pause = PauseMeter(Turn(simple=True), concurrency=None, adaptive=True)
    pause.release(None, _refused(retry_after=2.0))
    assert (pause.until, pause.ramp) == (0.0, None)


async def test_the_adaptive_meter_cuts_to_what_the_server_kept(looptime: float) -> None:
    gate = Gate(None)
    turn = Turn(simple=True)
    meter = AdaptiveMeter(Adaptive(initial=None, max=100), gate, turn)
    meter.release(None, _refused(sent=21))  # 20 others in flight: 0.9 x 20
    assert meter.level == 18.0
    assert gate.limit == 18
    assert not turn.simple


async def test_the_adaptive_meter_grows_only_while_its_limit_holds(looptime: float) -> None:
    gate = Gate(2)
    meter = AdaptiveMeter(Adaptive(initial=2, max=100), gate, Turn(simple=True))
    meter.release(None, _ok(sent=1))  # 1 in flight under a limit of 2: no growth
    assert meter.level == 2.0
    meter.release(None, _ok(sent=2))  # at the limit: slow start, one more
    assert (meter.level, gate.limit) == (3.0, 3)


async def test_the_pace_meter_backs_off_and_recovers() -> None:
    pace = PaceMeter(Pacing(initial=0.1, min=0.01, max=10.0, backoff=2.0, recover=0.5))
    assert pace.claim(0.0, 0.0) == 0.0
    assert pace.claim(0.0, 0.0) == pytest.approx(0.1)
    pace.release(None, Outcome(0.0, 0.0, None, RateLimited("429"), 1))
    assert pace.delay == pytest.approx(0.2)
    pace.release(None, Outcome(0.0, 0.0, Response("ok"), None, 1))
    assert pace.delay == pytest.approx(0.1)


def _rates(limits: Limits) -> tuple[RateMeter, PauseMeter, dict[int, Credit]]:
    turn = Turn(simple=False)
    pause = PauseMeter(turn, None, adaptive=False)
    credits = {REQUESTS: Credit(), TOTAL: Credit()}
    return RateMeter(limits, credits, pause, None, turn), pause, credits


async def test_the_request_bucket_spaces_sends_by_the_gcra(looptime: float) -> None:
    rates, _, _ = _rates(Limits(rpm=60, burst=0, margin=0.0))
    sent = []
    for _ in range(3):
        await rates.acquire(Permit(0, 0, []))
        sent.append(_now())
    assert sent == pytest.approx([0.0, 1.0, 2.0], abs=1e-5)


async def test_a_pause_holds_the_rate_turn(looptime: float) -> None:
    rates, pause, _ = _rates(Limits(rpm=6000))
    pause.hold(3.0)
    await rates.acquire(Permit(0, 0, []))
    assert looptime == 3.0


async def test_the_token_bucket_reserves_then_settles_to_the_usage(looptime: float) -> None:
    rates, _, _ = _rates(Limits(tpm=600, period=60, burst=60, margin=0.0))
    permit = await rates.acquire(Permit(400, 100, []))
    ((_bucket, slot, _),) = permit.slots
    assert slot.cost == 500
    # 100 of the 600 are left: a call of 500 must wait for the window.
    assert rates.ready_at(0.0, (400, 100)) > 59.0
    rates.release(permit, _ok(usage=Usage(50, 50)))
    assert slot.cost == 100  # settled to the usage: 500 left now
    assert rates.ready_at(0.0, (400, 100)) == 0.0


async def test_a_429_widens_the_margin_once_per_round(looptime: float) -> None:
    rates, _, _ = _rates(Limits(rpm=600))
    await asyncio.sleep(1.0)
    rates.release(None, _refused(start=0.5))
    rates.release(None, _refused(start=0.5))  # sent before the widening: same round
    assert rates.buckets[0].bucket.margin == pytest.approx(0.05)
    rates.release(None, _refused(start=1.0))  # sent after it: the next round
    assert rates.buckets[0].bucket.margin == pytest.approx(0.07)


async def test_a_live_credit_decides_the_buckets_turn(looptime: float) -> None:
    rates, _, credits = _rates(Limits(rpm=6000))
    credits[REQUESTS].observe(0.0, 2.0, 100, _now(), 0.0)  # empty, 2 per second
    await rates.acquire(Permit(0, 0, []))
    assert looptime == 0.5  # one request refilled, not the bucket's burst


def _headers(tokens_governed: bool = False) -> tuple[HeaderMeter, PauseMeter]:
    turn = Turn(simple=True)
    pause = PauseMeter(turn, None, adaptive=False)
    return HeaderMeter(pause, turn, tokens_governed), pause


async def test_headers_with_a_rate_make_a_request_credit(looptime: float) -> None:
    headers, pause = _headers()
    # 0 of 8 left, full in 8 s: (8 - 0 - 0.08) / 8 per second, and a hold for one.
    headers.observe(RateLimitState(8, 0, 8.0), start=0.0, now=0.0, others=0)
    assert headers.requests.rate == pytest.approx(7.92 / 8)
    assert headers.requests.left(0.0) == 0.0
    assert pause.until == pytest.approx(8 / 7.92)


async def test_headers_without_a_limit_hold_until_the_reset(looptime: float) -> None:
    headers, pause = _headers()
    headers.observe(RateLimitState(requests_remaining=0, requests_reset=7.0), 1.0, 1.0, 0)
    assert not headers.requests.live
    assert pause.until == 8.0


async def test_token_headers_make_a_credit_only_for_a_tpm_bucket(looptime: float) -> None:
    state = RateLimitState(tokens_limit=1000, tokens_remaining=0, tokens_reset=10.0)
    governed, held = _headers(tokens_governed=True)
    governed.observe(state, 0.0, 0.0, 0)
    assert governed.tokens.live
    assert held.until == 0.0  # the credit waits for the refill, no hold
    ungoverned, pause = _headers(tokens_governed=False)
    ungoverned.observe(state, 0.0, 0.0, 0)
    assert not ungoverned.tokens.live
    assert pause.until == pytest.approx(1 / 99.9)  # one token at (1000 - 1) / 10 per second


async def test_the_steer_meter_takes_one_request_of_the_credit(looptime: float) -> None:
    headers, pause = _headers()
    headers.observe(RateLimitState(100, 1, 19.0), 0.0, 0.0, 0)  # 1 left, (100 - 1 - 1) / 19 per s
    steer = SteerMeter(pause, None, headers.requests, Turn(simple=False))
    await steer.acquire(Permit(0, 0, []))
    assert looptime == 0.0
    await steer.acquire(Permit(0, 0, []))
    assert float(looptime) == pytest.approx(19 / 98, abs=1e-5)


async def test_a_leased_gate_holds_a_local_slot_and_a_lease(looptime: float) -> None:
    asked: list[int] = []

    async def ask() -> bool:
        asked.append(1)
        return True

    lease = SlotLease(2, ask, lambda: None)
    gate = LeasedGate(1, lease)
    assert not gate.try_acquire()  # no lease held yet: the local slot goes back
    assert gate.statistics().in_flight == 0
    await gate.acquire()
    assert (asked, gate.statistics().in_flight, lease.used) == ([1], 1, 1)
    gate.release()
    assert (gate.statistics().in_flight, lease.used) == (0, 0)
    await lease.aclose()


async def test_a_lane_with_no_limits_is_an_empty_stack_on_the_fast_path() -> None:
    assert Lane(Limits()).try_acquire()
    assert not Lane(Limits(rpm=60)).try_acquire()
    assert not Lane(Limits.paced()).try_acquire()


async def test_a_broker_lane_ramping_after_a_pause_holds_the_ramps_slot(
    looptime: float,
) -> None:
    async def grant_many(costs: list[list[int]]) -> list[tuple[float, int]]:
        return [(0.0, 1) for _ in costs]

    grants = GrantQueue(grant_many, lambda grant, costs: None, 0.25)
    lane = GlobalLane(Limits(concurrency=4, rpm=6000), None, grants)
    lane.pause(1.0)
    permit = await lane.acquire()
    assert looptime == 1.0
    assert permit is not None
    assert permit.ramp is not None
    ramp = permit.ramp
    assert ramp.statistics().in_flight == 1
    lane.finish(permit, 1.0, Response("ok", usage=Usage(1, 1)))
    assert (ramp.statistics().in_flight, ramp.limit) == (0, 3)
    await grants.aclose()


async def test_token_headers_near_empty_hold_only_when_too_few_are_left(
    looptime: float,
) -> None:
    @dataclass(frozen=True)
    class _Reply(Response):
        rate_limit: RateLimitState | None = None

    def reply(request: Request) -> Response:
        # 50 of 1,000 tokens left (5%), refilling at (1000 - 50 - 1) / 10 per second.
        state = RateLimitState(tokens_limit=1000, tokens_remaining=50, tokens_reset=10.0)
        return _Reply("ok", usage=Usage(1, 1), rate_limit=state)

    # One law (decision 0230): enough is left for the next send, so it goes; the
    # spacing below 10% remaining of the two-law days is gone.
    llm = ScriptedLLM(reply, latency=0.0, limits=Limits(concurrency=1))
    await fanflow.map(llm, "{input}", ["a", "b", "c"])
    assert llm.started_at == [0.0, 0.0, 0.0]
