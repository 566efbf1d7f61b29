"""Limits on the wire: fanflow's HTTP handles against SimServer, counted at the server.

SimServer enforces RPM/TPM with token buckets and answers 429 with Retry-After, as the
hosted APIs do. It runs on the test's loop, so virtual time (looptime) makes minutes of
traffic instant and exact. Every count below is the server's own (``server.stats()``,
the same counters as its ``/stats`` endpoint), not fanflow's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

import fanflow
from fanflow import Budget, Limits, RetryPolicy, Status
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime


def _openai(server: SimServer, limits: Limits, **kw: Any) -> fanflow.BaseLLM:
    return fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test", limits=limits, **kw)


def _most_in_any(timeline: Any, field: str, seconds: int) -> int:
    """The most of ``field`` the server counted in any run of ``seconds`` seconds."""
    per_second: Mapping[int, int] = {s.second: getattr(s, field) for s in timeline}
    if not per_second:
        return 0
    last = max(per_second)
    return max(
        sum(per_second.get(t, 0) for t in range(start, start + seconds))
        for start in range(last + 1)
    )


async def _stats_over_http(server: SimServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{server.root}/stats") as r:
        data: dict[str, Any] = await r.json()
        return data


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_rpm_at_the_servers_limit_draws_no_429(looptime: float, api: str) -> None:
    async with SimServer(rpm=120, latency=0.5, reply="ok") as server:
        if api == "openai":
            handle = _openai(server, Limits(rpm=120))
        else:
            handle = fanflow.anthropic(
                "claude-sim", base_url=server.root, api_key="sk-ant", limits=Limits(rpm=120)
            )
        async with handle as llm:
            items = [str(i) for i in range(300)]
            result = await fanflow.map(llm, "item {input}", items)
        stats = await _stats_over_http(server)
        timeline = server.stats().timeline
    assert result.ok
    assert stats["responses"] == {"200": 300}  # not one 429
    assert _most_in_any(timeline, "admitted", 60) <= 120
    # The whole allowance is used: 300 requests at 2 per second need 150 s.
    assert result.makespan <= 1.05 * 300 / 2


async def test_tpm_at_the_servers_limit_draws_no_429(looptime: float) -> None:
    # SimServer counts a token per word: "item 17" is 2 in, the reply 5 out (7 a call);
    # fanflow reserves its own estimate (8 in + 5 out) and settles to the reported 7.
    async with SimServer(tpm=700, latency=0.5, reply="a b c d e") as server:
        async with _openai(server, Limits(tpm=700)) as llm:
            items = [str(i) for i in range(250)]
            result = await fanflow.map(llm, "item {input}", items, max_tokens=5)
        stats = server.stats()
    assert result.ok
    assert stats.responses == {200: 250}
    assert stats.tokens_in + stats.tokens_out == 250 * 7
    assert _most_in_any(stats.timeline, "tokens", 60) <= 700
    # 1,750 tokens at 700 per minute: 2.5 minutes; settling keeps it near that.
    assert result.makespan <= 1.05 * 250 * 7 / (700 / 60)


async def test_two_patterns_sharing_a_handle_stay_within_its_limit(looptime: float) -> None:
    async with SimServer(rpm=60, latency=0.2, reply="ok") as server:
        async with _openai(server, Limits(rpm=60)) as llm:
            a, b = await asyncio.gather(
                fanflow.map(llm, "a {input}", [str(i) for i in range(60)]),
                fanflow.map(llm, "b {input}", [str(i) for i in range(60)]),
            )
        stats = server.stats()
    assert a.ok
    assert b.ok
    assert stats.responses == {200: 120}
    assert _most_in_any(stats.timeline, "admitted", 60) <= 60


async def test_a_429_with_retry_after_pauses_the_lane(looptime: float) -> None:
    # The first request gets an injected 429 "try again in 1 s" (retry-after-ms: 1000);
    # no limits are configured, so only the pause keeps the rest from being sent.
    async with SimServer(latency=3.0, reply="ok", fault_on={"^item 0$": ["429"]}) as server:
        async with _openai(server, Limits(concurrency=4)) as llm:
            items = [str(i) for i in range(10)]
            result = await fanflow.map(
                llm, "item {input}", items, retry=RetryPolicy(jitter=False, initial=0.1)
            )
        stats = server.stats()
    assert result.ok
    assert stats.responses == {200: 10, 429: 1}
    requests = {s.second: s.requests for s in stats.timeline}
    # Second 0: item 0 (429) and items 1-3; nothing during the 1 s pause; at t=1 the
    # ramp lets exactly one call go (a spare worker's next item, which was queued first:
    # map keeps workers beyond the concurrency so a backoff does not idle a slot), and
    # nothing more until the ramp sees a success.
    assert requests[0] == 4
    assert requests[1] == 1
    assert 2 not in requests
    # The 429'd call is never retried sooner than its Retry-After.
    assert result.records[0].attempts[1].start >= 1.0


async def test_adaptive_concurrency_converges_on_the_servers_capacity(
    looptime: float,
) -> None:
    # Capacity unknown to the client: 30 in flight at 1 s each (30 calls/s). Above
    # that, SimServer answers 429 at once.
    async with SimServer(max_in_flight=30, latency=1.0, reply="ok") as server:
        async with _openai(
            server, Limits.adaptive(initial=4), retry=RetryPolicy(attempts=20, seed=3)
        ) as llm:
            items = [str(i) for i in range(1200)]
            result = await fanflow.map(llm, "item {input}", items)
            level = llm.statistics().adaptive_limit
        stats = server.stats()
    assert result.ok
    completed = {s.second: s.completed for s in stats.timeline}
    seconds = sorted(completed)
    warm = seconds[len(seconds) // 3 : -2]  # skip the climb and the tail
    throughput = sum(completed[s] for s in warm) / len(warm)
    assert throughput >= 0.8 * 30
    assert level is not None
    assert 20 <= level <= 40
    assert stats.responses.get(429, 0) < 0.1 * 1200


async def test_a_budget_is_never_exceeded_under_concurrency(looptime: float) -> None:
    async with SimServer(latency=1.0, reply="a b c d e") as server:
        async with _openai(server, Limits(concurrency=50)) as llm:
            budget = Budget(tokens=1000)
            items = [str(i) for i in range(400)]
            result = await fanflow.map(llm, "item {input}", items, max_tokens=5, budget=budget)
        stats = server.stats()
    used = stats.tokens_in + stats.tokens_out
    assert used <= 1000
    assert budget.spent == used
    assert result.summary.succeeded == stats.requests
    assert result.summary.skipped == 400 - stats.requests
    skipped = [r for r in result.records if r.status is Status.SKIPPED]
    assert all(isinstance(r.error, fanflow.BudgetExceeded) for r in skipped)


async def test_rate_limit_headers_steer_a_handle_that_was_told_no_limits(
    looptime: float,
) -> None:
    # The client knows nothing of the server's 60 RPM; the x-ratelimit-* headers on each
    # reply say how much is left and when it refills, and the lane slows down before
    # the bucket runs dry instead of learning it from 429s.
    async with SimServer(rpm=60, latency=0.5, reply="ok") as server:
        async with _openai(server, Limits(concurrency=4)) as llm:
            items = [str(i) for i in range(150)]
            result = await fanflow.map(llm, "item {input}", items)
        stats = server.stats()
    assert result.ok
    assert stats.responses == {200: 150}  # not one 429
    # 60 at once from the full bucket, then one a second as it refills, spaced at
    # 97% of the refill rate (the margin): about 90 / 0.97 s.
    assert result.makespan <= 1.05 * 90 / 0.97 + 1
