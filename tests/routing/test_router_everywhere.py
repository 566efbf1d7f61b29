"""Issue 23: a router is one handle, usable wherever a handle is: every pattern, a
parser over deployments of different models, prices per deployment, pickling (batch
mode: test_router_batch.py). Two SimServers on loopback; virtual time.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

import fanflow
from fanflow import Price, Request
from fanflow._progress import Tracker
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime


def two(a: SimServer, b: SimServer, **kwargs: Any) -> fanflow.BaseLLM:
    return fanflow.router(
        fanflow.openai("model-a", base_url=a.url, api_key="sk-a"),
        fanflow.openai("model-b", base_url=b.url, api_key="sk-b"),
        **kwargs,
    )


async def test_the_patterns_take_a_router() -> None:
    async with (
        SimServer(latency=0.1, reply="42") as a,
        SimServer(latency=0.1, reply="42") as b,
        two(a, b) as llm,
    ):
        voted = await fanflow.vote(llm, "the answer?", n=4)
        one = await fanflow.call(llm, "hello")
        best = await fanflow.best_of_n(llm, "the answer?", n=2)
        async with fanflow.as_completed(llm, "{input}", ["x", "y", "z"]) as stream:
            streamed = [record async for record in stream]
        raw = await llm.complete(Request.of("direct"))
    assert voted.winner == "42"
    assert one.text == "42"
    assert best.best is not None
    assert sorted(r.value for r in streamed) == ["42", "42", "42"]
    assert raw.text == "42"
    assert raw.deployment is not None
    assert a.stats().requests > 0
    assert b.stats().requests > 0


async def test_a_parser_runs_on_whichever_model_answered() -> None:
    async with (
        SimServer(latency=0.1, reply='{"v": "a"}') as a,
        SimServer(latency=0.1, reply='{"v": "b"}') as b,
        two(a, b) as llm,
    ):
        result = await fanflow.map(
            llm,
            "{input}",
            [str(i) for i in range(20)],
            parse=lambda r: json.loads(r.text)["v"],
        )
    assert result.ok
    by_model = {r.deployment.model: r.value for r in result.records if r.deployment}
    assert by_model == {"model-a": "a", "model-b": "b"}


async def test_costs_use_the_answering_deployments_price() -> None:
    async with SimServer(latency=0.1, reply="ok") as a, SimServer(latency=0.1, reply="ok") as b:
        prices = [Price(input=1.0, output=1.0), Price(input=100.0, output=100.0)]
        async with two(a, b, prices=prices) as llm:
            result = await fanflow.map(llm, "{input}", [str(i) for i in range(20)])
    per_token = {}
    for r in result.records:
        assert r.cost is not None
        assert r.deployment is not None
        per_token[r.deployment.model] = r.cost / r.usage.total_tokens
    assert per_token["model-b"] == pytest.approx(100 * per_token["model-a"])


def test_a_router_pickles_with_its_deployments() -> None:
    llm = fanflow.router(
        fanflow.openai("m", base_url="http://127.0.0.1:9/v1", api_key="sk-a"),
        fanflow.openai("m", base_url="http://127.0.0.2:9/v1", api_key="sk-b"),
        strategy="fallback",
        weights=[2, 1],
    )
    copy = pickle.loads(pickle.dumps(llm))
    assert [m.info for m in copy.members] == [m.info for m in llm.members]
    assert copy.strategy == "fallback"
    assert repr(copy) == repr(llm)


async def test_the_progress_display_counts_each_item_once_when_calls_move() -> None:
    tracker = Tracker(40, clock=lambda: 0.0)
    async with (
        SimServer(latency=0.1, api_key="sk-right-key-000") as a,
        SimServer(latency=0.1, reply="ok") as b,
        two(a, b) as llm,
    ):
        result = await fanflow.map(llm, "{input}", [str(i) for i in range(40)], hooks=[tracker])
    stats = tracker.snapshot()
    assert result.ok
    assert (stats.done, stats.succeeded, stats.in_flight, stats.queued) == (40, 40, 0, 0)
    assert stats.requests == a.stats().requests + b.stats().requests
    assert a.stats().requests > 0  # some calls moved
    assert stats.answered_by == dict(result.summary.answered_by)
    assert sum(stats.answered_by.values()) == 40
