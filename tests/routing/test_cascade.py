"""Issue 23: ``fanflow.cascade`` asks a cheap model first and a strong one only for what
the cheap one cannot answer. Two SimServers on loopback are the tiers (each counts the
prompts it saw: the judge); virtual time throughout.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any

import pytest

import fanflow
from fanflow import ConfigError, Price
from fanflow.routing import agreement
from fanflow.testing import SimRequest, SimServer

pytestmark = pytest.mark.looptime

ITEMS = [f"easy {i}" for i in range(30)] + [f"hard {i}" for i in range(10)]
PRICES = {"cheap": Price(input=0.1, output=0.1), "strong": Price(input=10.0, output=10.0)}


def prompt(request: SimRequest) -> str:
    return request.messages[-1][1]


async def run_tiers(
    cheap_reply: Any, strong_reply: str, items: list[str], **kwargs: Any
) -> tuple[fanflow.MapResult[Any], set[str], int]:
    """The cascade's result over ``items``, the prompts the strong tier answered and
    the requests the cheap one saw."""
    parse = kwargs.pop("parse", None)
    async with (
        SimServer(latency=0.1, reply=cheap_reply) as cheap,
        SimServer(latency=0.1, reply=strong_reply) as strong,
    ):
        llm = fanflow.cascade(
            fanflow.openai("cheap", base_url=cheap.url, api_key="sk-a"),
            fanflow.openai("strong", base_url=strong.url, api_key="sk-b"),
            **kwargs,
        )
        async with llm:
            result = await fanflow.map(llm, "{input}", items, prices=PRICES, parse=parse)
        return result, set(strong.stats().prompt_completed), cheap.stats().requests


def cheap_reply(request: SimRequest) -> str:
    return "unsure" if prompt(request).startswith("hard") else "fine"


async def test_the_strong_tier_sees_only_what_the_cheap_one_failed() -> None:
    result, escalated, _ = await run_tiers(
        cheap_reply, "sure", ITEMS, accept=lambda text: text != "unsure", names=["small", "big"]
    )
    assert result.ok
    assert escalated == {i for i in ITEMS if i.startswith("hard")}
    assert result.outputs == ["fine"] * 30 + ["sure"] * 10
    hard = result.records[-1]
    assert len(hard.routes) == 1  # the cheap tier's call is kept in the record
    assert hard.cost > hard.routes[0].cost > 0
    assert len(hard.attempts) == 2
    summary = result.summary
    assert dict(summary.answered_by) == {"small": 30, "big": 10}
    assert summary.cascade_saved is not None
    assert summary.cascade_saved > 0
    assert "cascade_saved" in repr(summary)


async def test_agreement_escalates_when_the_cheap_samples_disagree() -> None:
    flip = itertools.cycle(["yes", "no"])

    def unsure_on_hard(request: SimRequest) -> str:
        return next(flip) if prompt(request).startswith("hard") else "fine"

    result, escalated, sampled = await run_tiers(
        unsure_on_hard, "sure", ITEMS, accept=agreement(samples=3)
    )
    assert result.ok
    assert escalated == {i for i in ITEMS if i.startswith("hard")}
    assert sampled == 3 * len(ITEMS)
    assert len(result.records[-1].routes) == 3  # every cheap sample's call is kept


async def test_a_parsed_value_is_what_accept_judges() -> None:
    result, _, _ = await run_tiers(
        '{"n": 1}',
        '{"n": 2}',
        ITEMS[:4],
        accept=lambda value: value["n"] > 1,
        parse=lambda r: json.loads(r.text),
    )
    assert result.outputs == [{"n": 2}] * 4


def test_bad_cascades_are_config_errors() -> None:
    one = fanflow.function(lambda r: "x")
    with pytest.raises(ConfigError, match="two or more"):
        fanflow.cascade(one, accept=bool)
    with pytest.raises(ConfigError, match="accept must be"):
        fanflow.cascade(one, fanflow.function(lambda r: "y"), accept="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="samples >= 2"):
        agreement(samples=1)


def test_the_cache_identity_names_the_rule_the_same_way_in_every_process() -> None:
    def tiers(accept: Any) -> fanflow.BaseLLM:
        return fanflow.cascade(
            fanflow.openai("cheap", base_url="http://127.0.0.1:9/v1", api_key="sk-a"),
            fanflow.openai("strong", base_url="http://127.0.0.1:10/v1", api_key="sk-b"),
            accept=accept,
        )

    short = tiers(lambda text: len(text) < 5).cache_identity()
    anything = tiers(lambda text: True).cache_identity()
    assert short["accept"] != anything["accept"]  # two lambdas are two rules
    voted = tiers(agreement(samples=3)).cache_identity()
    assert voted == tiers(agreement(samples=3)).cache_identity()
    assert "0x" not in json.dumps(voted)  # no address: the same in another process
    assert voted != tiers(agreement(samples=5)).cache_identity()


def test_rules_that_differ_only_in_what_their_closure_holds_are_two_rules() -> None:
    # A store must never serve one threshold's answers to another: the values a rule's
    # closure and defaults hold are part of its identity.
    def shorter_than(n: int) -> Any:
        return lambda text: len(text) < n

    def at_most(text: str, n: int = 5) -> bool:
        return len(text) <= n

    def rule(accept: Any) -> Any:
        return fanflow.cascade(
            fanflow.openai("cheap", base_url="http://127.0.0.1:9/v1", api_key="sk-a"),
            fanflow.openai("strong", base_url="http://127.0.0.1:10/v1", api_key="sk-b"),
            accept=accept,
        ).cache_identity()["accept"]

    assert rule(shorter_than(5)) == rule(shorter_than(5))
    assert rule(shorter_than(5)) != rule(shorter_than(50))
    at_most_ten = functools.partial(at_most, n=10)
    assert rule(at_most) != rule(at_most_ten)
    assert rule(at_most_ten) == rule(functools.partial(at_most, n=10))
