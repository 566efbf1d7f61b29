"""Prompt-cache prices: cached and written tokens priced apart, savings counted, an
unknown cache price an upper bound marked estimated (never silently zero)."""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Price, Request, Response, Usage
from fanflow._pricing import price_of, priced
from fanflow.testing import ScriptedLLM


def test_cached_and_written_tokens_are_priced_apart() -> None:
    claude = Price(3.00, 15.00, cached_input=0.30, cache_write=3.75)
    # 1,000 prompt tokens: 100 plain, 600 read from the cache, 300 written to it.
    usage = Usage(1000, 10, cached_input_tokens=600, cache_write_input_tokens=300)
    cost = priced(usage, claude)
    expected = (100 * 3.00 + 600 * 0.30 + 300 * 3.75 + 10 * 15.00) / 1e6
    assert cost.dollars == pytest.approx(expected)
    assert cost.cache_saved == pytest.approx((1000 * 3.00 + 10 * 15.00) / 1e6 - expected)
    assert not cost.estimated
    # Through a batch API, both the cost and the saving are at the batch share.
    assert priced(usage, claude, batch=True).dollars == pytest.approx(expected / 2)


def test_writes_cost_more_than_no_cache_and_the_saving_says_so() -> None:
    claude = price_of("claude-sonnet-4-5")
    assert claude is not None
    written = priced(Usage(3000, 0, cache_write_input_tokens=3000), claude)
    assert written.cache_saved < 0  # a write is 1.25x: caching every miss costs more


def test_an_unknown_cache_price_is_an_upper_bound_marked_estimated() -> None:
    pro = price_of("gpt-5-pro")
    assert pro is not None
    assert pro.cached_input is None
    cost = priced(Usage(1000, 0, cached_input_tokens=800), pro)
    assert cost.dollars == pytest.approx(1000 * 15.00 / 1e6)  # as plain input, not zero
    assert cost.estimated
    assert not priced(Usage(1000, 0), pro).estimated  # no cache used: nothing unknown


@pytest.mark.parametrize(
    ("model", "share"),
    [("gpt-4o", 0.5), ("gpt-4.1", 0.25), ("gpt-5", 0.1), ("claude-opus-4-5", 0.1)],
)
def test_the_table_has_the_vendors_cache_shares(model: str, share: float) -> None:
    price = price_of(model)
    assert price is not None
    assert price.cached_input is not None
    assert price.cached_input == pytest.approx(price.input * share)
    if model.startswith("claude"):
        assert price.cache_write == pytest.approx(price.input * 1.25)


def _cached_reply(request: Request) -> Response:
    usage = Usage(2000, 100, cached_input_tokens=1536)
    return Response("ok", usage=usage, model="gpt-4.1-mini")


async def test_records_and_the_summary_count_what_the_cache_saved() -> None:
    result = await fanflow.map(ScriptedLLM(_cached_reply), "{input}", ["a", "b"])
    record = result.records[0]
    plain = (464 * 0.40 + 1536 * 0.10 + 100 * 1.60) / 1e6
    assert record.cost == pytest.approx(plain)
    assert record.cache_saved == pytest.approx(1536 * (0.40 - 0.10) / 1e6)
    summary = result.summary
    assert summary.usage.cached_input_tokens == 2 * 1536
    assert summary.cache_saved == pytest.approx(2 * record.cache_saved)
    assert not summary.cost_estimated
    assert "cache_saved=" in repr(summary)


async def test_an_unknown_cache_price_marks_the_summary_estimated() -> None:
    def reply(request: Request) -> Response:
        return Response("ok", usage=Usage(2000, 0, cached_input_tokens=1024), model="o3-pro")

    result = await fanflow.map(ScriptedLLM(reply), "{input}", ["a"])
    assert result.records[0].cost == pytest.approx(2000 * 20.00 / 1e6)
    assert result.records[0].cost_estimated
    assert result.summary.cost_estimated
    assert "cost=~" in repr(result.summary)


async def test_a_dollar_budget_is_charged_at_the_cache_price() -> None:
    budget = fanflow.Budget(usd=1.0)
    llm = ScriptedLLM(_cached_reply, model="gpt-4.1-mini")
    await fanflow.map(llm, "{input}", ["a"], budget=budget)
    assert budget.spent == pytest.approx((464 * 0.40 + 1536 * 0.10 + 100 * 1.60) / 1e6)


def test_the_dry_run_estimate_prices_the_shared_prefix_from_the_cache() -> None:
    llm = fanflow.openai("gpt-4.1-mini", base_url="http://127.0.0.1:9", api_key="k")
    system = "Follow these rules. " * 400  # 8,000 characters: ~2,000 tokens
    items = [f"item {i}" for i in range(100)]
    estimate = fanflow.estimate(llm, "{input}", items, system=system, max_tokens=10)
    assert estimate.cost is not None
    assert estimate.cached_cost is not None
    assert estimate.cached_prefix_tokens >= 2000
    # 99 calls read the prefix at a quarter of the input price.
    saved = 99 * estimate.cached_prefix_tokens * (0.40 - 0.10) / 1e6
    assert estimate.cached_cost == pytest.approx(estimate.cost - saved)
    short = fanflow.estimate(llm, "{input}", items, system="Be brief.", max_tokens=10)
    assert short.cached_cost is None  # under the 1,024-token minimum: nothing cached
