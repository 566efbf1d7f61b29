"""Prices and costs: known models priced, unknown ones never guessed; dry runs."""

from __future__ import annotations

from pathlib import Path

import pytest

import fanflow
from fanflow import Price, Request, Response, Usage
from fanflow._pricing import cost_of, price_of
from fanflow._tokens import estimate_tokens, request_tokens
from fanflow.testing import ScriptedLLM


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-mini", Price(0.15, 0.60, cached_input=0.075)),
        ("gpt-4o-mini-2024-07-18", Price(0.15, 0.60, cached_input=0.075)),
        ("gpt-4o", Price(2.50, 10.00, cached_input=1.25)),
        (
            "claude-3-5-haiku-20241022",
            Price(0.80, 4.00, cached_input=0.08, cache_write=1.0, cache_write_1h=1.6),
        ),
        (
            "claude-3-5-sonnet-latest",
            Price(3.00, 15.00, cached_input=0.3, cache_write=3.75, cache_write_1h=6.0),
        ),
        ("gpt-4o-audio-preview", None),  # a different model: never guessed
        ("llama-3-8b", None),
        (None, None),
    ],
)
def test_price_lookup(model: str | None, expected: Price | None) -> None:
    assert price_of(model) == expected


def test_user_prices_come_first() -> None:
    mine = {"gpt-4o": Price(1.0, 1.0), "local": Price(0.0, 0.0)}
    assert price_of("gpt-4o", mine) == Price(1.0, 1.0)
    assert price_of("local", mine) == Price(0.0, 0.0)
    assert cost_of("gpt-4o", Usage(1_000_000, 500_000), mine) == 1.5
    assert cost_of("unknown", Usage(10, 10)) is None
    with pytest.raises(fanflow.ConfigError, match="dollars per million"):
        Price(-1.0, 0.0)
    assert repr(Price(0.15, 0.6)) == "fanflow.Price(input=0.15, output=0.6)"


async def test_records_carry_cost_and_results_sum_it() -> None:
    def reply(request: Request) -> Response:
        return Response("ok", usage=Usage(1000, 500), model="gpt-4o-mini")

    result = await fanflow.map(ScriptedLLM(reply), "{input}", ["a", "b"])
    assert result.records[0].cost == pytest.approx(0.00045)
    assert result.summary.cost == pytest.approx(0.0009)


async def test_an_unknown_model_has_unknown_cost() -> None:
    result = await fanflow.map(ScriptedLLM(model="mystery"), "{input}", ["a"])
    assert result.records[0].cost is None
    assert result.summary.cost is None


def test_token_heuristic() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("日本語") == 3  # one per character outside ASCII
    # 3 to prime the reply, 3 per message; output = max_tokens, else the default.
    assert request_tokens(Request.of("abcd", system="abcdefgh", max_tokens=7)) == (12, 7)
    assert request_tokens(Request.of("abcd")) == (7, 1024)


def test_dry_run_estimate() -> None:
    llm = ScriptedLLM(model="gpt-4o-mini")
    estimate = fanflow.estimate(llm, "Summarize: {text}", [{"text": "x" * 40}] * 10, max_tokens=50)
    # "Summarize: " + 40 chars = 51 chars -> 13 tokens, + 6 of overhead = 19 per item.
    assert estimate.items == 10
    assert estimate.input_tokens == 190
    assert estimate.output_tokens == 500
    assert estimate.cost == pytest.approx((190 * 0.15 + 500 * 0.60) / 1e6)
    unknown = fanflow.estimate(ScriptedLLM(model="mystery"), "{input}", ["a"])
    assert unknown.cost is None
    assert unknown.unpriced_models == ("mystery",)
    assert "cost=unknown" in repr(unknown)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-5", Price(1.25, 10.00, cached_input=0.125)),
        ("gpt-5-2025-08-07", Price(1.25, 10.00, cached_input=0.125)),
        ("gpt-5-mini", Price(0.25, 2.00, cached_input=0.025)),
        (
            "claude-sonnet-4-5",
            Price(3.00, 15.00, cached_input=0.3, cache_write=3.75, cache_write_1h=6.0),
        ),
        ("claude-sonnet-4-5-20250929", Price(3.00, 15.00, 0.5, 0.3, 3.75, 6.0)),
        (
            "claude-haiku-4-5",
            Price(1.00, 5.00, cached_input=0.1, cache_write=1.25, cache_write_1h=2.0),
        ),
        ("gemini-2.5-flash", Price(0.30, 2.50)),
    ],
)
def test_current_models_are_priced(model: str, expected: Price) -> None:
    assert price_of(model) == expected


def test_the_built_in_table_is_the_data_file(tmp_path: Path) -> None:
    import tomllib
    from importlib import resources

    from fanflow._pricing import PRICES, load_prices

    data = tomllib.loads(resources.files("fanflow").joinpath("prices.toml").read_text())
    assert set(PRICES) == set(data["models"])
    assert data["checked"]  # the date the table was last checked against the vendors
    # A user's file in the same format; mistakes name the file and the model.
    mine = tmp_path / "prices.toml"
    mine.write_text('[models]\n"my-model" = { input = 1, output = 2 }\n')
    assert load_prices(mine) == {"my-model": Price(1.0, 2.0)}
    mine.write_text('[models]\n"my-model" = { input = "lots" }\n')
    with pytest.raises(fanflow.ConfigError, match=r"prices.toml: the price of 'my-model' must"):
        load_prices(mine)
    mine.write_text("x = 1\n")
    with pytest.raises(fanflow.ConfigError, match=r"no \[models\] table"):
        load_prices(mine)


def test_the_cli_suggests_only_priced_models() -> None:
    from fanflow.cli._providers import _EXAMPLE_MODEL

    for model in _EXAMPLE_MODEL.values():
        assert price_of(model) is not None, model
