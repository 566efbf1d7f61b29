"""A batch's lines share the prompt cache: SimServer's batch endpoints read and write it
as each line is processed, so batch mode's 1-hour breakpoints are priced end to end."""

from __future__ import annotations

import pytest

import fanflow
from fanflow.testing import SimBatches, SimServer

pytestmark = pytest.mark.looptime

SYSTEM = " ".join(f"rule{i}" for i in range(2000))  # 2,000 SimServer tokens
PRICE = fanflow.Price(3.0, 15.0, cached_input=0.3, cache_write=3.75, cache_write_1h=6.0)


async def test_a_batch_writes_the_hour_cache_once_and_its_other_lines_read_it() -> None:
    # 20 lines over two hours: 6 minutes apart, longer than a 5-minute entry lives.
    async with SimServer(prompt_cache=True, batches=SimBatches(time=7200.0)) as server:
        llm = fanflow.anthropic("claude-sim", base_url=server.root, api_key="sk-ant-test")
        items = [f"item {i}" for i in range(20)]
        result = await fanflow.map(
            llm, "{input}", items, system=SYSTEM, mode="batch", prices={"claude-sim": PRICE}
        )
        await llm.aclose()
        stats = server.stats()
    usages = [r.usage for r in result.records]
    assert [u.cache_write_1h_input_tokens for u in usages] == [2000] + [0] * 19
    assert [u.cached_input_tokens for u in usages] == [0] + [2000] * 19
    assert (stats.cache_hits, stats.cache_misses, stats.cache_write_tokens) == (19, 1, 2000)
    first, second = result.records[0], result.records[1]
    plain = first.usage.input_tokens - 2000
    out = first.usage.output_tokens
    assert first.cost == pytest.approx((2000 * 6.0 + plain * 3.0 + out * 15.0) / 2e6)
    plain = second.usage.input_tokens - 2000
    out = second.usage.output_tokens
    assert second.cost == pytest.approx((2000 * 0.3 + plain * 3.0 + out * 15.0) / 2e6)
    assert result.summary.usage.cache_write_1h_input_tokens == 2000


async def test_five_minute_entries_expire_between_lines_far_apart() -> None:
    # The same batch with the user's own 5-minute breakpoint: every line misses.
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    async with SimServer(prompt_cache=True, batches=SimBatches(time=7200.0)) as server:
        llm = fanflow.anthropic("claude-sim", base_url=server.root, api_key="sk-ant-test")
        llm.extra_body = {"system": system}
        items = [f"item {i}" for i in range(20)]
        result = await fanflow.map(llm, "{input}", items, mode="batch")
        await llm.aclose()
    assert [r.usage.cache_write_input_tokens for r in result.records] == [2000] * 20
    assert not any(r.usage.cache_write_1h_input_tokens for r in result.records)
