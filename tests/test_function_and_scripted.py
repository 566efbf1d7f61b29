from __future__ import annotations

import asyncio
import threading

import pytest

import fanflow
from fanflow import Status
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


async def test_sync_functions_run_off_the_event_loop_thread() -> None:
    threads: list[str] = []

    def fn(request: fanflow.Request) -> str:
        threads.append(threading.current_thread().name)
        return request.prompt * 2

    result = await fanflow.map(fanflow.function(fn), "{input}", ["a", "b"])
    assert result.outputs == ["aa", "bb"]
    assert threading.current_thread().name not in threads


async def test_async_functions_are_awaited() -> None:
    async def fn(request: fanflow.Request) -> fanflow.Response:
        await asyncio.sleep(1)
        return fanflow.Response(request.prompt, usage=fanflow.Usage(1, 2), cost=0.01)

    record = await fanflow.call(fanflow.function(fn), "hi").record()
    assert record.value is not None
    assert record.value.text == "hi"
    assert record.usage == fanflow.Usage(1, 2)
    assert record.cost == 0.01


async def test_function_raising_a_provider_error_is_retried() -> None:
    calls = 0

    async def flaky(request: fanflow.Request) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise fanflow.errors.RateLimited("slow down", retry_after=1.0)
        return "ok"

    record = await fanflow.call(fanflow.function(flaky), "x").record()
    assert record.ok
    assert calls == 2


async def test_function_returning_the_wrong_type_says_what_to_return() -> None:
    record = await fanflow.call(fanflow.function(lambda r: 42), "x").record()  # type: ignore[arg-type,return-value]
    assert record.status is Status.FAILED
    assert "returned int; return a str or a fanflow.Response" in str(record.error)


async def test_scripted_latency_is_seeded_and_reproducible() -> None:
    async def times(seed: int) -> list[float]:
        llm = ScriptedLLM(latency=(0.0, 10.0), seed=seed)
        result = await fanflow.map(llm, "{input}", range(5), concurrency=1)
        return [r.latency or 0.0 for r in result.records]

    a, b, c = await times(1), await times(1), await times(2)
    assert a == pytest.approx(b, abs=1e-5)  # the loop clock has a 1 us resolution
    assert a != pytest.approx(c, abs=1e-5)


async def test_scripted_failure_rate_is_seeded() -> None:
    async def failures(seed: int) -> list[int]:
        llm = ScriptedLLM(failure_rate=0.3, seed=seed, retry=fanflow.RetryPolicy.none())
        result = await fanflow.map(llm, "{input}", range(40))
        return sorted(result.errors)

    first = await failures(5)
    assert first == await failures(5)
    assert 3 <= len(first) <= 25


async def test_scripted_faults_by_index_and_prompt() -> None:
    llm = ScriptedLLM(
        failures={0: Fault.overloaded()},
        fail_on={"secret": Fault.timeout()},
        retry=fanflow.RetryPolicy.none(),
    )
    first = await fanflow.call(llm, "a").record()
    second = await fanflow.call(llm, "the secret word").record()
    third = await fanflow.call(llm, "b").record()
    assert isinstance(first.error, fanflow.errors.Overloaded)
    assert isinstance(second.error, fanflow.errors.ProviderTimeout)
    assert third.ok
    assert llm.calls == 3
    assert [r.prompt for r in llm.requests] == ["a", "the secret word", "b"]


async def test_scripted_reset_forgets_calls() -> None:
    llm = ScriptedLLM()
    await fanflow.call(llm, "a")
    llm.reset()
    assert (llm.calls, llm.requests, llm.max_in_flight) == (0, [], 0)
