"""The FIFO gate and handle lanes (the concurrency part of admission)."""

from __future__ import annotations

import asyncio
import pickle

import pytest

import fanflow
from fanflow import Limits, Status
from fanflow.testing import ScriptedLLM

from ._helpers import gate_of

pytestmark = pytest.mark.looptime


async def test_gate_serves_waiters_in_arrival_order() -> None:
    gate = gate_of(1)
    order: list[int] = []

    async def worker(i: int) -> None:
        await gate.acquire()
        order.append(i)
        await asyncio.sleep(1)
        gate.release()

    await asyncio.gather(*(worker(i) for i in range(5)))
    assert order == [0, 1, 2, 3, 4]
    stats = gate.statistics()
    assert (stats.in_flight, stats.waiting, stats.max_in_flight) == (0, 0, 1)


async def test_raising_the_limit_admits_waiters_at_once(looptime: float) -> None:
    gate = gate_of(1)
    await gate.acquire()
    admitted: list[float] = []

    async def waiter() -> None:
        await gate.acquire()
        admitted.append(float(looptime))

    tasks = [asyncio.ensure_future(waiter()) for _ in range(3)]
    await asyncio.sleep(2)
    assert gate.statistics().waiting == 3
    gate.set_limit(3)  # one held + two more
    await asyncio.sleep(0)
    assert admitted == [2.0, 2.0]
    gate.set_limit(None)
    await asyncio.gather(*tasks)
    assert admitted == [2.0, 2.0, 2.0]
    assert gate.statistics().in_flight == 4


async def test_cancelled_waiter_takes_no_slot() -> None:
    gate = gate_of(1)
    await gate.acquire()
    task = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.release()
    assert gate.statistics().in_flight == 0
    assert gate.try_acquire()


async def test_waiter_cancelled_just_after_being_handed_a_slot_gives_it_back() -> None:
    gate = gate_of(1)
    await gate.acquire()
    task = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    gate.release()  # hands the slot to the waiter...
    task.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.statistics().in_flight == 0


def test_gate_rejects_a_zero_limit() -> None:
    with pytest.raises(fanflow.ConfigError, match="use None for no limit"):
        Limits(concurrency=0)
    with pytest.raises(fanflow.ConfigError):
        gate_of(2).set_limit(0)


async def test_deadline_while_waiting_for_a_slot(looptime: float) -> None:
    llm = ScriptedLLM(latency=10.0, limits=Limits(concurrency=1))
    first = asyncio.ensure_future(fanflow.call(llm, "a").record())
    await asyncio.sleep(0)
    record = await fanflow.call(llm, "b", deadline=3.0).record()
    assert record.status is Status.TIMED_OUT
    assert "waiting for a concurrency slot" in str(record.error)
    assert float(looptime) == 3.0
    assert (await first).ok


async def test_hedges_respect_the_pattern_concurrency(looptime: float) -> None:
    llm = ScriptedLLM(latency=5.0)
    result = await fanflow.map(llm, "{input}", range(4), concurrency=2, hedge_after=1.0)
    assert result.ok
    assert llm.max_in_flight == 2  # hedges waited for a slot instead of exceeding it


async def test_handles_pickle_without_their_live_lanes() -> None:
    llm = ScriptedLLM(limits=Limits(concurrency=3), timeout=4.0)
    await fanflow.call(llm, "warm the lane")
    copy = pickle.loads(pickle.dumps(llm))
    assert copy.limits == Limits(concurrency=3)
    assert copy.timeout == 4.0
    assert (await fanflow.call(copy, "x")).text == "echo: x"
    assert copy.statistics().concurrency.max_in_flight == 1


async def test_handles_are_async_context_managers() -> None:
    async with ScriptedLLM() as llm:
        assert (await fanflow.call(llm, "x")).text == "echo: x"


async def test_plain_protocol_objects_are_llms() -> None:
    class Upper:
        async def complete(self, request: fanflow.Request) -> fanflow.Response:
            return fanflow.Response(request.prompt.upper())

    assert isinstance(Upper(), fanflow.LLM)
    result = await fanflow.map(Upper(), "{input}", ["a", "b"])
    assert result.outputs == ["A", "B"]
