"""Anthropic's one-hour cache writes: reported apart (``cache_creation``), read by
fanflow streamed or not, and priced at their own rate (2x input; 5-minute writes 1.25x)."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

import fanflow
from fanflow import Price, Request, Response, Usage
from fanflow._pricing import load_prices, price_of, priced
from fanflow.testing import ScriptedLLM, SimServer

pytestmark = pytest.mark.looptime

SYSTEM = " ".join(f"w{i}" for i in range(2000))  # 2,000 SimServer tokens
RULES = " ".join(f"r{i}" for i in range(1500))


def _blocks(ttl: str | None) -> list[dict[str, Any]]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    return [{"type": "text", "text": SYSTEM, "cache_control": control}]


async def test_simserver_reports_the_hour_and_five_minute_writes_apart() -> None:
    async with (
        SimServer(latency=1.0, prompt_cache=True) as server,
        anthropic.AsyncAnthropic(
            base_url=server.root, api_key="sk-ant-test", max_retries=0
        ) as client,
    ):
        hour = await client.messages.create(
            model="claude-sim",
            max_tokens=5,
            system=_blocks("1h"),  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "a"}],
        )
        # An hour for the system prompt, then five minutes for the rules after it.
        mixed = await client.messages.create(
            model="claude-sim",
            max_tokens=5,
            system=_blocks("1h"),  # type: ignore[arg-type]
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": RULES, "cache_control": {"type": "ephemeral"}},
                        {"type": "text", "text": "b"},
                    ],
                }
            ],
        )
    assert hour.usage.cache_creation is not None
    assert hour.usage.cache_creation_input_tokens == 2000
    assert hour.usage.cache_creation.ephemeral_1h_input_tokens == 2000
    assert hour.usage.cache_creation.ephemeral_5m_input_tokens == 0
    assert mixed.usage.cache_read_input_tokens == 2000
    assert mixed.usage.cache_creation is not None
    assert mixed.usage.cache_creation.ephemeral_1h_input_tokens == 0
    assert mixed.usage.cache_creation.ephemeral_5m_input_tokens == 1500


@pytest.mark.parametrize("stream", [False, True])
async def test_fanflow_reads_the_hour_writes(stream: bool) -> None:
    async with (
        SimServer(latency=1.0, prompt_cache=True) as server,
        fanflow.anthropic("claude-sim", base_url=server.root, api_key="k", stream=stream) as claude,
    ):
        claude.extra_body = {"system": _blocks("1h")}
        first = (await claude.complete(Request.of("a"))).usage
        claude.extra_body = {"system": _blocks(None)}
        other = (await claude.complete(Request.of("a", model="claude-sim-2"))).usage
    assert first is not None
    assert other is not None
    assert (first.cache_write_input_tokens, first.cache_write_1h_input_tokens) == (2000, 2000)
    assert (other.cache_write_input_tokens, other.cache_write_1h_input_tokens) == (2000, 0)


def test_hour_writes_are_priced_at_their_own_rate() -> None:
    claude = Price(3.00, 15.00, cached_input=0.30, cache_write=3.75, cache_write_1h=6.00)
    # 1,000 prompt tokens: 100 plain, 300 written for 5 minutes, 600 for an hour.
    usage = Usage(1000, 0, cache_write_input_tokens=900, cache_write_1h_input_tokens=600)
    expected = (100 * 3.00 + 300 * 3.75 + 600 * 6.00) / 1e6
    assert priced(usage, claude).dollars == pytest.approx(expected)
    assert priced(usage, claude, batch=True).dollars == pytest.approx(expected / 2)
    assert not priced(usage, claude).estimated
    assert "cache_write_1h=6" in repr(claude)
    # No hour price: the hour's writes are charged at the 5-minute one, marked estimated.
    five = Price(3.00, 15.00, cached_input=0.30, cache_write=3.75)
    cost = priced(usage, five)
    assert cost.dollars == pytest.approx((100 * 3.00 + 900 * 3.75) / 1e6)
    assert cost.estimated


def test_the_table_prices_hour_writes_at_twice_the_input() -> None:
    for model in ("claude-opus-4-5", "claude-sonnet-4-5", "claude-haiku-4-5", "claude-3-haiku"):
        price = price_of(model)
        assert price is not None
        assert price.cache_write_1h == pytest.approx(2 * price.input)
    gpt = price_of("gpt-4.1")
    assert gpt is not None
    assert gpt.cache_write_1h is None


def test_a_prices_file_takes_the_hour_price(tmp_path: Any) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('[models]\n"m" = { input = 1, output = 2, cache_write_1h = 2 }\n')
    assert load_prices(path)["m"].cache_write_1h == 2.0


def test_usage_adds_the_hour_writes() -> None:
    a = Usage(10, 0, cache_write_input_tokens=5, cache_write_1h_input_tokens=5)
    assert (a + a).cache_write_1h_input_tokens == 10


async def test_records_budgets_and_the_summary_price_hour_writes() -> None:
    def reply(request: Request) -> Response:
        usage = Usage(3000, 0, cache_write_input_tokens=3000, cache_write_1h_input_tokens=3000)
        return Response("ok", usage=usage, model="claude-sonnet-4-5")

    budget = fanflow.Budget(usd=1.0)
    llm = ScriptedLLM(reply, model="claude-sonnet-4-5")
    result = await fanflow.map(llm, "{input}", ["a", "b"], budget=budget)
    hour = 3000 * 6.00 / 1e6
    assert result.records[0].cost == pytest.approx(hour)
    assert result.records[0].cache_saved == pytest.approx(-3000 * 3.00 / 1e6)
    assert result.summary.cost == pytest.approx(2 * hour)
    assert result.summary.usage.cache_write_1h_input_tokens == 6000
    assert budget.spent == pytest.approx(2 * hour)


async def test_the_records_file_sinks_and_the_summary_carry_the_hour_writes() -> None:
    from fanflow.cli._records import record_to_json
    from fanflow.store._sinks import row_of

    def reply(request: Request) -> Response:
        usage = Usage(3000, 0, cache_write_input_tokens=3000, cache_write_1h_input_tokens=2000)
        return Response("ok", usage=usage, model="claude-sonnet-4-5")

    result = await fanflow.map(ScriptedLLM(reply), "{input}", ["a"])
    record = result.records[0]
    assert record_to_json(record)["cache_write_1h_input_tokens"] == 2000
    assert row_of(record, "a")["usage"]["cache_write_1h_input_tokens"] == 2000
    assert "cache_write_1h=2000" in repr(result.summary)


def test_the_estimate_prices_a_batch_with_the_hour_cache() -> None:
    llm = fanflow.anthropic("claude-sonnet-4-5", base_url="http://127.0.0.1:9", api_key="k")
    system = "Follow these rules. " * 400  # ~2,000 tokens
    items = [f"item {i}" for i in range(100)]
    estimate = fanflow.estimate(llm, "{input}", items, system=system, max_tokens=10)
    assert estimate.batch_cost is not None
    assert estimate.batch_cached_cost is not None
    tokens = estimate.cached_prefix_tokens
    assert tokens >= 2000
    # At half price: 99 lines read the prefix (0.1x), the first writes it for an hour (2x).
    saved = (99 * tokens * (3.00 - 0.30) - tokens * (6.00 - 3.00)) / 2e6
    assert estimate.batch_cached_cost == pytest.approx(estimate.batch_cost - saved)
    short = fanflow.estimate(llm, "{input}", items, system="Be brief.", max_tokens=10)
    assert short.batch_cached_cost is None
