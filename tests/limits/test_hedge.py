"""The hedging policy (decision 0133): a duplicate once an attempt is slower than a high
quantile of the handle's recent latencies, at most 5% extra calls, within the limits."""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Limits, RetryPolicy
from fanflow._hedge import HEDGE_EXTRA, HEDGE_MIN_DELAY, Hedger, hedge_delay
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


def test_the_delay_is_a_high_quantile_and_never_near_the_median() -> None:
    assert hedge_delay([1.0] * 31) is None  # too few to trust
    # A wide distribution: the 99th percentile.
    wide = [0.1 * i for i in range(1, 101)]
    assert hedge_delay(wide) == pytest.approx(10.0)
    # A tight one: 1.5 x the median, not a hair above it.
    assert hedge_delay([1.0] * 99 + [1.01]) == pytest.approx(1.5)


def test_the_delay_has_a_floor_so_instant_answers_are_never_hedged() -> None:
    # Latencies of 0 (a clock that did not move during the calls) once gave a delay of
    # 0: every watched attempt got a duplicate the moment it was sent.
    assert hedge_delay([0.0] * 64) == HEDGE_MIN_DELAY
    assert hedge_delay([0.001] * 64) == HEDGE_MIN_DELAY


def test_hedges_stay_under_their_share_of_the_calls() -> None:
    hedger = Hedger()
    hedger.calls = 100
    taken = sum(hedger.allow() for _ in range(50))
    assert taken == int(HEDGE_EXTRA * 100)
    for _ in range(40):
        hedger.observe(1.0)
    assert hedger.delay() == pytest.approx(1.5)


async def test_a_hung_call_is_hedged_instead_of_waiting_for_its_timeout(looptime: float) -> None:
    # 1 s per call, 10 at a time; call 100 hangs. With a 30 s timeout the item would
    # wait 30 s (and then back off) before a second try; the policy asks for a
    # duplicate once it is 1.5 s old, which waits its turn under the handle's limit
    # (the queue ahead of it: at most 2 rounds of 1 s) like any call.
    llm = ScriptedLLM(
        latency=1.0,
        failures={100: Fault.hang()},
        retry=RetryPolicy(hedge=True, seed=1),
        timeout=30.0,
        limits=Limits(concurrency=10),
    )
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(200)])
    assert result.ok
    hedged = [r for r in result.records if any(a.hedge for a in r.attempts)]
    assert len(hedged) == 1
    record = hedged[0]
    assert record.end is not None
    assert 2.5 <= record.end - record.start <= 6.0  # admission, 1.5 s, queue, 1 s
    assert float(looptime) < 25.0  # not 30 s for the hung one
    assert llm.statistics().hedges == 1


async def test_plain_traffic_is_not_hedged(looptime: float) -> None:
    llm = ScriptedLLM(latency=(0.9, 1.1), seed=5, retry=RetryPolicy(hedge=True))
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(500)], concurrency=20)
    assert result.ok
    assert llm.statistics().hedges <= 0.02 * 500


async def test_hedging_is_on_for_http_handles_and_off_for_local_work() -> None:
    assert fanflow.openai("m", base_url="http://127.0.0.1:9/v1", api_key="k").hedges
    assert not ScriptedLLM().hedges
    assert not fanflow.function(lambda r: "x").hedges
    llm = ScriptedLLM(latency=1.0, failures={40: Fault.hang()}, timeout=5.0)
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(60)], concurrency=5)
    assert not any(a.hedge for r in result.records for a in r.attempts)


async def test_retry_policy_hedge_false_turns_it_off(looptime: float) -> None:
    llm = ScriptedLLM(
        latency=1.0,
        failures={40: Fault.hang()},
        timeout=5.0,
        retry=RetryPolicy(hedge=False),
    )
    llm.hedges = True  # as an HTTP handle
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(60)], concurrency=5)
    assert result.ok
    assert not any(a.hedge for r in result.records for a in r.attempts)
