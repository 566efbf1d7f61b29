"""Issue 23: batch mode over a router or a cascade (decision 0272). Each deployment's
items go into its own provider batches (spread by the weights, or all on the first for
a fallback), and what one deployment's batches cannot answer moves to the next one's.
SimServers with batch endpoints on loopback count what each was sent; virtual time.
"""

from __future__ import annotations

from typing import Any

import pytest

import fanflow
from fanflow import ConfigError, Price
from fanflow.testing import SimBatches, SimRequest, SimServer

pytestmark = pytest.mark.looptime

ITEMS = [f"item {i}" for i in range(40)]
PRICES = {"m": Price(input=2.0, output=8.0)}


def oai(server: SimServer, key: str = "sk-test-0000", **kw: Any) -> fanflow.BaseLLM:
    return fanflow.openai("m", base_url=server.url, api_key=key, **kw)


def sent(server: SimServer) -> tuple[int, int, int]:
    """Batches, batched requests and real-time requests the server saw."""
    stats = server.stats()
    return stats.batches, stats.batch_requests, stats.requests


async def test_a_spread_puts_each_deployments_share_in_its_own_batch() -> None:
    async with (
        SimServer(batches=SimBatches(time=30.0)) as a,
        SimServer(batches=SimBatches(time=30.0)) as b,
    ):
        llm = fanflow.router(oai(a), oai(b), weights=[3, 1], names=["east", "west"])
        async with llm:
            result = await fanflow.map(llm, "{input}", ITEMS, mode="batch", prices=PRICES)
        seen = sent(a), sent(b)
        prompts = {**a.stats().batch_prompts, **b.stats().batch_prompts}
        urls = {a.url, b.url}
    assert result.ok, result.errors
    assert result.outputs == [f"echo: {i}" for i in ITEMS]
    assert seen == ((1, 30, 0), (1, 10, 0))
    assert sorted(prompts) == sorted(ITEMS)
    assert set(prompts.values()) == {1}  # no item in two batches
    assert dict(result.summary.answered_by) == {"east": 30, "west": 10}
    assert (result.summary.batched, result.summary.realtime) == (40, 0)
    record = result.records[0]
    assert record.batch_id is not None
    assert record.deployment is not None
    assert record.deployment.base_url in urls  # the deployment, not the wrapper
    full = PRICES["m"].cost(record.usage.input_tokens, record.usage.output_tokens)
    assert record.cost == pytest.approx(full / 2)  # at the batch price


async def test_a_fallback_moves_what_the_first_deployments_batches_refuse() -> None:
    async with (
        SimServer(batches=SimBatches(time=30.0), api_key="sk-right-key-000") as a,
        SimServer(batches=SimBatches(time=30.0)) as b,
    ):
        llm = fanflow.router(
            oai(a, key="sk-wrong-key-111"), oai(b), strategy="fallback", names=["main", "spare"]
        )
        async with llm:
            result = await fanflow.map(llm, "{input}", ITEMS, mode="batch")
        seen = sent(a), sent(b)
        prompts = b.stats().batch_prompts
    assert result.ok, result.errors
    assert seen[0][:2] == (0, 0)  # the first refused the key: no batch was made there
    assert seen[1][1] == 40
    assert seen[1][2] == 0
    assert set(prompts.values()) == {1}
    assert dict(result.summary.answered_by) == {"spare": 40}
    assert all(len(r.routes) == 1 for r in result.records)  # each tried main first, once


async def test_a_fallback_with_a_healthy_first_sends_the_spare_nothing() -> None:
    async with (
        SimServer(batches=SimBatches(time=30.0)) as a,
        SimServer(batches=SimBatches(time=30.0)) as b,
    ):
        llm = fanflow.router(oai(a), oai(b), strategy="fallback")
        async with llm:
            result = await fanflow.map(llm, "{input}", ITEMS, mode="batch")
        seen = sent(a), sent(b)
    assert result.ok
    assert seen == ((1, 40, 0), (0, 0, 0))


async def test_a_cascade_batches_each_tier_the_strong_one_only_what_was_escalated() -> None:
    def unsure_on_odd(request: SimRequest) -> str:
        return "unsure" if int(request.messages[-1][1].split()[-1]) % 2 else "fine"

    async with (
        SimServer(batches=SimBatches(time=30.0), reply=unsure_on_odd) as cheap,
        SimServer(batches=SimBatches(time=30.0), reply="sure") as strong,
    ):
        llm = fanflow.cascade(
            fanflow.openai("cheap", base_url=cheap.url, api_key="sk-a"),
            fanflow.openai("strong", base_url=strong.url, api_key="sk-b"),
            accept=lambda text: text != "unsure",
        )
        async with llm:
            result = await fanflow.map(llm, "{input}", ITEMS, mode="batch")
        seen = sent(cheap), sent(strong)
        escalated = set(strong.stats().batch_prompts)
    assert result.ok
    assert result.outputs == ["fine" if i % 2 == 0 else "sure" for i in range(40)]
    assert seen == ((1, 40, 0), (1, 20, 0))
    assert escalated == {f"item {i}" for i in range(1, 40, 2)}


async def test_a_deployment_without_a_batch_api_is_named() -> None:
    async with SimServer(batches=SimBatches()) as a:
        plain = fanflow.function(lambda request: "x", name="plain")
        llm = fanflow.router(oai(a), plain, names=["east", "here"])
        with pytest.raises(ConfigError, match=r"deployment 'here'.*batch API"):
            await fanflow.map(llm, "{input}", ["x"], mode="batch")
        assert sent(a) == (0, 0, 0)


async def test_a_resumed_item_waits_for_the_batch_it_is_in_on_whichever_deployment(
    tmp_path: Any,
) -> None:
    from fanflow._durable import cache_key

    # What an earlier run left: items 0-9 in a batch on the spare deployment, committed
    # in the job's store. A fallback would send everything to the first one now.
    async with (
        SimServer(batches=SimBatches(time=30.0)) as a,
        SimServer(batches=SimBatches(time=30.0)) as b,
    ):
        spare = oai(b)
        requests = [spare.prepare(fanflow.Request.of(x)) for x in ITEMS[:10]]
        keys = [cache_key(spare, r) for r in requests]
        api = spare.batches()
        state = await api.submit([api.line(k, r) for k, r in zip(keys, requests, strict=True)], {})
        llm = fanflow.router(oai(a), spare, strategy="fallback", names=["main", "spare"])
        with fanflow.Store(tmp_path / "s.db") as store:
            await store.record_batch(state.id, "openai", keys)
            async with llm:
                result = await fanflow.map(llm, "{input}", ITEMS, mode="batch", store=store)
        seen = sent(a), sent(b)
        prompts = {**a.stats().batch_prompts, **b.stats().batch_prompts}
    assert result.ok, result.errors
    assert seen == ((1, 30, 0), (1, 10, 0))  # nothing submitted twice
    assert set(prompts.values()) == {1}
    assert dict(result.summary.answered_by) == {"main": 30, "spare": 10}


async def test_auto_moves_every_deployments_batches_to_real_time_near_the_deadline() -> None:
    async with (
        SimServer(batches=SimBatches(time=3600.0), latency=0.1) as a,
        SimServer(batches=SimBatches(time=3600.0), latency=0.1) as b,
    ):
        llm = fanflow.router(oai(a), oai(b))
        async with llm:
            result = await fanflow.map(llm, "{input}", ITEMS, mode="auto", deadline=300.0)
        seen = sent(a), sent(b)
        done = {**a.stats().prompt_completed}
        for prompt, n in b.stats().prompt_completed.items():
            done[prompt] = done.get(prompt, 0) + n
    assert result.ok, result.errors
    assert [s[:2] for s in seen] == [(1, 20), (1, 20)]  # each had its batch
    assert seen[0][2] > 0  # then both answered in real time
    assert seen[1][2] > 0
    assert done == dict.fromkeys(ITEMS, 1)  # each item answered once
    summary = result.summary
    # What the batches answered before the cancel took hold is kept, the rest real time.
    assert summary.batched + summary.realtime == 40
    assert summary.realtime > 0


async def test_a_pool_batches_a_router_steps_calls_on_each_deployment() -> None:
    async with (
        SimServer(batches=SimBatches(time=20.0)) as a,
        SimServer(batches=SimBatches(time=20.0)) as b,
    ):
        llm = fanflow.router(oai(a), oai(b))
        skill = fanflow.Skill(llm, "say {x}")
        pool = fanflow.Pool(skill, [{"x": i} for i in range(8)], max_flows=8, mode="batch")
        result = await pool.arun()
        await llm.aclose()
        seen = sent(a), sent(b)
    assert result.outputs == [f"echo: say {i}" for i in range(8)]
    assert seen == ((1, 4, 0), (1, 4, 0))
