"""fanflow places Anthropic's cache_control on a template's constant part, and names each
template to OpenAI with prompt_cache_key; checked on the wire (SimServer) and in virtual
time."""

from __future__ import annotations

from typing import Any

import pytest

import fanflow
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

SYSTEM = " ".join(f"rule{i}" for i in range(2000))  # 2,000 SimServer tokens
ITEMS = [f"item {i}" for i in range(50)]
CLAUDE = {"claude-sim": fanflow.Price(3.00, 15.00, cached_input=0.30, cache_write=3.75)}


async def _map(
    server: SimServer, prompt: str, system: str | None = SYSTEM, **handle: Any
) -> fanflow.MapResult:
    async with fanflow.anthropic("claude-sim", base_url=server.root, api_key="k", **handle) as llm:
        await fanflow.call(llm, "warm up")  # past the breaker's cold start
        server.reset()
        return await fanflow.map(llm, prompt, ITEMS, system=system, concurrency=50, prices=CLAUDE)


async def test_the_system_prompt_gets_a_breakpoint_and_one_call_writes_it() -> None:
    async with SimServer(latency=1.0, prompt_cache=True) as server:
        result = await _map(server, "{input}")
        body = server.requests[0].body
        stats = server.stats()
    assert body["system"] == [
        {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}
    ]
    assert body["messages"][0]["content"] == "item 0"  # no constant text to mark
    # Primed: one write, then every call reads.
    assert (stats.cache_misses, stats.cache_hits) == (1, len(ITEMS) - 1)
    assert stats.cache_write_tokens == 2000
    summary = result.summary
    assert summary.usage.cache_write_input_tokens == 2000
    assert summary.usage.cached_input_tokens == 2000 * (len(ITEMS) - 1)
    assert summary.cache_saved is not None
    assert summary.cache_saved > 0


async def test_the_constant_lead_of_the_user_turn_gets_one_too() -> None:
    prompt = SYSTEM + "\n\nNow the item: {input}"
    async with SimServer(latency=1.0, prompt_cache=True) as server:
        await _map(server, prompt, system=None)
        content = server.requests[0].body["messages"][0]["content"]
        stats = server.stats()
    head = SYSTEM + "\n\nNow the item: "
    assert content == [
        {"type": "text", "text": head, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "item 0"},
    ]
    assert stats.cache_hits == len(ITEMS) - 1
    assert stats.cached_tokens == (len(ITEMS) - 1) * 2003  # the head's words


async def test_the_switch_off_places_none_and_does_not_prime() -> None:
    async with SimServer(latency=1.0, prompt_cache=True) as server:
        result = await _map(server, "{input}", cache_control=False)
        body = server.requests[0].body
    assert body["system"] == SYSTEM
    assert result.summary.usage.cached_input_tokens == 0
    assert result.makespan == pytest.approx(1.0)  # all 50 at once: not primed


def test_a_short_prompt_gets_no_breakpoint_and_batches_get_the_hour() -> None:
    llm = fanflow.anthropic("claude-haiku-4-5", base_url="http://127.0.0.1:9", api_key="k")
    template = {"fanflow.constant_chars": 0}  # what a map's template sets
    short = "x " * 3000  # ~1,500 tokens: under Haiku 4.5's 4,096
    assert llm.body(fanflow.Request.of("a", system=short, metadata=template))["system"] == short
    alone = fanflow.Request.of("a", system="y " * 10_000)  # a single call: not a template's
    assert isinstance(llm.body(alone)["system"], str)
    long = fanflow.Request.of("a", system="y " * 10_000, metadata=template)
    (block,) = llm.batch_body(long)["system"]
    assert block["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    mine = fanflow.anthropic(
        "claude-haiku-4-5", base_url="http://127.0.0.1:9", api_key="k",
        extra_body={"system": [{"type": "text", "text": "mine"}]},
    )  # fmt: skip
    assert mine.body(long)["system"] == [{"type": "text", "text": "mine"}]


async def test_openai_gets_one_prompt_cache_key_per_template() -> None:
    async with SimServer() as server:
        url = server.url
        async with fanflow.openai("gpt-sim", base_url=url, api_key="k") as plain:
            await fanflow.map(plain, "A: {input}", ["a"])
        kwargs: dict[str, Any] = {"base_url": url, "api_key": "k", "prompt_cache_key": True}
        async with fanflow.openai("gpt-sim", **kwargs) as llm:
            await fanflow.map(llm, "A: {input}", ["a", "b"])
            await fanflow.map(llm, "B: {input}", ["a"])
        extra = {"prompt_cache_key": "mine"}
        async with fanflow.openai("gpt-sim", extra_body=extra, **kwargs) as own:
            await fanflow.map(own, "A: {input}", ["a"])
        keys = [r.body.get("prompt_cache_key") for r in server.requests]
    # Not sent to a server other than OpenAI's unless asked; one key per template.
    assert keys[0] is None
    assert keys[1] == keys[2] != keys[3]
    assert keys[1] is not None
    assert keys[1].startswith("fanflow-")
    assert keys[4] == "mine"
