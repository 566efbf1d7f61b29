"""Priming: a map whose requests share a cacheable prefix sends one first, then the rest,
so parallelism does not waste the prompt cache (SimServer's cache, virtual time)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import pytest

import fanflow
from fanflow.providers import OpenAILLM
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

SYSTEM = " ".join(f"rule{i}" for i in range(2000))  # 2,000 SimServer tokens
ITEMS = [f"item {i}" for i in range(300)]
LATENCY = 1.0


@contextlib.asynccontextmanager
async def _warm(server: SimServer) -> AsyncIterator[OpenAILLM]:
    """A handle on ``server`` that has had its first answer: a new one holds all but 16
    calls until then (the breaker's cold start), which would hide what sending 100 at
    once does. The server's counters and cache start afresh."""
    async with fanflow.openai("gpt-sim", base_url=server.url, api_key="k") as llm:
        await fanflow.call(llm, "warm up")
        server.reset()
        yield llm


async def _run(prime: bool | None, items: list[str] = ITEMS) -> tuple[fanflow.MapResult, SimServer]:
    server = SimServer(latency=LATENCY, prompt_cache=True, keep_requests=False)
    async with server, _warm(server) as llm:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await fanflow.map(
            llm, "{input}", items, system=SYSTEM, concurrency=100, prime=prime
        )
        assert loop.time() - start == pytest.approx(result.makespan)
        return result, server


async def test_a_primed_map_misses_once_and_stays_within_one_call_of_the_bound() -> None:
    result, server = await _run(prime=None)  # the default: primed
    stats = server.stats()
    assert result.ok
    assert stats.cache_misses == 1
    assert stats.cache_hits == len(ITEMS) - 1
    bound = math.ceil(len(ITEMS) / 100) * LATENCY
    assert result.makespan <= bound + LATENCY
    assert result.summary.usage.cached_input_tokens == (len(ITEMS) - 1) * 1920


async def test_without_priming_the_first_wave_all_misses() -> None:
    result, server = await _run(prime=False)
    assert result.ok
    assert server.stats().cache_misses == 100  # everything sent at once


async def test_a_short_map_is_not_primed_unless_asked() -> None:
    _, server = await _run(prime=None, items=ITEMS[:8])
    assert server.stats().cache_misses == 8
    _, server = await _run(prime=True, items=ITEMS[:8])
    assert server.stats().cache_misses == 1


async def test_a_short_prefix_is_not_primed() -> None:
    server = SimServer(latency=LATENCY, prompt_cache=True, keep_requests=False)
    async with server, _warm(server) as llm:
        result = await fanflow.map(llm, "{input}", ITEMS, system="Be brief.", concurrency=100)
    assert result.makespan == pytest.approx(3 * LATENCY)  # no round trip added


async def test_a_system_prompt_that_changes_per_item_is_said_once_and_not_primed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def build(item: str) -> fanflow.Request:
        # A per-item value at the start of a long system prompt: nothing is shared.
        return fanflow.Request.of(item, system=f"Now is {item}. {SYSTEM}")

    server = SimServer(latency=LATENCY, prompt_cache=True, keep_requests=False)
    caplog.set_level(logging.WARNING, logger="fanflow")
    async with server, _warm(server) as llm:
        result = await fanflow.map(llm, build, ITEMS, concurrency=100)
    assert result.makespan == pytest.approx(3 * LATENCY)  # not primed
    said = [r.getMessage() for r in caplog.records if "system prompt" in r.getMessage()]
    assert len(said) == 1
    assert "item 1 differs from item 0's" in said[0]
    assert "Now is" not in said[0]  # never the prompt itself


async def test_fan_out_is_never_primed() -> None:
    server = SimServer(latency=LATENCY, prompt_cache=True, keep_requests=False)
    async with server, _warm(server) as llm:
        await fanflow.fan_out(
            llm, "question", system=SYSTEM, workers=12, aggregate=lambda rs: rs, temperatures=None
        )
    assert server.stats().cache_misses == 12  # all at once: a latency pattern


async def test_a_streaming_handle_releases_the_rest_at_the_first_token() -> None:
    # 1 s to the first token, then 1 s per word: the first reply takes 11 s in all.
    reply = " ".join(["word"] * 10)
    server = SimServer(latency=1.0, per_token=1.0, reply=reply, prompt_cache=True)
    async with (
        server,
        fanflow.openai("gpt-sim", base_url=server.url, api_key="k", stream=True) as llm,
    ):
        await fanflow.call(llm, "warm up")
        server.reset()
        result = await fanflow.map(llm, "{input}", ITEMS[:20], system=SYSTEM, concurrency=20)
        stats = server.stats()
    assert (stats.cache_misses, stats.cache_hits) == (1, 19)
    # The others start at the first token (2 s) and take 11 s: 13 s, not 11 + 11.
    assert result.makespan == pytest.approx(13.0)


async def test_constant_text_after_a_field_is_said_once_and_not_primed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = SimServer(latency=LATENCY, prompt_cache=True, keep_requests=False)
    caplog.set_level(logging.WARNING, logger="fanflow")
    async with server, _warm(server) as llm:
        result = await fanflow.map(llm, "{input}\n\n" + SYSTEM, ITEMS, concurrency=100)
    assert result.makespan == pytest.approx(3 * LATENCY)  # not primed
    said = [r.getMessage() for r in caplog.records if "constant text" in r.getMessage()]
    assert len(said) == 1
    assert "after its first field {input}" in said[0]
    # What to do, and why fanflow does not do it itself; never the prompt's text.
    assert "put that text before the first field (or in system=)" in said[0]
    assert "fanflow does not reorder a prompt" in said[0]
    assert "not primed" in said[0]
    assert "rule1" not in said[0]


async def test_constant_text_after_a_field_is_said_when_moving_it_would_make_it_cacheable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 600 words of system prompt and 600 of instructions after the field: by fanflow's
    # estimate (600 to 900 tokens each) neither is long enough to cache alone, both
    # together are (OpenAI: from 1,024).
    half = " ".join(["rules"] * 600)
    server = SimServer(latency=LATENCY, prompt_cache=True, keep_requests=False)
    caplog.set_level(logging.WARNING, logger="fanflow")
    async with server, _warm(server) as llm:
        await fanflow.map(llm, "{input}\n\n" + half, ITEMS, system=half, concurrency=100)
    said = [r.getMessage() for r in caplog.records if "constant text" in r.getMessage()]
    assert len(said) == 1
    assert "under the 1024 the provider caches from" in said[0]
    # The same template without the system prompt could not be cached either way.
    caplog.clear()
    server = SimServer(latency=LATENCY, prompt_cache=True, keep_requests=False)
    async with server, _warm(server) as llm:
        await fanflow.map(llm, "{input}\n\n" + half, ITEMS, concurrency=100)
    assert not [r for r in caplog.records if "constant text" in r.getMessage()]


@pytest.mark.parametrize(("prime", "misses"), [(None, 1), (False, 20)])
async def test_a_pool_primes_each_model_step(prime: bool | None, misses: int) -> None:
    server = SimServer(latency=LATENCY, prompt_cache=True, keep_requests=False)
    async with server, _warm(server) as llm:
        skill = fanflow.Skill(llm, "{text}", system=SYSTEM)
        inputs = [{"text": f"item {i}"} for i in range(60)]
        result = await fanflow.Pool(skill, inputs, max_flows=20, prime=prime).arun()
        stats = server.stats()
    assert result.ok
    assert stats.cache_misses == misses  # unprimed: the first 20 at once all miss
    assert stats.cache_hits == 60 - misses
