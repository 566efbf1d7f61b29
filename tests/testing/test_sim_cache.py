"""SimServer's prompt cache, read by the official SDKs and by fanflow's own clients.

A prefix is readable once the prefill of a request carrying it ends (the server's
``latency``), so requests sent at once all miss; OpenAI caches from 1,024 tokens in
steps of 128, Anthropic at ``cache_control`` breakpoints above the model's minimum.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

import fanflow
from fanflow.testing import SimCache, SimServer

pytestmark = pytest.mark.looptime

SYSTEM = " ".join(f"w{i}" for i in range(2000))  # 2,000 SimServer tokens


def _openai(server: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url, api_key="sk-test", max_retries=0)


def _anthropic(server: SimServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.root, api_key="sk-ant-test", max_retries=0)


async def _ask_openai(client: openai.AsyncOpenAI, prompt: str, system: str = SYSTEM) -> Any:
    completion = await client.chat.completions.create(
        model="gpt-sim",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    return completion.usage


async def test_openai_caches_the_prefix_once_its_prefill_ends() -> None:
    async with SimServer(latency=1.0, per_token=1.0, prompt_cache=True) as server:
        async with _openai(server) as client:
            # Two at once: neither finds the other's prefix (both are prefilling).
            first = await asyncio.gather(_ask_openai(client, "a b"), _ask_openai(client, "c"))
            assert [u.prompt_tokens_details.cached_tokens for u in first] == [0, 0]
            # 2,002 tokens: the cached prefix is 1,024 + 7 x 128 = 1,920 of them.
            later = await _ask_openai(client, "d e f")
            assert later.prompt_tokens == 2003
            assert later.prompt_tokens_details.cached_tokens == 1920
            # A different prefix shares nothing.
            other = await _ask_openai(client, "a", system="x " + SYSTEM)
            assert other.prompt_tokens_details.cached_tokens == 0
        stats = server.stats()
    assert (stats.cache_hits, stats.cache_misses, stats.cached_tokens) == (1, 3, 1920)


async def test_openai_reads_once_the_prefill_is_done_not_the_reply() -> None:
    # The reply takes 100 s (100 words at 1 s); the prefix is readable after 1 s.
    server = SimServer(latency=1.0, per_token=1.0, reply="x " * 100, prompt_cache=True)
    async with server, _openai(server) as client:
        first = asyncio.ensure_future(_ask_openai(client, "a"))
        await asyncio.sleep(0.5)
        during = asyncio.ensure_future(_ask_openai(client, "b"))
        await asyncio.sleep(1.0)  # t = 1.5: the first prefill ended at 1.0
        after = await _ask_openai(client, "c")
        assert after.prompt_tokens_details.cached_tokens == 1920
        assert (await during).prompt_tokens_details.cached_tokens == 0
        await first


async def test_short_prompts_are_not_cached_and_entries_expire() -> None:
    cache = SimCache(ttl=60.0)
    async with SimServer(latency=1.0, prompt_cache=cache) as server, _openai(server) as client:
        short = " ".join(["s"] * 1000)  # 1,002 tokens: under OpenAI's 1,024
        await _ask_openai(client, "a", system=short)
        again = await _ask_openai(client, "b", system=short)
        assert again.prompt_tokens_details.cached_tokens == 0
        await _ask_openai(client, "a")
        await asyncio.sleep(30)
        assert (await _ask_openai(client, "b")).prompt_tokens_details.cached_tokens == 1920
        await asyncio.sleep(61)  # a read renewed it for 60 s; now it is gone
        assert (await _ask_openai(client, "c")).prompt_tokens_details.cached_tokens == 0
        assert server.stats().cache_misses == 2  # the short prompt is not a miss


def _system_blocks(text: str = SYSTEM, ttl: str | None = None) -> list[dict[str, Any]]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    return [{"type": "text", "text": text, "cache_control": control}]


async def test_anthropic_writes_at_a_breakpoint_and_reads_it_later() -> None:
    async with SimServer(latency=1.0, prompt_cache=True) as server, _anthropic(server) as client:

        async def ask(prompt: str, system: Any) -> Any:
            message = await client.messages.create(
                model="claude-sim",
                max_tokens=10,
                system=system,
                messages=[{"role": "user", "content": prompt}],
            )
            return message.usage

        both = await asyncio.gather(ask("a b", _system_blocks()), ask("c", _system_blocks()))
        # Sent at once, both write: each pays for a write, neither reads.
        assert [(u.cache_creation_input_tokens, u.cache_read_input_tokens) for u in both] == [
            (2000, 0),
            (2000, 0),
        ]
        assert [u.input_tokens for u in both] == [2, 1]  # after the breakpoint only
        later = await ask("d e f", _system_blocks())
        assert (later.cache_read_input_tokens, later.cache_creation_input_tokens) == (2000, 0)
        assert later.input_tokens == 3
        plain = await ask("d", SYSTEM)  # no breakpoint: Anthropic caches nothing
        assert (plain.cache_read_input_tokens, plain.input_tokens) == (0, 2001)
        short = await ask("d", _system_blocks("s " * 500))  # under the 1,024 minimum
        assert (short.cache_creation_input_tokens, short.input_tokens) == (0, 501)


async def test_anthropic_refuses_a_fifth_breakpoint() -> None:
    async with SimServer(prompt_cache=True) as server, _anthropic(server) as client:
        blocks = _system_blocks("a") * 5
        with pytest.raises(anthropic.BadRequestError, match="maximum of 4 blocks"):
            await client.messages.create(
                model="claude-sim",
                max_tokens=10,
                system=blocks,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": "x"}],
            )


async def test_the_sdks_stream_the_cache_fields() -> None:
    async with SimServer(latency=1.0, prompt_cache=True) as server:
        async with _openai(server) as client:
            for expected in (0, 1920):
                stream = await client.chat.completions.create(
                    model="gpt-sim",
                    messages=[
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "a"},
                    ],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
                assert usage[-1].prompt_tokens_details.cached_tokens == expected
        async with _anthropic(server) as aclient:
            for read in (0, 2000):
                async with aclient.messages.stream(
                    model="claude-sim",
                    max_tokens=10,
                    system=_system_blocks(ttl="1h"),  # type: ignore[arg-type]
                    messages=[{"role": "user", "content": "a"}],
                ) as events:
                    final = await events.get_final_message()
                assert final.usage.cache_read_input_tokens == read
                assert final.usage.cache_creation_input_tokens == 2000 - read


async def test_fanflow_reads_the_cache_from_both_apis() -> None:
    async with SimServer(latency=1.0, prompt_cache=True) as server:
        async with fanflow.openai("gpt-sim", base_url=server.url, api_key="k") as llm:
            request = fanflow.Request.of("a", system=SYSTEM)
            await llm.complete(request)
            usage = (await llm.complete(request)).usage
        assert usage == fanflow.Usage(2001, usage.output_tokens, cached_input_tokens=1920)
        async with fanflow.anthropic("claude-sim", base_url=server.root, api_key="k") as claude:
            body = {"system": _system_blocks()}
            claude.extra_body = body
            first = (await claude.complete(fanflow.Request.of("a"))).usage
            second = (await claude.complete(fanflow.Request.of("a"))).usage
        assert (first.input_tokens, first.cache_write_input_tokens) == (2001, 2000)
        assert (second.input_tokens, second.cached_input_tokens) == (2001, 2000)


def test_expired_entries_are_dropped() -> None:
    from fanflow.testing._simcache import _PURGE_EVERY, PromptCache
    from fanflow.testing._simwire import parse_request

    cache = PromptCache(SimCache(ttl=1.0, min_tokens=1))
    for n in range(2 * _PURGE_EVERY):  # a distinct one-token prompt a second, each cached
        message = {"role": "user", "content": f"p{n}"}
        body = json.dumps({"model": "m", "messages": [message]}).encode()
        cache.use(parse_request("openai", body, n), now=float(n), prefilled=float(n))
    assert len(cache._entries) <= _PURGE_EVERY + 1  # not one per prompt ever sent


async def test_stats_count_the_one_hour_writes_apart() -> None:
    """A 1-hour breakpoint then a 5-minute one: of the 2,500 tokens written, the 1,500
    up to the first breakpoint are written for an hour (``ephemeral_1h_input_tokens``),
    and the stats (and ``GET /stats``) count them apart from the total."""
    hour = {
        "type": "text",
        "text": "h " * 1500,
        "cache_control": {"type": "ephemeral", "ttl": "1h"},
    }
    five = {"type": "text", "text": "f " * 1000, "cache_control": {"type": "ephemeral"}}
    async with SimServer(latency=1.0, prompt_cache=True) as server, _anthropic(server) as client:
        usages = []
        for _ in range(2):  # the second reads what the first wrote
            message = await client.messages.create(
                model="claude-sim",
                max_tokens=10,
                system=[hour, five],  # type: ignore[list-item]
                messages=[{"role": "user", "content": "a"}],
            )
            usages.append(message.usage)
        assert usages[0].cache_creation is not None
        assert usages[0].cache_creation.ephemeral_1h_input_tokens == 1500
        assert usages[1].cache_read_input_tokens == 2500
        stats = server.stats()
        async with aiohttp.ClientSession() as http, http.get(f"{server.root}/stats") as reply:
            wire = await reply.json()
    assert (stats.cache_write_tokens, stats.cache_write_1h_tokens) == (2500, 1500)
    assert (wire["cache_write_tokens"], wire["cache_write_1h_tokens"]) == (2500, 1500)
