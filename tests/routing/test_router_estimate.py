"""Issue 23: ``fanflow.estimate`` prices a router's and a cascade's items (decision
0270): a spread by its weights, a fallback on its first deployment, a cascade on its
first tier, each with the range the items may cost. Nothing is sent (a SimServer behind
each deployment counts that).
"""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Price
from fanflow.routing import agreement
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

PRICES = {"small": Price(input=1.0, output=2.0), "big": Price(input=10.0, output=40.0)}
ITEMS = [f"row {i:02d}" for i in range(8)]  # all the same length: one cost per model


def one_item(model: str) -> float:
    """What one item costs alone on a handle of ``model``."""
    llm = fanflow.openai(model, base_url="http://127.0.0.1:9/v1", api_key="sk-x")
    cost = fanflow.estimate(llm, "{input}", ITEMS[:1], max_tokens=20, prices=PRICES).cost
    assert cost is not None
    return cost


SMALL, BIG = one_item("small"), one_item("big")


async def test_a_spread_is_priced_by_its_weights_with_a_range() -> None:
    async with SimServer() as a, SimServer() as b:
        llm = fanflow.router(
            fanflow.openai("small", base_url=a.url, api_key="sk-a"),
            fanflow.openai("big", base_url=b.url, api_key="sk-b"),
            weights=[3, 1],
            names=["east", "west"],
        )
        e = fanflow.estimate(llm, "{input}", ITEMS, max_tokens=20, prices=PRICES)
        sent = a.stats().requests + b.stats().requests
    assert sent == 0
    assert e.items == e.calls == 8
    assert e.cost == pytest.approx(6 * SMALL + 2 * BIG, rel=1e-12)
    assert e.cost_range == pytest.approx((8 * SMALL, 8 * BIG), rel=1e-12)
    assert dict(e.by_deployment) == {
        "east": (6, pytest.approx(6 * SMALL)),
        "west": (2, pytest.approx(2 * BIG)),
    }
    assert set(e.by_model) == {"small", "big"}
    assert e.batch_cost == pytest.approx(e.cost / 2, rel=1e-12)
    assert e.unpriced_models == ()


def test_a_fallback_is_priced_on_its_first_deployment() -> None:
    llm = fanflow.router(
        fanflow.openai("big", base_url="http://127.0.0.1:9/v1", api_key="sk-a"),
        fanflow.openai("small", base_url="http://127.0.0.1:10/v1", api_key="sk-b"),
        strategy="fallback",
        names=["primary", "backup"],
    )
    e = fanflow.estimate(llm, "{input}", ITEMS, max_tokens=20, prices=PRICES)
    assert e.cost == pytest.approx(8 * BIG, rel=1e-12)
    assert dict(e.by_deployment) == {"primary": (8, pytest.approx(8 * BIG))}
    assert e.cost_range == pytest.approx((8 * SMALL, 8 * BIG), rel=1e-12)


def test_a_deployments_own_price_wins() -> None:
    llm = fanflow.router(
        fanflow.openai("small", base_url="http://127.0.0.1:9/v1", api_key="sk-a"),
        fanflow.openai("small", base_url="http://127.0.0.1:10/v1", api_key="sk-b"),
        prices=[None, PRICES["big"]],
        names=["list", "dear"],
    )
    e = fanflow.estimate(llm, "{input}", ITEMS, max_tokens=20, prices=PRICES)
    # Same model, but the second deployment's price is the big one's.
    assert e.cost == pytest.approx(4 * SMALL + 4 * BIG, rel=1e-12)
    assert e.cost_range == pytest.approx((8 * SMALL, 8 * BIG), rel=1e-12)


def test_a_cascade_is_priced_on_its_first_tier_up_to_every_tier() -> None:
    def tiers(**kwargs: object) -> fanflow.BaseLLM:
        return fanflow.cascade(
            fanflow.openai("small", base_url="http://127.0.0.1:9/v1", api_key="sk-a"),
            fanflow.openai("big", base_url="http://127.0.0.1:10/v1", api_key="sk-b"),
            names=["cheap", "strong"],
            **kwargs,  # type: ignore[arg-type]
        )

    plain = fanflow.estimate(
        tiers(accept=lambda t: True), "{input}", ITEMS, max_tokens=20, prices=PRICES
    )
    assert plain.calls == 8
    assert plain.cost == pytest.approx(8 * SMALL, rel=1e-12)
    assert plain.cost_range == pytest.approx((8 * SMALL, 8 * (SMALL + BIG)), rel=1e-12)
    assert dict(plain.by_deployment) == {"cheap": (8, pytest.approx(8 * SMALL))}
    sampled = fanflow.estimate(
        tiers(accept=agreement(samples=3)), "{input}", ITEMS, max_tokens=20, prices=PRICES
    )
    assert sampled.items == 8
    assert sampled.calls == 24  # three samples an item on the first tier
    assert sampled.cost == pytest.approx(24 * SMALL, rel=1e-12)
    assert sampled.cost_range == pytest.approx((24 * SMALL, 24 * SMALL + 8 * BIG), rel=1e-12)


def test_an_unpriced_deployment_makes_the_cost_unknown_and_says_which() -> None:
    llm = fanflow.router(
        fanflow.openai("small", base_url="http://127.0.0.1:9/v1", api_key="sk-a"),
        fanflow.openai("mystery", base_url="http://127.0.0.1:10/v1", api_key="sk-b"),
    )
    e = fanflow.estimate(llm, "{input}", ITEMS, max_tokens=20, prices=PRICES)
    assert e.cost is None
    assert e.cost_range is None
    assert e.unpriced_models == ("mystery",)
    assert dict(e.by_deployment)["small@127.0.0.1:9/v1"] == (4, pytest.approx(4 * SMALL))
