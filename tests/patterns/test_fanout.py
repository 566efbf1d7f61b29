from __future__ import annotations

import asyncio

import pytest

import fanflow
from fanflow import QuorumNotMet, Request, Status
from fanflow.errors import BadRequest
from fanflow.events import CallEnded
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime

AREAS = ["a0", "a1", "a2", "a3"]


def by_focus(request: Request) -> str:
    return f"out[{request.metadata.get('focus')}]"


def failing(areas: list[str]) -> dict[str, Fault]:
    return {f"Focus on: {a}$": Fault.raises(BadRequest(f"bad {a}")) for a in areas}


@pytest.mark.parametrize("successes", [0, 1, 2, 3, 4])
async def test_quorum_edges_for_every_success_count(successes: int) -> None:
    llm = ScriptedLLM(by_focus, latency=1.0, fail_on=failing(AREAS[successes:]))
    if successes < 2:  # ceil(4 / 2) = 2 required by default
        with pytest.raises(QuorumNotMet) as caught:
            await fanflow.fan_out(llm, "task", focus=AREAS, aggregate="concat")
        assert caught.value.succeeded == successes
        assert caught.value.required == 2
        meta = caught.value.metadata
        assert isinstance(meta, fanflow.results.FanOutResult)
        assert [w.status for w in meta.workers] == [Status.SUCCEEDED] * successes + [
            Status.FAILED
        ] * (4 - successes)
        return
    result = await fanflow.fan_out(llm, "task", focus=AREAS, aggregate="concat")
    assert result.required == 2
    assert result.outputs == [f"out[{a}]" for a in AREAS[:successes]]
    assert result.answer == "\n\n---\n\n".join(result.outputs)
    assert result.aggregation == "concat"
    assert [w.index for w in result.failed] == list(range(successes, 4))


async def test_min_success_overrides_the_default_quorum() -> None:
    llm = ScriptedLLM(by_focus, fail_on=failing(["a1", "a2"]))
    result = await fanflow.fan_out(llm, "t", focus=AREAS[:3], min_success=1, aggregate="concat")
    assert result.aggregation == "single"
    assert result.answer == "out[a0]"
    with pytest.raises(QuorumNotMet):
        await fanflow.fan_out(llm, "t", focus=AREAS[:3], min_success=2)


async def test_all_fail_message_names_each_worker_error() -> None:
    llm = ScriptedLLM(by_focus, fail_on=failing(AREAS[:3]))
    with pytest.raises(QuorumNotMet) as caught:
        await fanflow.fan_out(llm, "t", focus=AREAS[:3], temperatures=(0.0, 1.0))
    text = str(caught.value)
    assert "all 3 workers failed" in text
    assert "worker 0 (temperature 0.0, focus 'a0'): failed: BadRequest: bad a0" in text
    assert "worker 1 (temperature 0.5, focus 'a1'): failed: BadRequest: bad a1" in text
    assert "worker 2 (temperature 1.0, focus 'a2'): failed: BadRequest: bad a2" in text


async def test_llm_aggregator_sees_every_output(looptime: float) -> None:
    workers = ScriptedLLM(by_focus, latency=2.0)
    merger = ScriptedLLM("merged", latency=1.0)
    result = await fanflow.fan_out(workers, "the task", focus=AREAS[:3], aggregate=merger)
    assert result.answer == "merged"
    assert result.aggregation == "llm"
    [request] = merger.requests
    for a in AREAS[:3]:
        assert f"out[{a}]" in request.prompt
    assert "the task" in request.prompt
    assert looptime == 3.0  # workers at once (2 s) + aggregator (1 s)
    assert result.makespan == 3.0
    assert result.busy_time == 7.0
    assert len(result.records) == 4


async def test_aggregator_failure_falls_back_to_concat() -> None:
    workers = ScriptedLLM(by_focus)
    merger = ScriptedLLM(failures={0: BadRequest("no merge")})
    result = await fanflow.fan_out(workers, "t", focus=AREAS[:2], aggregate=merger)
    assert result.aggregation == "concat"
    assert isinstance(result.aggregation_error, BadRequest)
    assert result.answer == "out[a0]\n\n---\n\nout[a1]"
    assert result.aggregator is not None
    assert result.aggregator.status is Status.FAILED


async def test_function_aggregator_and_its_failure() -> None:
    workers = ScriptedLLM(by_focus)
    result = await fanflow.fan_out(workers, "t", focus=AREAS[:2], aggregate=" + ".join)
    assert (result.answer, result.aggregation) == ("out[a0] + out[a1]", "function")

    def broken(outputs: list[str]) -> str:
        raise RuntimeError("boom")

    result = await fanflow.fan_out(workers, "t", focus=AREAS[:2], aggregate=broken)
    assert result.aggregation == "concat"
    assert str(result.aggregation_error) == "boom"


async def test_worker_timeout_does_not_delay_the_others(looptime: float) -> None:
    llm = ScriptedLLM(by_focus, latency=1.0, fail_on={"Focus on: a2$": Fault.hang()})
    result = await fanflow.fan_out(
        llm, "t", focus=AREAS[:3], worker_timeout=5.0, aggregate="concat"
    )
    assert [w.status for w in result.workers] == [
        Status.SUCCEEDED,
        Status.SUCCEEDED,
        Status.TIMED_OUT,
    ]
    assert [w.latency for w in result.workers] == [1.0, 1.0, 5.0]
    assert [w.index for w in result.timed_out] == [2]
    assert isinstance(result.workers[2].error, fanflow.errors.CallTimeout)
    assert looptime == 5.0
    assert llm.in_flight == 0


async def test_temperatures_spread_over_the_range() -> None:
    llm = ScriptedLLM()
    result = await fanflow.fan_out(llm, "t", workers=3, temperatures=(0.2, 0.8), aggregate="concat")
    assert sorted(r.temperature for r in llm.requests) == [0.2, 0.5, 0.8]  # type: ignore[type-var]
    assert [w.temperature for w in result.workers] == [0.2, 0.5, 0.8]
    assert [r.sample for r in llm.requests] == [0, 1, 2]


async def test_focus_areas_are_cycled_and_too_many_are_refused() -> None:
    llm = ScriptedLLM()
    result = await fanflow.fan_out(llm, "t", workers=4, focus=["x", "y"], aggregate="concat")
    assert [w.focus for w in result.workers] == ["x", "y", "x", "y"]
    with pytest.raises(fanflow.ConfigError, match="3 focus areas but only 2 workers"):
        await fanflow.fan_out(llm, "t", workers=2, focus=["x", "y", "z"])
    with pytest.raises(fanflow.ConfigError, match="min_success"):
        await fanflow.fan_out(llm, "t", workers=2, min_success=3)


async def test_worker_keys_are_stable_and_previous_reruns_only_failed() -> None:
    llm = ScriptedLLM(by_focus, failures={1: BadRequest("flaky")})
    first = await fanflow.fan_out(llm, "t", focus=AREAS[:3], aggregate="concat")
    assert [w.ok for w in first.workers] == [True, False, True]
    again = await fanflow.fan_out(llm, "t", focus=AREAS[:3], aggregate="concat", previous=first)
    assert llm.calls == 4  # three, then only the failed one
    assert llm.requests[3].key == llm.requests[1].key
    assert all(w.ok for w in again.workers)
    assert [w.record.cached for w in again.workers] == [True, False, True]
    assert [w.record.key for w in again.workers] == [w.record.key for w in first.workers]


async def test_quorum_error_metadata_can_be_passed_back_as_previous() -> None:
    llm = ScriptedLLM(by_focus, failures={0: BadRequest("x"), 1: BadRequest("y")})
    with pytest.raises(QuorumNotMet) as caught:
        await fanflow.fan_out(llm, "t", focus=AREAS[:3])
    result = await fanflow.fan_out(
        llm, "t", focus=AREAS[:3], aggregate="concat", previous=caught.value.metadata
    )
    assert llm.calls == 5
    assert result.outputs == ["out[a0]", "out[a1]", "out[a2]"]


async def test_handle_limits_and_hooks_apply_to_workers(looptime: float) -> None:
    llm = ScriptedLLM(by_focus, latency=1.0, limits=fanflow.Limits(concurrency=2))
    events: list[object] = []
    result = await fanflow.fan_out(llm, "t", focus=AREAS, aggregate="concat", hooks=[events.append])
    assert looptime == 2.0  # four workers through a lane of two
    assert llm.max_in_flight == 2
    ended = [e for e in events if isinstance(e, CallEnded)]
    assert sorted(e.record.label for e in ended) == [f"worker {i}" for i in range(4)]
    assert result.summary.calls == 4


async def test_cancelling_fan_out_cancels_its_workers(looptime: float) -> None:
    llm = ScriptedLLM(by_focus, latency=10.0)
    task = asyncio.create_task(fanflow.fan_out(llm, "t", focus=AREAS))
    await asyncio.sleep(1.0)
    assert llm.in_flight == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.in_flight == 0
    assert looptime == 1.0
