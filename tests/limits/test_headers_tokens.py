"""Token headers used to the full (issue 28 section 5, S3; decision 0218).

With ``Limits(tpm=...)`` the lane paces tokens at 97% with half a second of burst
(decision 0130), for a server whose limiter it cannot see. A server that sends
``x-ratelimit-remaining-tokens`` says exactly how many tokens are left, so there the
tokens go as far as that reaches and then at its refill rate; the configured limit
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
PER_CALL = 7  # SimServer counts words: "item 17" (2) + "a b c d e" (5)
CALLS = 100  # calls per second the server's tokens allow: a bucket of one second


async def _run(server: SimServer, limits: Limits) -> fanflow.MapResult[str]:
    llm = fanflow.openai(
        "gpt-sim",
        base_url=server.url,
        api_key="sk-test",
        limits=limits,
        retry=RetryPolicy(attempts=10, seed=1),
    )
    async with llm:
        items = [str(i) for i in range(N)]
        return await fanflow.map(llm, "item {input}", items, concurrency=100, max_tokens=5)


async def test_with_token_headers_the_tokens_left_are_used_to_the_full() -> None:
    # 42,000 TPM enforced as 700 per second; the handle knows the 42,000 TPM. Before:
    # 0.87 of the bound (the margin and the half-second burst), 0 429s.
    async with SimServer(
        tpm=CALLS * PER_CALL,
        period=1.0,
        latency=0.1,
        reply="a b c d e",
        keep_requests=False,
    ) as server:
        result = await _run(server, Limits(tpm=CALLS * PER_CALL * 60))
        refused = server.stats().responses.get(429, 0)
    assert result.ok, result.errors
    assert refused == 0
    bound = (N - CALLS) / CALLS + 0.1  # the server's full bucket first, then its rate
    assert bound / result.makespan >= 0.95


async def test_a_server_allowing_more_tokens_than_the_limit_given_still_gets_the_limit(
    max_in_window: WindowCounter,
) -> None:
    # The headers say 1,400 tokens per second are left; the handle was told 700 per
    # second. The configured limit is a promise (docs/architecture.md, promise 3).
    async with SimServer(
        tpm=2 * CALLS * PER_CALL, period=1.0, latency=0.1, reply="a b c d e"
    ) as server:
        result = await _run(server, Limits(tpm=CALLS * PER_CALL, period=1.0))
        times = [r.at for r in server.requests]
    assert result.ok, result.errors
    assert max_in_window(times, [PER_CALL] * len(times), 1.0) <= CALLS * PER_CALL
