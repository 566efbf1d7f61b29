"""Safe defaults (issue 17): nothing lost with no limits given, 429s of the handle's own
making cost no attempt, odd Retry-Afters give bounded waits with the reason recorded,
and contradictory limits fail at construction. Virtual time throughout."""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Limits, RetryPolicy, Status
from fanflow.testing import Fault, ScriptedLLM, SimServer

pytestmark = pytest.mark.looptime


def _llm(server: SimServer, **kw: object) -> fanflow.BaseLLM:
    return fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test", **kw)  # type: ignore[arg-type]


async def test_with_no_limits_every_item_finishes_against_an_unknown_concurrency(
    looptime: float,
) -> None:
    # The case: 300 items, a server allowing 10 in flight (429 + Retry-After: 1
    # beyond), the default handle and retry policy (4 attempts). Before: 190 failed.
    async with SimServer(latency=0.1, max_in_flight=10, keep_requests=False) as server:
        async with _llm(server) as llm:
            result = await fanflow.map(llm, "{input}", [str(i) for i in range(300)])
            stats = llm.statistics()
        responses = server.stats().responses
    assert result.ok, result.errors
    assert responses[200] == 300
    # The controller woke at the first 429 and settled at or below the server's 10.
    assert stats.adaptive_limit is not None
    assert stats.concurrency.limit is not None
    assert stats.concurrency.limit <= 10
    # The first wave overshoots (300 sent, 290 refused); after it, few more 429s.
    assert responses[429] < 290 + 60
    # 300 x 0.1 s / 10 = 3 s at best; the refused wave waits out its Retry-After (1 s).
    assert float(looptime) < 3.0 * 1.6 + 1.0


async def _against_a_rate(**server_kw: object) -> tuple[fanflow.MapResult[str], dict[int, int]]:
    """300 items, no limits, against 50 requests per second (a bucket of one second,
    Retry-After when refused): the result and the server's responses by status."""
    async with SimServer(
        latency=0.1,
        rpm=50,
        period=1.0,
        keep_requests=False,
        **server_kw,  # type: ignore[arg-type]
    ) as server:
        async with _llm(server) as llm:
            result = await fanflow.map(llm, "{input}", [str(i) for i in range(300)])
        return result, dict(server.stats().responses)


async def test_with_no_limits_every_item_finishes_against_an_unknown_rate(
    looptime: float,
) -> None:
    # Decision 0159: the cold start's first answers say how many requests are left
    # (x-ratelimit-remaining-requests) and how fast they refill; the rest of the wave
    # goes as far as that reaches, then at the refill rate. Before: 249 of 300 refused.
    result, responses = await _against_a_rate()
    assert result.ok, result.errors
    assert responses[200] == 300
    assert responses.get(429, 0) <= 15, responses
    # (300 - 50) / 50 = 5 s at best (the bucket's burst first); no slower than 10% more.
    assert float(looptime) < 5.0 * 1.1 + 0.2


async def test_without_rate_limit_headers_the_first_wave_still_loses_nothing(
    looptime: float,
) -> None:
    # A limiter that only answers 429 (nginx's limit_req, many gateways): nothing to
    # steer by before the first refusal, so the wave overshoots, and is requeued.
    result, responses = await _against_a_rate(rate_headers=False)
    assert result.ok, result.errors
    assert responses[200] == 300


async def test_a_429_of_the_handles_own_load_uses_up_no_attempt(looptime: float) -> None:
    # One attempt each and a server taking one call at a time: every 429 came while the
    # handle had another call in flight, so it is requeued, never counted.
    async with (
        SimServer(latency=0.5, max_in_flight=1) as server,
        _llm(server, retry=RetryPolicy(attempts=1), limits=Limits()) as llm,
    ):
        result = await fanflow.map(llm, "{input}", [str(i) for i in range(5)])
    assert result.ok, result.errors
    requeued = [a for r in result.records for a in r.attempts if a.requeued]
    assert requeued  # some were refused...
    assert all(isinstance(a.error, fanflow.errors.RateLimited) for a in requeued)
    assert result.summary.calls == 5 + len(requeued)  # ...and went again for free


async def test_a_429_with_nothing_else_in_flight_counts(looptime: float) -> None:
    llm = ScriptedLLM(
        failures={0: Fault.rate_limited(retry_after=1.0), 1: Fault.rate_limited(1.0)},
        retry=RetryPolicy(attempts=2),
    )
    record = (await fanflow.map(llm, "{input}", ["alone"])).records[0]
    assert record.status is Status.FAILED
    assert [a.requeued for a in record.attempts] == [False, False]
    assert float(looptime) == 1.0  # exactly the Retry-After, not a backoff beyond it


async def test_a_retry_after_of_an_hour_waits_max_wait_and_says_so(looptime: float) -> None:
    llm = ScriptedLLM(
        failures={0: Fault.rate_limited(retry_after=3600.0)},
        retry=RetryPolicy(max_wait=30.0),
    )
    record = (await fanflow.map(llm, "{input}", ["x"])).records[0]
    assert record.ok
    assert float(looptime) == 30.0
    note = record.attempts[0].note
    assert note is not None
    assert "3600" in note
    assert "max_wait" in note


async def test_a_retry_after_past_the_deadline_stops_at_once_and_says_so(
    looptime: float,
) -> None:
    llm = ScriptedLLM(failures={0: Fault.rate_limited(retry_after=20.0)})
    result = await fanflow.map(llm, "{input}", ["x"], deadline=10.0)
    record = result.records[0]
    assert record.status is Status.FAILED
    assert isinstance(record.error, fanflow.errors.RateLimited)
    assert float(looptime) == 0.0  # no hang until the deadline, let alone past it
    note = record.attempts[0].note
    assert note is not None
    assert "deadline" in note


@pytest.mark.parametrize("retry_after", [None, 0.0])
async def test_a_429_without_a_usable_retry_after_backs_off_and_says_so(
    looptime: float, retry_after: float | None
) -> None:
    # A missing, negative, unreadable ("abc") or past-date Retry-After reaches the engine
    # as None or 0 (providers/_ratelimit.py): the backoff applies, bounded by max_wait.
    llm = ScriptedLLM(
        failures={0: Fault.rate_limited(retry_after=retry_after)},
        retry=RetryPolicy(jitter=False, initial=0.5),
    )
    record = (await fanflow.map(llm, "{input}", ["x"])).records[0]
    assert record.ok
    assert float(looptime) == 0.5
    note = record.attempts[0].note
    assert note is not None
    assert "no usable Retry-After" in note


async def test_the_adaptive_default_does_not_stall_the_handle_after_a_429(
    looptime: float,
) -> None:
    # Item 0 gets a 429 asking for 2 s. Only it waits: the other calls keep going (the
    # old behaviour paused every call for the Retry-After and then some).
    llm = ScriptedLLM(latency=0.1, failures={0: Fault.rate_limited(retry_after=2.0)})
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(40)], concurrency=4)
    assert result.ok
    during = [t for t in llm.started_at if 0.0 < t < 2.0]
    assert len(during) >= 30
    assert llm.statistics().pauses == 0


async def test_a_429_under_known_rate_limits_widens_the_margin(looptime: float) -> None:
    llm = ScriptedLLM(latency=0.1, failures={3: Fault.rate_limited(0.5)}, limits=Limits(rpm=600))
    result = await fanflow.map(llm, "{input}", [str(i) for i in range(10)])
    assert result.ok
    assert llm.statistics().margin == pytest.approx(0.05)


def test_contradictory_limits_fail_with_the_fix() -> None:
    with pytest.raises(fanflow.ConfigError, match="rpm must be > 0, got 0; use None"):
        Limits(rpm=0)
    with pytest.raises(fanflow.ConfigError, match="tpm must be > 0, got -5"):
        Limits(tpm=-5)
    with pytest.raises(fanflow.ConfigError, match="concurrency must be >= 1"):
        Limits(concurrency=-1)
    with pytest.raises(fanflow.ConfigError, match=r"more than the period.*burst=60"):
        Limits(rpm=100, burst=120)
    with pytest.raises(fanflow.ConfigError, match="margin must be in"):
        Limits(rpm=100, margin=0.7)
    with pytest.raises(fanflow.ConfigError, match=r"Limits.adaptive\(max=...\)"):
        Limits(concurrency=10, controller=fanflow.limits.Adaptive())
    with pytest.raises(fanflow.ConfigError, match="probe"):
        Limits.adaptive(probe=0)
    with pytest.raises(fanflow.ConfigError, match="min <= initial <= max"):
        Limits.adaptive(initial=5000)


def test_the_default_limits_are_documented_constants() -> None:
    assert fanflow.limits.DEFAULT_CONCURRENCY == 1024
    limits = fanflow.limits.DEFAULT_LIMITS
    assert limits.concurrency is None
    assert limits.controller is not None
    assert limits.controller.initial is None
    assert limits.controller.max == fanflow.limits.DEFAULT_CONCURRENCY
    assert ScriptedLLM().limits is limits


@pytest.mark.parametrize(
    ("server_kw", "n"),
    [
        ({"rpm": 50, "period": 1.0, "latency": 0.05}, 120),
        ({"max_in_flight": 10, "latency": 0.1}, 200),
    ],
    ids=["rate-with-headers", "10-in-flight"],
)
def test_a_new_event_loop_starts_from_what_the_handle_learnt(
    server_kw: dict[str, float], n: int
) -> None:
    # Each fanflow.run (asyncio.run) has a loop of its own, and a lane per loop; the
    # breaker's cold start is over after the first. The second run used to start from
    # scratch: 114 of 120 refused against the bucket the first run had emptied, 180 of
    # 200 against 10 in flight (there the inherited level's probe counted its growth
    # from the other loop's clock). Real time, SimServer in its thread: 2-3 s a run.
    import asyncio

    with SimServer(keep_requests=False, **server_kw) as server:  # type: ignore[arg-type]
        llm = _llm(server)

        async def run() -> tuple[bool, int]:
            result = await fanflow.map(llm, "{input}", [str(i) for i in range(n)])
            return result.ok, llm.statistics().rate_limited

        first = asyncio.run(run())
        second = asyncio.run(run())
    assert first[0]
    assert second[0]
    assert second[1] <= 15, second


def test_a_new_event_loop_keeps_the_rate_limits_reservations() -> None:
    # Limits(rpm=50): the sends of the first run still count in the second run's window
    # (they did at the server), so the second run's lane does not start with a fresh
    # burst. Real time, as above; the second loop starts well within the 1 s window.
    import asyncio

    with SimServer(latency=0.05, rpm=50, period=1.0, keep_requests=False) as server:
        llm = _llm(server, limits=Limits(rpm=50, period=1.0))

        async def run() -> bool:
            result = await fanflow.map(llm, "{input}", [str(i) for i in range(100)])
            return result.ok

        async def counted() -> float:
            bucket = llm.lane()._buckets[0][0]
            now = asyncio.get_running_loop().time()
            return sum(s.cost for s in bucket._log if s.time <= now < s.time + bucket.period)

        assert asyncio.run(run())
        # About 48 went in the run's last second; the new loop starts a few tenths of
        # a second later (the old one's teardown), so at least half are still counted.
        assert asyncio.run(counted()) >= 24
