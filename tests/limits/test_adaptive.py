"""Limits.adaptive() finds an unknown capacity fast, at any latency (decision 0131).

SimServer refuses beyond a concurrency cap (429, Retry-After: 1) or beyond a rate (a
one-second token bucket with its headers); fanflow is told neither. Virtual time,
throughput counted at the server second by second."""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Limits, RetryPolicy
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

SECONDS = 30


@pytest.mark.parametrize("latency", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("cap", ["concurrency", "rate"])
async def test_adaptive_reaches_090_of_capacity_in_seconds_with_few_429s(
    looptime: float, cap: str, latency: float
) -> None:
    if cap == "concurrency":
        server_kw: dict[str, float] = {"max_in_flight": 10}
        capacity = 10 / latency  # calls per second
    else:
        server_kw = {"rpm": 50, "period": 1.0}
        capacity = 50.0
    n = int(capacity * SECONDS)
    async with SimServer(latency=latency, keep_requests=False, **server_kw) as server:  # type: ignore[arg-type]
        llm = fanflow.openai(
            "gpt-sim",
            base_url=server.url,
            api_key="sk-test",
            limits=Limits.adaptive(),
            retry=RetryPolicy(attempts=10, seed=1),
        )
        async with llm:
            result = await fanflow.map(llm, "{input}", [str(i) for i in range(n)])
        timeline = server.stats().timeline
    assert result.ok, result.errors
    done = {s.second: s.completed for s in timeline}
    refused = {s.second: s.rate_limited for s in timeline}
    last = max(done)
    # From the 5th second on, every 3 s stretch (but the last) runs at >= 0.9 capacity.
    for t in range(5, last - 3):
        assert sum(done.get(t + k, 0) for k in range(3)) >= 0.9 * 3 * capacity, t
    # Converged (after 10 s): a few 429s per minute at most.
    late = sum(refused.get(t, 0) for t in range(10, last + 1))
    assert late * 60 / max(1, last - 10) <= 6
