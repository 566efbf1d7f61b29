"""Issue 13.2: fail fast. When every further call must fail the same way (401/403, an
unknown model, a spent quota, nothing listening), the handle's breaker trips: the rest
end ``skipped`` with ``CircuitOpen`` saying what to fix, and no more requests are sent.

SimServer over loopback counts the requests (the judge); virtual time throughout.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections import Counter

import pytest

import fanflow
from fanflow import Request, RetryPolicy, Status
from fanflow.errors import CircuitOpen
from fanflow.testing import SimServer

from ._helpers import (
    COLD_CALLS,
    COLD_SPLIT,
    COLD_STEP,
    CONNECT_ATTEMPTS,
    PROBE_AFTER,
    TRIP_AFTER,
    WORKERS_PER_SLOT,
    loopback_app,
)

pytestmark = pytest.mark.looptime

ITEMS = [f"row {i}" for i in range(300)]
C = 8  # concurrency


def statuses(result: fanflow.MapResult[object]) -> Counter[Status]:
    return Counter(r.status for r in result.records)


def skipped_errors(result: fanflow.MapResult[object]) -> list[CircuitOpen]:
    out = [r.error for r in result.records if r.status is Status.SKIPPED]
    assert all(isinstance(e, CircuitOpen) for e in out)
    return out  # type: ignore[return-value]


async def test_a_wrong_key_sends_a_few_requests_not_one_per_row() -> None:
    async with (
        SimServer(api_key="sk-right") as server,
        fanflow.openai("m", base_url=server.url, api_key="sk-wrong") as llm,
    ):
        result = await fanflow.map(llm, "{input}", ITEMS, concurrency=C)
    sent = server.stats().requests
    assert sent <= C + TRIP_AFTER, sent  # what was in flight when it tripped, at most
    counts = statuses(result)
    assert counts[Status.FAILED] == sent  # each request sent is a failed item
    assert counts[Status.SKIPPED] == len(ITEMS) - sent  # every other item: skipped
    errors = skipped_errors(result)
    assert {e.kind for e in errors} == {"key"}
    assert "check the API key" in str(errors[0])
    assert isinstance(errors[0].__cause__, fanflow.errors.AuthenticationError)
    assert llm.breaker.tripped is not None


async def test_an_unknown_model_trips_for_that_model_only() -> None:
    async with (
        SimServer(models=["good"]) as server,
        fanflow.openai("good", base_url=server.url, api_key="k") as llm,
    ):

        def build(item: str) -> Request:
            model = "missing" if item.endswith(("0", "2", "4", "6", "8")) else "good"
            return Request.of(item, model=model)

        result = await fanflow.map(llm, build, ITEMS, concurrency=C)
    stats = server.stats()
    assert stats.responses[404] <= C + TRIP_AFTER
    assert stats.responses[200] == 150  # the good model's items all ran
    skipped = skipped_errors(result)
    assert len(skipped) == 150 - stats.responses[404]
    assert {e.kind for e in skipped} == {"missing"}
    assert "'missing'" in str(skipped[0])
    assert "check the model name" in str(skipped[0])


async def test_a_spent_quota_trips() -> None:
    async with (
        SimServer(fault_on={"": "quota"}) as server,
        fanflow.openai("m", base_url=server.url, api_key="k") as llm,
    ):
        result = await fanflow.map(llm, "{input}", ITEMS, concurrency=C)
    assert server.stats().requests <= C + TRIP_AFTER
    assert {e.kind for e in skipped_errors(result)} == {"quota"}


async def test_other_errors_never_trip_it() -> None:
    async with (
        SimServer(fault_on={"": "500"}) as server,
        fanflow.openai("m", base_url=server.url, api_key="k") as llm,
    ):
        result = await fanflow.map(
            llm, "{input}", ITEMS[:20], concurrency=C, retry=RetryPolicy(attempts=2)
        )
    assert statuses(result) == Counter({Status.FAILED: 20})
    assert server.stats().requests == 40  # every item tried twice, as the policy says
    assert llm.breaker.tripped is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_nothing_listening_retries_a_few_times_then_trips() -> None:
    port = free_port()
    llm = fanflow.openai("m", base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
    async with llm:
        result = await fanflow.map(llm, "{input}", ITEMS, concurrency=C)
    tries = [len(r.attempts) for r in result.records]
    # Not on the first refusal: the calls sent first retried (3 attempts) before it tripped.
    assert max(tries) >= 3
    # Not 4 attempts x 300 items: at most the map's crew (two workers per slot) had
    # started an item when the first reached CONNECT_ATTEMPTS and tripped it. (How many
    # of them got a second attempt by then depends on when the refusals come back.)
    assert sum(tries) <= WORKERS_PER_SLOT * C * CONNECT_ATTEMPTS
    errors = skipped_errors(result)
    assert len(errors) >= len(ITEMS) - 2 * C
    assert {e.kind for e in errors} == {"unreachable"}
    assert "check that it is up and that base_url is right" in str(errors[0])
    # The calls that were tried keep their own error (failed), not "skipped".
    tried = [r for r in result.records if r.attempts]
    assert all(r.status is Status.FAILED for r in tried)
    assert all(isinstance(r.error, fanflow.errors.ProviderConnectionError) for r in tried)


async def test_the_breaker_does_not_poison_a_handle_reused_after_the_fix() -> None:
    port = free_port()
    # No hedging (on by default for HTTP handles): the request count below is exact.
    llm = fanflow.openai(
        "m",
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="k",
        retry=fanflow.RetryPolicy(hedge=False),
    )
    async with llm:
        first = await fanflow.map(llm, "{input}", ITEMS[:50], concurrency=C)
        assert statuses(first)[Status.SKIPPED] > 0
        assert llm.breaker.tripped is not None
        # Still broken: after PROBE_AFTER seconds one call goes as a probe, the rest wait
        # for it and are skipped when it fails the same way.
        await asyncio.sleep(PROBE_AFTER)
        again = await fanflow.map(llm, "{input}", ITEMS[:50], concurrency=C)
        assert sum(len(r.attempts) for r in again.records) <= 4  # one call's attempts
        assert statuses(again)[Status.SKIPPED] >= 49
        # The user starts the server: the next probe succeeds and closes the breaker.
        async with SimServer(port=port) as server:
            await asyncio.sleep(PROBE_AFTER)
            fixed = await fanflow.map(llm, "{input}", ITEMS[:50], concurrency=C)
            assert fixed.ok, statuses(fixed)
            assert server.stats().requests == 50
            assert llm.breaker.tripped is None
            # reset() closes it at once, with no wait for a probe.
            now = asyncio.get_running_loop().time()
            for _ in range(TRIP_AFTER):
                llm.breaker.failed(Request.of("x"), fanflow.errors.QuotaExceeded("q"), 1, now, None)
            assert llm.breaker.tripped is not None
            stopped = await fanflow.map(llm, "{input}", ["y"])
            assert stopped.records[0].status is Status.SKIPPED
            llm.breaker.reset()
            assert (await fanflow.map(llm, "{input}", ["y"])).ok


async def test_a_new_handle_starts_closed_and_pickles_closed() -> None:
    import pickle

    async with SimServer(api_key="sk-right") as server:
        async with fanflow.openai("m", base_url=server.url, api_key="sk-wrong") as bad:
            await fanflow.map(bad, "{input}", ITEMS[:20], concurrency=2)
            assert bad.breaker.tripped is not None
            copy = pickle.loads(pickle.dumps(bad))
            assert copy.breaker.tripped is None
        async with fanflow.openai("m", base_url=server.url, api_key="sk-right") as good:
            result = await fanflow.map(good, "{input}", ITEMS[:20], concurrency=2)
    assert result.ok


async def test_a_field_every_item_lacks_is_found_before_any_call() -> None:
    from fanflow.testing import ScriptedLLM

    llm = ScriptedLLM()
    rows = [{"id": i, "text": f"t{i}"} for i in range(300)]
    with pytest.raises(fanflow.errors.TemplateError, match=r"\{txt\}.*none of the first 8 items"):
        await fanflow.map(llm, "Summarize: {txt}", rows)
    stream = fanflow.as_completed(llm, "Summarize: {txt}", iter(rows))

    async def drain() -> None:
        async with stream as results:
            async for _ in results:
                pass

    with pytest.raises(fanflow.errors.TemplateError, match="'id', 'text'"):
        await drain()
    assert llm.calls == 0

    async def arows():  # type: ignore[no-untyped-def]
        for row in rows[:3]:
            yield row

    with pytest.raises(fanflow.errors.TemplateError):
        await fanflow.map(llm, "{txt}", arows())
    assert llm.calls == 0
    # A field that some of the first items have is left to each item.
    mixed = [{"text": "a"}, {"other": 1}, {"text": "b"}]
    result = await fanflow.map(llm, "{text}", mixed)
    assert result.status == {0: Status.SUCCEEDED, 1: Status.FAILED, 2: Status.SUCCEEDED}
    # Peeking consumes nothing: an async source still yields every item, in order.
    result = await fanflow.map(llm, "{text}", arows())
    assert result.outputs == ["echo: t0", "echo: t1", "echo: t2"]


async def test_a_pool_refuses_a_key_none_of_its_first_inputs_has() -> None:
    from fanflow.patterns import Chain, Pool, Skill, Step
    from fanflow.testing import ScriptedLLM

    llm = ScriptedLLM()
    chain = Chain([Step(Skill(llm, "Summarize: {txt}", name="summary"), output="summary")])
    pool = Pool(chain, [{"text": f"t{i}"} for i in range(50)])
    with pytest.raises(
        fanflow.errors.StepInputError, match=r"needs key 'txt'.*none of the first 8"
    ):
        await pool.arun()
    assert llm.calls == 0
    # Inputs of which some have the key run as before: the others fail alone.
    mixed = Pool(chain, [{"txt": "a"}, {"text": "b"}])
    result = await mixed.arun()
    assert [r.status for r in result.items] == [Status.SUCCEEDED, Status.FAILED]


async def test_with_no_concurrency_limit_a_cold_handle_still_stops_early() -> None:
    """No limit anywhere: without the cold start, all 300 would be in flight before the
    first 401 came back."""
    async with (
        SimServer(api_key="sk-right", latency=0.2) as server,
        fanflow.openai("m", base_url=server.url, api_key="sk-wrong") as llm,
    ):
        result = await fanflow.map(llm, "{input}", ITEMS)
    assert server.stats().requests <= COLD_CALLS
    assert statuses(result)[Status.SKIPPED] >= len(ITEMS) - COLD_CALLS
    # A right key: the first answers take their time (2 s here); the rest went in a few
    # doublings of the first wave (decision 0175), long before the first answer.
    async with (
        SimServer(latency=2.0) as server,
        fanflow.openai("m", base_url=server.url, api_key="k") as llm,
    ):
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await fanflow.map(llm, "{input}", ITEMS)
        first = loop.time() - start
        start = loop.time()
        again = await fanflow.map(llm, "{input}", ITEMS)  # warm now: no wait at all
        second = loop.time() - start
    assert result.ok
    assert again.ok
    # 16 at once, then the wave doubles each step in 4 parts (16 * 2 ** (k / 4) after k
    # parts): the last of the 300 after 17 parts, a little over 4 steps.
    parts = math.ceil(COLD_SPLIT * math.log2(len(ITEMS) / COLD_CALLS))
    assert parts == 17
    assert first == pytest.approx(2.0 + parts * COLD_STEP / COLD_SPLIT)
    assert second == pytest.approx(2.0)


def test_a_handle_cold_when_its_loop_ended_still_works_on_a_new_loop() -> None:
    """Interrupted during its cold start (the held calls cancelled with their loop), the
    handle is used again from a fresh event loop (as fanflow.run does)."""
    from fanflow.testing import SimServer as Server

    with Server(latency=1.0) as server:
        llm = fanflow.openai("m", base_url=server.url, api_key="k")

        async def interrupted() -> None:
            task = asyncio.ensure_future(fanflow.map(llm, "{input}", ITEMS[:40]))
            await asyncio.sleep(0.2)  # 16 sent, 24 held back, no answer yet
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await llm.aclose()

        asyncio.run(interrupted())
        server_fast = Server()
        with server_fast:
            again = fanflow.openai("m", base_url=server_fast.url, api_key="k")
            again.breaker = llm.breaker  # the same breaker, still cold, on a new loop
            result = fanflow.run(fanflow.map(again, "{input}", ITEMS[:40]))
    assert result.ok


async def test_skipped_items_did_no_work_so_they_add_no_speed_up() -> None:
    # The skipped items waited for a slot (a server whose 401s take 0.2 s) and were
    # never sent: that is not time spent answering calls. Counting it made a tripped
    # run claim a speed-up of 105x (found trying the CLI with a wrong key). (A 401
    # slower than the cold start's steps meets its whole first wave: hence the
    # concurrency here, decision 0175.)
    from aiohttp import web

    async def slow_401(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.json_response({"error": {"message": "Incorrect API key"}}, status=401)

    async with loopback_app("/v1/chat/completions", slow_401) as base:
        llm = fanflow.openai("m", base_url=f"{base}/v1", api_key="sk-wrong")
        async with llm:
            result = await fanflow.map(llm, "{input}", ITEMS, concurrency=16)
    skipped = [r for r in result.records if r.status is Status.SKIPPED]
    assert skipped
    assert all(r.busy_time == 0.0 for r in skipped)
    assert any((r.latency or 0) > 0.1 for r in skipped)  # they did wait
    sent = [r for r in result.records if r.status is not Status.SKIPPED]
    assert result.summary.busy_time == pytest.approx(sum(r.busy_time for r in sent))
    # The 16 cold-start calls ran side by side, but the server did not say its time on
    # them (its round trips may be queueing): no speed-up is claimed, not 300x.
    assert result.summary.speedup is None
