"""Rate-limit headers used to the full (issue 28 section 5, S2; decision 0176).

With ``Limits(rpm=...)`` the lane paces at 97% with half a second of burst (decision
0130), for a server whose limiter it cannot see. A server that sends
``x-ratelimit-remaining-requests`` says exactly how much is left, so there the
requests go as far as that reaches and then at its refill rate; the configured limit
still holds in every window. SimServer over loopback, virtual time.
"""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Limits, RetryPolicy
from fanflow.testing import SimServer

from .conftest import WindowCounter

pytestmark = pytest.mark.looptime

N = 600
RATE = 100  # requests per second at the server: a bucket of one second


async def _run(server: SimServer, limits: Limits) -> fanflow.MapResult[str]:
    llm = fanflow.openai(
        "gpt-sim",
        base_url=server.url,
        api_key="sk-test",
        limits=limits,
        retry=RetryPolicy(attempts=10, seed=1),
    )
    async with llm:
        return await fanflow.map(llm, "{input}", [str(i) for i in range(N)], concurrency=100)


async def test_with_headers_the_requests_left_are_used_to_the_full() -> None:
    # 6,000 RPM enforced as 100 per second; the handle knows the 6,000 RPM. Before:
    # 0.88 of the bound (the margin and the half-second burst), 0 429s.
    async with SimServer(rpm=RATE, period=1.0, latency=0.1, keep_requests=False) as server:
        result = await _run(server, Limits(rpm=RATE * 60))
        refused = server.stats().responses.get(429, 0)
    assert result.ok, result.errors
    assert refused == 0
    bound = (N - RATE) / RATE + 0.1  # the server's full bucket first, then its rate
    assert bound / result.makespan >= 0.95


async def test_a_server_allowing_more_than_the_limit_given_still_gets_the_limit(
    max_in_window: WindowCounter,
) -> None:
    # The headers say 200 per second are left; the handle was told 100 per second. The
    # configured limit is a promise (docs/architecture.md, promise 3).
    async with SimServer(rpm=2 * RATE, period=1.0, latency=0.1) as server:
        result = await _run(server, Limits(rpm=RATE, period=1.0))
        times = [r.at for r in server.requests]
    assert result.ok, result.errors
    assert max_in_window(times, [1.0] * len(times), 1.0) <= RATE
