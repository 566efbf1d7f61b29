"""``mode="batch"`` and ``mode="auto"`` against SimServer's batch endpoints, in virtual time.

The wire is the judge: SimServer counts batches, batched requests per prompt and
real-time requests, so each test proves what was sent (and that nothing was sent twice),
not just what came back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import fanflow
from fanflow import ConfigError, Status
from fanflow.backends import BatchOptions, batch_info
from fanflow.errors import BatchIncomplete
from fanflow.testing import ScriptedLLM, SimBatches, SimServer

from .._helpers import open_batches

pytestmark = pytest.mark.looptime

PRICES = {"gpt-sim": fanflow.Price(input=2.0, output=8.0), "claude-sim": fanflow.Price(3.0, 15.0)}


def _openai(server: SimServer, **kw: Any) -> fanflow.providers.OpenAILLM:
    return fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test", **kw)


def _anthropic(server: SimServer, **kw: Any) -> fanflow.providers.AnthropicLLM:
    return fanflow.anthropic("claude-sim", base_url=server.root, api_key="sk-ant-test", **kw)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_batch_mode_answers_in_input_order_at_the_batch_price(api: str) -> None:
    loop = asyncio.get_running_loop()
    async with SimServer(batches=SimBatches(time=30.0)) as server:
        llm = _openai(server) if api == "openai" else _anthropic(server)
        items = [f"item {i}" for i in range(20)]
        t0 = loop.time()
        result = await fanflow.map(llm, "{input}", items, mode="batch", prices=PRICES)
        elapsed = loop.time() - t0
        await llm.aclose()
        stats = server.stats()
    assert result.outputs == [f"echo: item {i}" for i in range(20)]
    assert {r.batch_id for r in result.records} == {result.records[0].batch_id}
    assert result.records[0].batch_id is not None
    price = PRICES[llm.model]
    r0 = result.records[0]
    full = price.cost(r0.usage.input_tokens, r0.usage.output_tokens)
    assert r0.cost == pytest.approx(full / 2)
    assert r0.response is not None
    info = batch_info(r0.response.extra)
    assert info is not None
    assert info.saved == pytest.approx(full / 2)
    summary = result.summary
    assert (summary.batched, summary.realtime) == (20, 0)
    assert summary.saved == pytest.approx(summary.cost)
    # one batch, every item once, no real-time call
    assert (stats.batches, stats.batch_requests, stats.requests) == (1, 20, 0)
    assert set(stats.batch_prompts.values()) == {1}
    # collected for 0.5 s, processed in 30 s; seen within one short poll (10% of 30 s)
    assert 30.5 <= elapsed <= 30.5 + 3.1


async def test_the_batch_backend_can_be_passed_as_any_backend() -> None:
    """``mode="batch"`` is shorthand for ``backend=fanflow.backends.BatchBackend("batch")``."""
    async with SimServer() as server:
        llm = _openai(server)
        backend = fanflow.backends.BatchBackend("batch", BatchOptions(linger=0.1))
        assert isinstance(backend, fanflow.backends.Backend)
        result = await fanflow.map(llm, "{input}", ["a", "b"], backend=backend)
        await llm.aclose()
        stats = server.stats()
    assert result.outputs == ["echo: a", "echo: b"]
    assert (stats.batches, stats.requests) == (1, 0)


async def test_polling_follows_openai_progress_to_the_end() -> None:
    """With progress reported, the poll lands close to the predicted end."""
    loop = asyncio.get_running_loop()
    async with SimServer(batches=SimBatches(time=200.0)) as server:
        llm = _openai(server)
        t0 = loop.time()
        await fanflow.map(llm, "{input}", [f"x{i}" for i in range(100)], mode="batch")
        elapsed = loop.time() - t0
        await llm.aclose()
    assert 200.5 <= elapsed <= 200.5 + 2.5


async def test_as_completed_streams_each_batch_as_it_lands() -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[int, float]] = []
    async with SimServer(batches=SimBatches(time=10.0)) as server:
        llm = _openai(server)
        t0 = loop.time()
        opts = BatchOptions(max_requests=2)
        async with fanflow.as_completed(
            llm, "{input}", ["a", "b", "c", "d", "e"], mode="batch", batch=opts
        ) as stream:
            async for record in stream:
                assert record.index is not None
                assert record.ok
                seen.append((record.index, loop.time() - t0))
        await llm.aclose()
        stats = server.stats()
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3, 4]
    assert (stats.batches, stats.batch_requests) == (3, 5)  # 2 + 2 + 1


async def test_a_file_over_the_byte_limit_is_split() -> None:
    """SimServer rejects files over 1,000 bytes; fanflow splits below that."""
    async with SimServer(batches=SimBatches(max_bytes=1000)) as server:
        llm = _openai(server)
        items = [f"item number {i}" for i in range(12)]
        result = await fanflow.map(
            llm, "{input}", items, mode="batch", batch=BatchOptions(max_bytes=1000)
        )
        await llm.aclose()
        stats = server.stats()
    assert result.ok
    assert stats.batches >= 2
    assert stats.batch_requests == 12


async def test_a_retryable_line_error_goes_into_a_new_batch() -> None:
    async with SimServer(fault_on={"flaky": ["500"], "broke": "quota"}) as server:
        llm = _openai(server)
        result = await fanflow.map(llm, "{input}", ["ok", "flaky", "broke"], mode="batch")
        await llm.aclose()
        stats = server.stats()
    ok, flaky, broke = result.records
    assert ok.ok
    assert len(ok.attempts) == 1
    assert flaky.ok
    assert len(flaky.attempts) == 2  # the 500 line, then its answer from a second batch
    assert isinstance(flaky.attempts[0].error, fanflow.errors.ServerError)
    assert flaky.batch_id != ok.batch_id
    assert broke.status is Status.FAILED
    assert isinstance(broke.error, fanflow.errors.QuotaExceeded)
    assert broke.batch_id == ok.batch_id
    assert stats.batch_prompts == {"ok": 1, "flaky": 2, "broke": 1}


async def test_expired_batches_resubmit_what_they_left_and_keep_each_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """4 items over 10 s, expiring at 5 s: each batch answers only its first half."""
    retry = fanflow.RetryPolicy(attempts=3, jitter=False, initial=1.0)
    async with SimServer(batches=SimBatches(time=10.0, expire_after=5.0)) as server:
        llm = _openai(server, retry=retry)
        result = await fanflow.map(llm, "{input}", ["a", "b", "c", "d"], mode="batch")
        await llm.aclose()
        stats = server.stats()
    statuses = [r.status for r in result.records]
    assert statuses.count(Status.SUCCEEDED) == 3  # 2 in batch 1, 1 in batch 2
    failed = [r for r in result.records if not r.ok]
    assert len(failed) == 1
    assert isinstance(failed[0].error, BatchIncomplete)
    assert "expired" in str(failed[0].error)
    assert [type(a.error) for a in failed[0].attempts] == [BatchIncomplete] * 3
    assert failed[0].batch_id is not None
    assert stats.batches == 3  # 4 requests, then the 2 left, then the last one
    assert stats.batch_requests == 7
    assert "1 of 4 items have no answer (1 BatchIncomplete)" in caplog.text


async def test_unknown_and_duplicate_output_lines_lose_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with SimServer(batches=SimBatches(unknown_lines=2, duplicate_lines=True)) as server:
        for llm in (_openai(server), _anthropic(server)):
            result = await fanflow.map(llm, "{input}", ["a", "b", "c"], mode="batch")
            await llm.aclose()
            assert result.outputs == ["echo: a", "echo: b", "echo: c"]
        stats = server.stats()
    assert stats.batch_requests == 6  # 3 per API, none twice
    assert "did not send" in caplog.text


async def test_identical_requests_are_sent_once_and_share_the_answer() -> None:
    async with SimServer() as server:
        llm = _openai(server)
        result = await fanflow.map(llm, "{input}", ["same", "other", "same"], mode="batch")
        await llm.aclose()
        stats = server.stats()
    assert result.outputs == ["echo: same", "echo: other", "echo: same"]
    assert stats.batch_prompts == {"same": 1, "other": 1}


async def test_an_item_too_large_for_a_batch_line_fails_alone() -> None:
    async with SimServer() as server:
        llm = _openai(server)
        items = ["small", "big " * 400, "fine"]
        opts = BatchOptions(max_bytes=1000)
        result = await fanflow.map(llm, "{input}", items, mode="batch", batch=opts)
        await llm.aclose()
        stats = server.stats()
    assert [r.status for r in result.records] == [Status.SUCCEEDED, Status.FAILED, Status.SUCCEEDED]
    error = result.records[1].error
    assert isinstance(error, fanflow.errors.BadRequest)
    assert "more than a batch may hold" in str(error)
    assert stats.batch_requests == 2


async def test_models_without_a_batch_api_are_refused_before_anything_runs() -> None:
    scripted = ScriptedLLM()
    with pytest.raises(ConfigError, match="needs a provider with a batch API"):
        await fanflow.map(scripted, "{input}", ["a"], mode="batch")
    fn = fanflow.function(lambda request: "x")
    with pytest.raises(ConfigError, match="needs a provider with a batch API"):
        fanflow.as_completed(fn, "{input}", ["a"], mode="batch")
    assert scripted.calls == 0


async def test_bad_options_are_refused() -> None:
    async with SimServer() as server:
        llm = _openai(server)
        with pytest.raises(ConfigError, match="unknown mode"):
            await fanflow.map(llm, "{input}", ["a"], mode="later")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="shorter than any batch could meet"):
            await fanflow.map(llm, "{input}", ["a"], mode="batch", deadline=1.0)
        with pytest.raises(ConfigError, match="needs deadline"):
            await fanflow.map(llm, "{input}", ["a"], mode="auto")
        with pytest.raises(ConfigError, match="hedge_after"):
            await fanflow.map(llm, "{input}", ["a"], mode="batch", hedge_after=1.0)
        with pytest.raises(ConfigError, match="chooses the batch backend"):
            await fanflow.map(llm, "{input}", ["a"], mode="batch", backend="ray")
        await llm.aclose()
        assert server.stats().batches == 0


# --------------------------------------------------------------------------- auto


async def _auto(
    server: SimServer, deadline: float, concurrency: int
) -> tuple[fanflow.MapResult[Any], float]:
    """Map 10 items with mode="auto" (1 s real-time calls); the result and its makespan."""
    loop = asyncio.get_running_loop()
    llm = _openai(server, limits=fanflow.Limits(concurrency=concurrency))
    t0 = loop.time()
    result = await fanflow.map(
        llm,
        "{input}",
        [f"i{n}" for n in range(10)],
        mode="auto",
        deadline=deadline,
        batch=BatchOptions(realtime_latency=1.0),
        prices=PRICES,
    )
    elapsed = loop.time() - t0
    await llm.aclose()
    return result, elapsed


async def test_auto_with_a_deadline_beyond_the_batch_batches_everything() -> None:
    async with SimServer(latency=1.0, batches=SimBatches(time=100.0)) as server:
        result, elapsed = await _auto(server, 200.0, 5)
        stats = server.stats()
    assert result.ok
    assert (result.summary.batched, result.summary.realtime) == (10, 0)
    assert stats.requests == 0
    assert elapsed < 111


async def test_auto_moves_what_is_left_to_real_time_before_the_deadline() -> None:
    """10 items over 100 s, deadline 80 s: the batch answers 7, real time the last 3."""
    async with SimServer(latency=1.0, batches=SimBatches(time=100.0)) as server:
        result, elapsed = await _auto(server, 80.0, 5)
        stats = server.stats()
    assert result.ok
    assert elapsed < 80.0
    s = result.summary
    assert (s.batched, s.realtime) == (7, 3)
    assert stats.requests == 3  # real-time calls only for what the batch had not done
    assert stats.batch_cancels == 1
    assert s.saved is not None
    assert s.saved > 0
    assert stats.max_in_flight <= 5


async def test_auto_with_a_deadline_too_short_for_any_batch_goes_real_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with SimServer(latency=1.0, batches=SimBatches(time=100.0)) as server:
        result, elapsed = await _auto(server, 8.0, 2)
        stats = server.stats()
    assert result.ok
    assert elapsed <= 8.0
    assert (result.summary.batched, result.summary.realtime) == (0, 10)
    assert stats.batches == 0
    assert "no time for a batch" in caplog.text


# --------------------------------------------------------------------------- Pool


async def test_pool_batches_its_model_steps_and_runs_the_rest_as_usual() -> None:
    def shout(text: str) -> str:
        return text.upper()

    async with SimServer(batches=SimBatches(time=20.0)) as server:
        llm = _openai(server)
        chain = fanflow.Chain(
            [
                fanflow.Step(fanflow.Skill(llm, "say {x}", timeout=1.0), output="said"),
                fanflow.Step(shout, output="loud", inputs={"text": "said"}),
            ]
        )
        pool = fanflow.Pool(chain, [{"x": i} for i in range(8)], max_flows=2, mode="batch")
        result = await pool.arun()
        await llm.aclose()
        stats = server.stats()
    assert result.outputs == [f"ECHO: SAY {i}" for i in range(8)]
    model_calls = [r for r in result.records if r.response is not None]
    assert len(model_calls) == 8
    assert len({r.batch_id for r in model_calls}) == 1  # all 8 in flight, one batch
    assert stats.requests == 0
    assert (stats.batches, stats.batch_requests) == (1, 8)


def test_pool_without_a_batch_capable_model_is_refused() -> None:
    fn = fanflow.function(lambda request: "x")
    with pytest.raises(ConfigError, match="needs a model step whose handle has a batch API"):
        fanflow.Pool(fanflow.Skill(fn, "say {x}"), [{"x": 1}], mode="batch")
    with pytest.raises(ConfigError, match="for map and as_completed"):
        fanflow.Pool(fanflow.Skill(fn, "say {x}"), [{"x": 1}], mode="auto")  # type: ignore[arg-type]


async def test_a_budget_reserves_and_charges_batched_calls_at_the_batch_price() -> None:
    items = [f"item {i}" for i in range(10)]
    async with SimServer() as server:
        llm = _openai(server, max_tokens=20)
        expected = fanflow.estimate(llm, "{input}", items, prices=PRICES)
        assert expected.cost is not None
        assert expected.batch_cost == pytest.approx(expected.cost / 2)
        # Enough for every item at the batch price, half of them in real time.
        budget = fanflow.Budget(usd=expected.batch_cost * 1.01, prices=PRICES)
        result = await fanflow.map(llm, "{input}", items, mode="batch", budget=budget)
        await llm.aclose()
    assert result.ok
    assert budget.spent == pytest.approx(sum(r.cost or 0.0 for r in result.records))
    assert result.summary.cost == pytest.approx(budget.spent)


async def test_a_batch_the_provider_fails_fails_its_items_with_the_reason() -> None:
    """SimServer takes at most 2 requests a batch; told 5, fanflow's batch is failed."""
    async with SimServer(batches=SimBatches(max_requests=2)) as server:
        opts = BatchOptions(max_requests=5)
        llm = _openai(server)
        result = await fanflow.map(llm, "{input}", list("abc"), mode="batch", batch=opts)
        anthropic = _anthropic(server)
        refused = await fanflow.map(anthropic, "{input}", list("abc"), mode="batch", batch=opts)
        await llm.aclose()
        await anthropic.aclose()
    for r in result.records:
        assert isinstance(r.error, fanflow.errors.BadRequest)
        assert "failed: too_many_requests" in str(r.error)
        assert r.batch_id is not None
    for r in refused.records:
        assert isinstance(r.error, fanflow.errors.BadRequest)
        assert "at most 2 requests per batch" in str(r.error)


async def test_batch_endpoint_faults_are_retried_without_a_second_batch() -> None:
    """A lost create reply (the batch exists; the client saw a reset) is found again by
    its token (OpenAI's metadata), so the retry does not submit the items twice."""
    faults = {"upload": ["500"], "create": ["lost"], "poll": ["503", "reset"], "results": ["429"]}
    async with SimServer(batches=SimBatches(control_faults=faults)) as server:
        llm = _openai(server, retry=fanflow.RetryPolicy(jitter=False))
        result = await fanflow.map(llm, "{input}", ["a", "b"], mode="batch")
        await llm.aclose()
        stats = server.stats()
    assert result.outputs == ["echo: a", "echo: b"]
    assert (stats.batches, stats.batch_requests) == (1, 2)
    assert stats.faults["batch:lost"] == 1


async def test_anthropic_batch_endpoint_faults_are_retried() -> None:
    faults = {"create": ["529"], "poll": ["500"], "results": ["reset"]}
    async with SimServer(batches=SimBatches(control_faults=faults)) as server:
        llm = _anthropic(server, retry=fanflow.RetryPolicy(jitter=False))
        result = await fanflow.map(llm, "{input}", ["a", "b"], mode="batch")
        await llm.aclose()
        stats = server.stats()
    assert result.outputs == ["echo: a", "echo: b"]
    assert (stats.batches, stats.batch_requests) == (1, 2)


# --------------------------------------------------------------------------- resume


async def test_a_batch_created_just_before_a_crash_is_found_by_its_token(tmp_path: Any) -> None:
    """The journal held only the intent (the process died while the batch was being
    created): the next run finds the batch by the token in its metadata, not anew."""
    from fanflow._durable import cache_key
    from fanflow.backends import BatchOptions as Opts
    from fanflow.backends._batch import INTENT, BatchQueue, MemoryJournal

    items = ["a", "b", "c"]
    async with SimServer(batches=SimBatches(time=5.0)) as server:
        llm = _openai(server)
        with fanflow.Store(tmp_path / "s.db") as store:
            # What the crashed run did: commit the intent, then create the batch.
            requests = [llm.prepare(fanflow.Request.of(x)) for x in items]
            keys = [cache_key(llm, r) for r in requests]
            await store.record_batch(f"{INTENT}tok1", "openai", keys)
            queue = BatchQueue(llm.batches(), MemoryJournal(), Opts())
            lines = [queue.api.line(k, r) for k, r in zip(keys, requests, strict=True)]
            await llm.batches().submit(lines, {"fanflow_token": "tok1"})
            result = await fanflow.map(llm, "{input}", items, mode="batch", store=store)
            assert open_batches(store) == []
        await llm.aclose()
        stats = server.stats()
    assert result.outputs == ["echo: a", "echo: b", "echo: c"]
    assert (stats.batches, stats.batch_requests) == (1, 3)


async def test_an_intent_with_no_batch_behind_it_is_submitted_once(tmp_path: Any) -> None:
    from fanflow._durable import cache_key
    from fanflow.backends._batch import INTENT

    async with SimServer() as server:
        llm = _openai(server)
        with fanflow.Store(tmp_path / "s.db") as store:
            key = cache_key(llm, llm.prepare(fanflow.Request.of("a")))
            await store.record_batch(f"{INTENT}never-created", "openai", [key])
            result = await fanflow.map(llm, "{input}", ["a", "b"], mode="batch", store=store)
        await llm.aclose()
        stats = server.stats()
    assert result.ok
    assert [len(r.attempts) for r in result.records] == [1, 1]
    assert stats.batch_prompts == {"a": 1, "b": 1}  # "a" sent once, after the lookup


async def test_a_batch_file_of_several_megabytes_goes_in_one_piece() -> None:
    items = [f"{i} " + "word " * 100 for i in range(5000)]  # ~3 MB of JSONL
    async with SimServer(keep_requests=False) as server:
        llm = _openai(server)
        result = await fanflow.map(llm, "{input}", items, mode="batch")
        await llm.aclose()
        stats = server.stats()
    assert result.ok
    assert (stats.batches, stats.batch_requests) == (1, 5000)


async def test_after_an_auto_switch_calls_are_priced_as_real_time() -> None:
    from fanflow.backends._batch import BatchQueue, MemoryJournal
    from fanflow.backends._batchllm import BatchLLM

    async with SimServer() as server:
        llm = _openai(server)
        queue = BatchQueue(llm.batches(), MemoryJournal(), BatchOptions())
        wrapped = BatchLLM(
            llm, queue, window=10, prices=None, realtime_timeout=None, realtime_concurrency=None
        )
        async with queue:
            assert wrapped.batch_priced  # a budget reserves at the batch price
            queue.switch()
            assert not wrapped.batch_priced  # and at the real-time price after the switch
            response = await wrapped.complete(llm.prepare(fanflow.Request.of("x")))
        await llm.aclose()
        stats = server.stats()
    assert response.text == "echo: x"
    assert batch_info(response.extra) is None
    assert (stats.requests, stats.batches) == (1, 0)


async def test_a_slow_cancel_sends_the_items_in_real_time_after_two_polls() -> None:
    """The cancel takes 5 s to land, longer than the 2 s fanflow waits for it: every item
    goes in real time, and the run still ends before the deadline."""
    batches = SimBatches(time=100.0, cancel_time=5.0)
    async with SimServer(latency=1.0, batches=batches) as server:
        result, elapsed = await _auto(server, 80.0, 5)
        stats = server.stats()
    assert result.ok
    assert elapsed < 80.0
    assert (result.summary.batched, result.summary.realtime) == (0, 10)
    assert (stats.requests, stats.batch_cancels) == (10, 1)


async def test_a_journalled_batch_the_provider_does_not_know_is_submitted_again(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from fanflow._durable import cache_key

    async with SimServer() as server:
        llm = _openai(server)
        with fanflow.Store(tmp_path / "s.db") as store:
            key = cache_key(llm, llm.prepare(fanflow.Request.of("a")))
            await store.record_batch("batch_from_elsewhere", "openai", [key])
            result = await fanflow.map(llm, "{input}", ["a", "b"], mode="batch", store=store)
            assert store.batch_of(key) is not None
            assert open_batches(store) == []
        await llm.aclose()
        stats = server.stats()
    assert result.outputs == ["echo: a", "echo: b"]
    assert stats.batch_prompts == {"a": 1, "b": 1}
    assert "batch_from_elsewhere" in caplog.text
