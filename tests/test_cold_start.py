"""A new HTTP handle's first wave (issue 28 section 5, issue 27 part 3, decision 0175).

A refusal (401, a 429 of a concurrency cap or of an empty bucket) comes back in about a
round trip; an answer only after the whole generation. So a new handle sends its first
16 calls and doubles the wave for every few round trips that pass without a refusal:
a wrong key or a small server is found before the wave is large, and a right key
against a large server is in full flight long before the first answer.

SimServer over loopback is the judge (it counts requests and refusals); virtual time
throughout, so the counts and times are exact.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest

import fanflow
from fanflow import Status
from fanflow.errors import RateLimited
from fanflow.testing import SimServer

from ._helpers import COLD_CALLS

pytestmark = pytest.mark.looptime

ITEMS = [str(i) for i in range(300)]
#: "A few dozen": the most refusals a first wave may draw from a small server.
FEW_DOZEN = 36


def _llm(server: SimServer) -> fanflow.BaseLLM:
    return fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test")


def first_wave_refusals(result: fanflow.MapResult[object]) -> int:
    """429s that came back before the first answer: the first wave's overshoot."""
    attempts = [a for r in result.records for a in r.attempts]
    first = min(a.end for a in attempts if a.status is Status.SUCCEEDED)
    return sum(1 for a in attempts if isinstance(a.error, RateLimited) and a.end <= first)


def first_sends(result: fanflow.MapResult[object]) -> list[float]:
    """When each item's first attempt was sent, from the start of the map."""
    start = min(r.attempts[0].start for r in result.records)
    return sorted(r.attempts[0].start - start for r in result.records)


async def test_a_right_key_is_in_full_flight_before_the_first_answer() -> None:
    # A generous server that takes 1 s per answer: before, 284 of the 300 waited for
    # the first answer (1 s) and the map took 2 s.
    async with SimServer(latency=1.0, keep_requests=False) as server, _llm(server) as llm:
        result = await fanflow.map(llm, "{input}", ITEMS)
    assert result.ok, result.errors
    sends = first_sends(result)
    assert sends[-1] < 0.2  # every item sent well before a generation's latency
    assert sends[COLD_CALLS] > 0.0  # but not all at once: the first 16 went first
    assert result.makespan < 1.25


async def test_a_wrong_key_is_found_within_the_first_wave() -> None:
    async with (
        SimServer(api_key="sk-right", latency=1.0) as server,
        fanflow.openai("m", base_url=server.url, api_key="sk-wrong") as llm,
    ):
        result = await fanflow.map(llm, "{input}", ITEMS)
    assert server.stats().requests <= COLD_CALLS
    counts = Counter(r.status for r in result.records)
    assert counts[Status.SKIPPED] >= len(ITEMS) - COLD_CALLS


async def test_a_server_taking_ten_at_once_refuses_few_of_the_first_wave() -> None:
    # No limits given: without a cold start all 300 go at once and 290 are refused.
    async with (
        SimServer(latency=0.1, max_in_flight=10, keep_requests=False) as server,
        _llm(server) as llm,
    ):
        result = await fanflow.map(llm, "{input}", ITEMS)
    assert result.ok, result.errors
    assert first_wave_refusals(result) <= FEW_DOZEN
    assert server.stats().responses.get(429, 0) <= FEW_DOZEN


@pytest.mark.parametrize("headers", [True, False], ids=["headers", "no-headers"])
async def test_a_rate_limited_server_refuses_few_of_the_first_wave(headers: bool) -> None:
    # 50 requests a second from a bucket of one second; no limits given. Without the
    # rate-limit headers (nginx's limit_req) the first wave drew 249 refusals before.
    async with (
        SimServer(
            latency=0.1, rpm=50, period=1.0, rate_headers=headers, keep_requests=False
        ) as server,
        _llm(server) as llm,
    ):
        result = await fanflow.map(llm, "{input}", ITEMS)
    assert result.ok, result.errors
    assert first_wave_refusals(result) <= FEW_DOZEN
    # The whole run (the adaptive limit settling after the first wave): 277 before.
    assert server.stats().responses.get(429, 0) <= 2 * FEW_DOZEN


def _busy_start(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Connections asked for in a loop's first ``seconds`` are handed out only then, as
    when the loop is busy starting the map (the command's reads and builds every
    worker's first item before it reads a socket): the first connection seems to take
    ``seconds``, and the cold start's steps are three times that."""
    connect = aiohttp.TCPConnector.connect
    started: list[float] = []

    async def busy(
        self: aiohttp.TCPConnector, req: Any, traces: Any, timeout: Any
    ) -> aiohttp.connector.Connection:
        now = asyncio.get_running_loop().time()
        if not started:
            started.append(now)
        if now < started[0] + seconds:
            await asyncio.sleep(started[0] + seconds - now)
        return await connect(self, req, traces, timeout)

    monkeypatch.setattr(aiohttp.TCPConnector, "connect", busy)


def _like_nginx() -> SimServer:
    """nginx's limit_req as the command met it: 50 a second, a burst of 50, a 429 at once
    with no headers and no Retry-After."""
    return SimServer(
        latency=0.1,
        rpm=50,
        period=1.0,
        rate_headers=False,
        retry_after=False,
        keep_requests=False,
    )


@pytest.mark.parametrize("late", [0.0, 0.06], ids=["connections-at-once", "busy-start"])
async def test_a_limiter_that_says_nothing_but_429_refuses_a_few_dozen_in_all(
    monkeypatch: pytest.MonkeyPatch, late: float
) -> None:
    # A refusal with no headers and no Retry-After comes back at once, so it keeps its
    # slot for as long as an answer takes; else the adaptive limit bounds the calls in
    # flight but not the refusals a second (50 in all before decision 0300).
    # busy-start: the first connections seemed to take 60 ms, so the steps lasted
    # 180 ms, and a doubling from 64 to 128 sent in one go drew 59 refusals. A doubling
    # goes in parts now (decision 0313).
    _busy_start(monkeypatch, late)
    async with _like_nginx() as server, _llm(server) as llm:
        result = await fanflow.map(llm, "{input}", ITEMS)
    assert result.ok, result.errors
    assert server.stats().responses.get(429, 0) <= FEW_DOZEN
