from __future__ import annotations

import asyncio

import pytest

import fanflow
from fanflow import Status
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


async def test_gather_returns_values_in_argument_order(looptime: float) -> None:
    llm = ScriptedLLM(latency=lambda rng, r: float(r.prompt))
    responses = await fanflow.gather(fanflow.call(llm, "3"), fanflow.call(llm, "1"))
    assert [r.text for r in responses] == ["echo: 3", "echo: 1"]
    assert looptime == 3.0  # at once, not 4 s


async def test_gather_accepts_plain_awaitables() -> None:
    async def seven() -> int:
        await asyncio.sleep(1)
        return 7

    assert await fanflow.gather(seven(), seven()) == [7, 7]


async def test_gather_first_failure_cancels_the_rest(looptime: float) -> None:
    llm = ScriptedLLM(
        fail_on={"bad": Fault.raises(fanflow.errors.BadRequest("rejected"), after=2.0)},
        latency=100.0,
    )
    with pytest.raises(fanflow.errors.BadRequest, match="rejected"):
        await fanflow.gather(fanflow.call(llm, "slow"), fanflow.call(llm, "bad"))
    assert looptime == 2.0
    assert llm.in_flight == 0


async def test_gather_settled_returns_every_outcome() -> None:
    llm = ScriptedLLM(fail_on={"bad": fanflow.errors.BadRequest("rejected")})

    async def oops() -> None:
        raise ValueError("plain failure")

    records = await fanflow.gather(
        fanflow.call(llm, "ok"), fanflow.call(llm, "bad"), oops(), settled=True
    )
    assert [r.status for r in records] == [Status.SUCCEEDED, Status.FAILED, Status.FAILED]
    assert records[0].value.text == "echo: ok"
    assert isinstance(records[1].error, fanflow.errors.BadRequest)
    assert isinstance(records[2].error, ValueError)
    assert [r.index for r in records] == [0, 1, 2]
    assert len(records[0].attempts) == 1


async def test_race_first_success_wins_and_losers_are_cancelled(looptime: float) -> None:
    llm = ScriptedLLM(
        latency=lambda rng, r: {"fast-fail": 0.5, "fast": 2.0, "slow": 9.0}[r.prompt],
        fail_on={"fast-fail": fanflow.errors.BadRequest("no")},
    )
    winner = await fanflow.race(
        fanflow.call(llm, "slow"), fanflow.call(llm, "fast-fail"), fanflow.call(llm, "fast")
    )
    assert winner.text == "echo: fast"
    assert looptime == 2.0
    assert llm.in_flight == 0


async def test_race_all_failing_carries_every_failure() -> None:
    llm = ScriptedLLM(
        fail_on={"a": fanflow.errors.BadRequest("A"), "b": fanflow.errors.NotFound("B")}
    )
    with pytest.raises(fanflow.AllFailed) as info:
        await fanflow.race(fanflow.call(llm, "a"), fanflow.call(llm, "b"))
    assert [type(e) for e in info.value.failures] == [
        fanflow.errors.BadRequest,
        fanflow.errors.NotFound,
    ]
    assert "all 2 calls of the race failed" in str(info.value)


async def test_race_deadline(looptime: float) -> None:
    llm = ScriptedLLM(latency=50.0)
    with pytest.raises(fanflow.errors.CallTimeout, match="within 5 s"):
        await fanflow.race(fanflow.call(llm, "a"), fanflow.call(llm, "b"), deadline=5.0)
    assert looptime == 5.0
    assert llm.in_flight == 0


async def test_cancelling_gather_cancels_children() -> None:
    llm = ScriptedLLM(latency=100.0)
    task = asyncio.ensure_future(fanflow.gather(fanflow.call(llm, "a"), fanflow.call(llm, "b")))
    await asyncio.sleep(1)
    assert llm.in_flight == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.in_flight == 0
