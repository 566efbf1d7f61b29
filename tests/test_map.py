"""map and as_completed in virtual time: order, bounds, failures as data, cancellation."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fanflow
import fanflow.events
from fanflow import Limits, RetryPolicy, Status
from fanflow.testing import Fault, ScriptedLLM

from ._helpers import run_virtual

pytestmark = pytest.mark.looptime


async def test_outputs_come_back_in_input_order(looptime: float) -> None:
    llm = ScriptedLLM(lambda r: r.prompt.upper(), latency=(0.1, 5.0), seed=1)
    items = [f"item{i}" for i in range(50)]
    result = await fanflow.map(llm, "{input}", items, concurrency=10)
    assert result.outputs == [i.upper() for i in items]
    finish_order = sorted(range(50), key=lambda i: result.records[i].end or 0)
    assert finish_order != list(range(50))  # they did finish out of order
    assert [r.index for r in result.records] == list(range(50))


async def test_ten_thousand_items_run_at_the_bound(looptime: float) -> None:
    llm = ScriptedLLM(latency=1.0)
    n, c = 10_000, 1000
    result = await fanflow.map(llm, "{input}", range(n), concurrency=c)
    assert result.ok
    assert len(result) == n
    assert llm.max_in_flight == c
    assert looptime == math.ceil(n / c) * 1.0
    assert result.summary.makespan == 10.0
    assert result.summary.speedup == pytest.approx(1000)


async def test_handle_limit_is_shared_by_two_maps(looptime: float) -> None:
    llm = ScriptedLLM(latency=1.0, limits=Limits(concurrency=4))
    a, b = await asyncio.gather(
        fanflow.map(llm, "a{input}", range(8)),
        fanflow.map(llm, "b{input}", range(8)),
    )
    assert a.ok
    assert b.ok
    assert llm.max_in_flight == 4
    assert looptime == 4.0  # 16 calls, 4 at a time, 1 s each
    assert llm.statistics().concurrency.max_in_flight == 4


async def test_pattern_concurrency_narrows_the_handle_limit(looptime: float) -> None:
    llm = ScriptedLLM(latency=1.0, limits=Limits(concurrency=10))
    result = await fanflow.map(llm, "{input}", range(9), concurrency=3)
    assert result.ok
    assert llm.max_in_flight == 3
    assert looptime == 3.0


async def test_a_failure_is_data_and_never_aborts_the_others() -> None:
    llm = ScriptedLLM(fail_on={"poison": fanflow.errors.BadRequest("refused", status_code=400)})
    result = await fanflow.map(llm, "{input}", ["a", "poison", "c"])
    assert result.outputs == ["echo: a", None, "echo: c"]
    assert result.status == {0: Status.SUCCEEDED, 1: Status.FAILED, 2: Status.SUCCEEDED}
    assert isinstance(result.errors[1], fanflow.errors.BadRequest)


async def test_a_missing_template_field_fails_only_that_item() -> None:
    llm = ScriptedLLM()
    items = [{"text": "a"}, {"body": "b"}, {"text": "c"}]
    result = await fanflow.map(llm, "Summarize: {text}", items)
    assert result.outputs == ["echo: Summarize: a", None, "echo: Summarize: c"]
    error = result.errors[1]
    assert isinstance(error, fanflow.errors.TemplateError)
    assert error.field == "text"
    assert error.index == 1
    assert "item 1 has no field 'text'" in str(error)
    assert "['body']" in str(error)
    assert llm.calls == 2


async def test_prompt_may_be_a_callable_building_requests() -> None:
    llm = ScriptedLLM()

    def build(item: dict[str, str]) -> fanflow.Request:
        return fanflow.Request.of(item["q"], system="sys", seed=7)

    result = await fanflow.map(llm, build, [{"q": "one"}, {"q": "two"}], temperature=0.2)
    assert result.outputs == ["echo: one", "echo: two"]
    assert llm.requests[0].system == "sys"
    assert llm.requests[0].temperature == 0.2
    assert llm.requests[0].seed == 7


async def test_parse_turns_replies_into_outputs_and_failures() -> None:
    llm = ScriptedLLM(lambda r: r.prompt)
    result = await fanflow.map(
        llm, "{input}", ["1", "x", "3"], parse=lambda response: int(response.text)
    )
    assert result.outputs == [1, None, 3]
    assert isinstance(result.errors[1], fanflow.errors.ParseError)
    assert "could not be used" in str(result.errors[1])
    assert result.records[1].response is not None  # the model's answer is kept


async def test_retries_happen_inside_map_and_are_counted(looptime: float) -> None:
    llm = ScriptedLLM(latency=1.0, failures={0: Fault.rate_limited(retry_after=2.0)})
    result = await fanflow.map(llm, "{input}", ["a", "b"], retry=RetryPolicy(jitter=False))
    assert result.ok
    assert result.summary.retries == 1
    assert result.summary.calls == 3
    # The 429 at t=0 holds only its own call, for exactly its Retry-After (2 s): the
    # handle's default limits do not pause the lane, they lower its in-flight limit
    # (to 1: 0.9 x the one other call in flight). That call runs 0..1, the retry 2..3.
    assert looptime == 3.0


async def test_deadline_times_out_what_is_not_done(looptime: float) -> None:
    llm = ScriptedLLM(latency=4.0)
    result = await fanflow.map(llm, "{input}", range(6), concurrency=2, deadline=10.0)
    # Items 0-3 finish by t=8; 4 and 5 start at 8 and are cut at 10.
    assert [result.status[i] for i in range(6)] == [Status.SUCCEEDED] * 4 + [Status.TIMED_OUT] * 2
    assert looptime == 10.0


async def test_fail_fast_cancels_siblings_promptly(looptime: float) -> None:
    llm = ScriptedLLM(
        latency=100.0, failures={1: Fault.raises(fanflow.errors.BadRequest("bad"), after=1.0)}
    )
    with pytest.raises(fanflow.errors.BadRequest, match="bad"):
        await fanflow.map(llm, "{input}", range(5), fail_fast=True)
    assert looptime == 1.0
    assert llm.in_flight == 0


async def test_cancelling_map_cancels_every_call() -> None:
    llm = ScriptedLLM(latency=100.0)
    task = asyncio.ensure_future(fanflow.map(llm, "{input}", range(20), concurrency=5))
    await asyncio.sleep(1)
    assert llm.in_flight == 5
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.in_flight == 0


async def test_as_completed_streams_in_completion_order(looptime: float) -> None:
    llm = ScriptedLLM(latency=lambda rng, r: float(r.prompt))
    seen: list[tuple[int | None, float]] = []
    async with fanflow.as_completed(llm, "{input}", [3, 1, 2]) as results:
        async for record in results:
            seen.append((record.index, float(looptime)))
    assert seen == [(1, 1.0), (2, 2.0), (0, 3.0)]


async def test_as_completed_pulls_items_lazily() -> None:
    pulled = 0

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield i

    llm = ScriptedLLM(latency=1.0)
    count = 0
    async with fanflow.as_completed(llm, "{input}", items(), concurrency=10) as results:
        async for _record in results:
            count += 1
            if count == 50:
                break
    # Only the workers' items (2 per slot) and a small queue of records were pulled.
    assert pulled <= 50 + 20 + 20 + 1
    assert llm.in_flight == 0


async def test_as_completed_over_an_async_iterator() -> None:
    async def items() -> AsyncIterator[str]:
        for i in range(30):
            await asyncio.sleep(0.1)
            yield f"x{i}"

    llm = ScriptedLLM(latency=(0.5, 2.0))
    async with fanflow.as_completed(llm, "{input}", items(), concurrency=8) as results:
        got = {record.index: record.value async for record in results}
    assert got == {i: f"echo: x{i}" for i in range(30)}


def _other_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_breaking_out_of_as_completed_without_async_with_leaks_nothing(
    looptime: float,
) -> None:
    # The deprecated shape: 'async for' with no 'async with'. Breaking out drops the
    # iterator; the loop closes it, which cancels the items in flight: no task is left
    # and no further call is sent, although 1,000 items were waiting.
    llm = ScriptedLLM(latency=lambda rng, r: 1.0 if r.prompt == "0" else 50.0)
    stream = fanflow.as_completed(llm, "{input}", range(1000), concurrency=4)
    with pytest.warns(DeprecationWarning, match="outside 'async with' is deprecated"):
        records = aiter(stream)
    del stream  # only the loop below holds the iterator, as in 'async for ... in f(...)'
    async for record in records:
        assert record.index == 0
        break
    del records
    for _ in range(10):  # the loop's own clean-up of the dropped iterator, a few turns
        await asyncio.sleep(0)
    assert _other_tasks() == set()
    assert llm.in_flight == 0
    sent = llm.calls
    assert sent <= 8  # the first four, and at most a window more: not the 1,000
    await asyncio.sleep(500.0)
    assert llm.calls == sent


async def test_a_result_stream_is_iterated_once() -> None:
    llm = ScriptedLLM(latency=lambda rng, r: 1.0 if r.prompt == "0" else 50.0)
    async with fanflow.as_completed(llm, "{input}", range(5)) as results:
        async for _ in results:
            break
        with pytest.raises(fanflow.FanflowError, match="iterated only once"):
            async for _ in results:
                pass
    assert _other_tasks() == set()


async def test_leaving_as_completed_early_cancels_in_flight_calls() -> None:
    llm = ScriptedLLM(latency=lambda rng, r: 1.0 if r.prompt == "0" else 50.0)
    async with fanflow.as_completed(llm, "{input}", range(5)) as results:
        async for record in results:
            assert record.index == 0
            break
    assert llm.in_flight == 0
    assert _other_tasks() == set()  # the block waited for everything it started


def test_map_runs_from_sync_code_with_run() -> None:
    llm = fanflow.function(lambda r: r.prompt[::-1])
    result = fanflow.run(fanflow.map(llm, "{input}", ["abc", "xy"]))
    assert result.outputs == ["cba", "yx"]


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    latencies=st.lists(st.floats(0.0, 10.0), min_size=0, max_size=40),
    fail=st.sets(st.integers(0, 39)),
    hang=st.sets(st.integers(0, 39)),
    concurrency=st.integers(1, 8),
)
def test_every_item_ends_once_and_in_order(
    latencies: list[float], fail: set[int], hang: set[int], concurrency: int
) -> None:
    def reply(request: fanflow.Request) -> str:
        return f"out-{request.prompt}"

    faults: dict[str, Fault | BaseException] = {}
    for i in range(len(latencies)):
        if i in hang:
            faults[f"^{i}$"] = Fault.hang()
        elif i in fail:
            faults[f"^{i}$"] = fanflow.errors.BadRequest("no")
    llm = ScriptedLLM(
        reply,
        latency=lambda rng, r: latencies[int(r.prompt)],
        fail_on=faults,
        limits=Limits(concurrency=concurrency),
    )
    ended: list[int] = []

    def hook(event: fanflow.events.Event) -> None:
        if isinstance(event, fanflow.events.CallEnded) and event.record.index is not None:
            ended.append(event.record.index)

    async def go() -> fanflow.MapResult[str]:
        return await fanflow.map(
            llm, "{input}", [str(i) for i in range(len(latencies))], timeout=20.0, hooks=[hook]
        )

    result = run_virtual(go())
    assert len(result) == len(latencies)
    assert sorted(ended) == list(range(len(latencies)))  # exactly one end per item
    assert llm.max_in_flight <= concurrency
    for i in range(len(latencies)):
        expected = (
            Status.TIMED_OUT if i in hang else Status.FAILED if i in fail else Status.SUCCEEDED
        )
        assert result.status[i] is expected
        assert result.outputs[i] == (f"out-{i}" if expected is Status.SUCCEEDED else None)


async def test_template_errors_for_bad_format_and_bad_callable() -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.errors.TemplateError, match=r"a positional field in \{0\}"):
        await fanflow.map(llm, "{0}", [{"a": 1}])  # before any call (issue 13.7)
    assert llm.calls == 0
    bad = await fanflow.map(llm, lambda item: 3, ["x"])  # type: ignore[arg-type,return-value]
    assert "returned int; return a str or a fanflow.Request" in str(bad.errors[0])
    text = await fanflow.map(llm, lambda item: f"Q: {item}", ["x"], system="s")
    assert text.outputs == ["echo: Q: x"]
    assert llm.requests[-1].system == "s"


def test_run_raises_the_error_of_the_work() -> None:
    async def boom() -> None:
        raise fanflow.ConfigError("nope")

    with pytest.raises(fanflow.ConfigError, match="nope"):
        fanflow.run(boom())


async def test_speedup_counts_time_answering_not_time_queueing(looptime: float) -> None:
    # 10 calls of 1 s through a handle that runs 2 at once: 5 s, and the honest speed-up is
    # 2x (10 s of work in 5 s), not the sum of queue-inflated latencies over 5 s.
    llm = ScriptedLLM(latency=1.0, limits=Limits(concurrency=2))
    result = await fanflow.map(llm, "{input}", range(10), concurrency=10)
    assert float(looptime) == 5.0
    assert result.summary.busy_time == pytest.approx(10.0)
    assert result.summary.speedup == pytest.approx(2.0)
    assert result.records[9].latency == pytest.approx(5.0)  # queued 4 s, answered in 1 s
    assert result.records[9].busy_time == pytest.approx(1.0)


async def test_an_item_in_backoff_does_not_idle_its_slot(looptime: float) -> None:
    # Item 0 fails at t=0 and waits 10 s; meanwhile both slots keep working on the rest:
    # items 1-5 end by t=3, not t=5 as they would if item 0's worker held its slot.
    llm = ScriptedLLM(latency=1.0, failures={0: Fault.server_error()})
    result = await fanflow.map(
        llm, "{input}", range(6), concurrency=2, retry=RetryPolicy(initial=10.0, jitter=False)
    )
    assert result.ok
    assert llm.max_in_flight == 2
    assert max(r.end or 0 for r in result.records[1:]) == 3.0
    assert result.records[0].end == 11.0
