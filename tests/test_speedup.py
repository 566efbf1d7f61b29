"""The speed-up compares with the same calls one after another on the same model (issue
28.4, decision 0170): a call's work is the time the model spent on it where that is
known (a worker pool's queue is not work), hedges that lost and requeued 429s are not
work, and a server's queue that fanflow cannot see makes the speed-up unknown (n/a),
never a guess (a server that says its own time in the reply, as llama.cpp's does,
gives it). The library's summary, the live tracker and the report agree.
Virtual time throughout, so the numbers are exact."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import fanflow
from fanflow import Limits, Request, Response, RetryPolicy, Status
from fanflow._progress import Tracker
from fanflow.cli._records import RecordsWriter, read_records
from fanflow.cli._report import summarize_rows
from fanflow.testing import Fault, ScriptedLLM, SimServer

from ._helpers import loopback_app

pytestmark = pytest.mark.looptime


class Pool(fanflow.BaseLLM):
    """A model with two workers behind its own queue, as ``fanflow.local()`` is: a call
    waits for a worker inside ``complete`` and reports the time a worker spent on it."""

    round_trip_is_work = False

    def __init__(self, *, report: bool = True) -> None:
        super().__init__(model="pool", limits=Limits())  # no limit: the pool queues
        self.workers = asyncio.Semaphore(2)
        self.report = report

    async def complete(self, request: Request) -> Response:
        async with self.workers:
            loop = asyncio.get_running_loop()
            began = loop.time()
            await asyncio.sleep(1.0)
            return Response("ok", service_time=loop.time() - began if self.report else None)


async def test_the_wait_inside_a_worker_pool_is_not_work(looptime: float) -> None:
    # The case: 6 calls of 1 s on 2 workers take 3 s; one after another, 6 s.
    # Counting each attempt's whole round trip (1+1+2+2+3+3 s) claimed 4x.
    result = await fanflow.map(Pool(), "{input}", range(6))
    assert float(looptime) == 3.0
    last = result.records[5].attempts[0]
    assert (last.duration, last.service) == (3.0, 1.0)
    assert result.summary.busy_time == 6.0
    assert result.summary.speedup == 2.0


async def test_a_queue_the_model_does_not_report_makes_the_speed_up_unknown(
    looptime: float,
) -> None:
    result = await fanflow.map(Pool(report=False), "{input}", range(6))
    assert result.ok
    assert result.records[0].busy_time is None
    assert result.summary.busy_time is None
    assert result.summary.speedup is None


async def test_a_hedge_that_lost_is_not_work(looptime: float) -> None:
    # The first attempt would take 10 s and is cancelled at t=3 when the hedge (sent at
    # t=2) answers: one after another, the call is the 1 s answer.
    llm = ScriptedLLM(latency=lambda rng, req: 10.0 if not llm.started_at[1:] else 1.0)
    result = await fanflow.map(llm, "{input}", ["x"], hedge_after=2.0)
    assert [(a.hedge, a.status) for a in result.records[0].attempts] == [
        (False, Status.CANCELLED),
        (True, Status.SUCCEEDED),
    ]
    assert result.summary.busy_time == 1.0
    assert result.summary.speedup == pytest.approx(1 / 3)


async def test_a_requeued_429_is_not_work(looptime: float) -> None:
    # One of 3 calls is refused after 0.5 s while the others run: the handle's own load,
    # requeued (it would not happen one after another). The work is the 3 answers.
    llm = ScriptedLLM(
        latency=1.0, failures={1: Fault.rate_limited(1.0, after=0.5)}, limits=Limits()
    )
    result = await fanflow.map(llm, "{input}", ["a", "b", "c"])
    assert result.ok
    assert [a.requeued for r in result.records for a in r.attempts].count(True) == 1
    assert result.summary.busy_time == 3.0


async def test_a_failed_attempt_is_work_when_its_time_is_known(looptime: float) -> None:
    # A 5xx after 0.5 s happens one after another too: it counts, with the retry's answer.
    llm = ScriptedLLM(latency=1.0, failures={0: Fault.server_error(after=0.5)})
    policy = RetryPolicy(initial=2.0, jitter=False)
    result = await fanflow.map(llm, "{input}", ["a"], retry=policy)
    assert result.ok
    assert result.summary.busy_time == 1.5


async def _four_calls_on_one_slot(*, timings: bool) -> fanflow.MapResult[str]:
    """4 calls at once to a server with one slot that queues the rest, as llama.cpp's
    and llama-cpp-python's servers do: each reply takes 1 s once its turn comes; with
    ``timings``, it says so in llama.cpp's field."""
    from aiohttp import web

    slot = asyncio.Lock()

    async def reply(request: web.Request) -> web.Response:
        async with slot:
            await asyncio.sleep(1.0)
        body: dict[str, Any] = {
            "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
        if timings:
            body["timings"] = {"prompt_ms": 200.0, "predicted_ms": 800.0}
        return web.json_response(body)

    async with (
        loopback_app("/v1/chat/completions", reply) as base,
        fanflow.openai("m", base_url=f"{base}/v1", api_key="sk-test") as llm,
    ):
        return await fanflow.map(llm, "{input}", ["a", "b", "c", "d"])


async def test_a_server_s_queue_is_not_work_when_the_server_says_its_time(
    looptime: float,
) -> None:
    # 4 calls at once on one slot: 4 s, as one after another. The round trips (1, 2, 3,
    # 4 s) would claim 2.5x.
    result = await _four_calls_on_one_slot(timings=True)
    assert result.ok
    assert [r.busy_time for r in result.records] == [pytest.approx(1.0)] * 4
    assert result.summary.speedup == pytest.approx(1.0, rel=0.01)


async def test_a_server_s_queue_it_does_not_report_makes_the_speed_up_unknown(
    looptime: float,
) -> None:
    result = await _four_calls_on_one_slot(timings=False)
    assert result.ok
    assert result.summary.busy_time is None
    assert result.summary.speedup is None


async def test_simserver_says_its_time_as_llama_cpp_s_server_does(looptime: float) -> None:
    async with (
        SimServer(latency=0.5, per_token=0.25) as server,
        fanflow.openai("m", base_url=server.url, api_key="sk-test", limits=Limits()) as llm,
    ):
        result = await fanflow.map(llm, "{input}", ["a", "b", "c", "d"], max_tokens=2)
    assert result.ok
    assert result.summary.busy_time == pytest.approx(4 * (0.5 + 2 * 0.25))
    assert result.summary.speedup == pytest.approx(4.0, rel=0.01)


@pytest.mark.parametrize("protocol", ["anthropic", "openai-stream"])
async def test_a_reply_without_the_server_s_time_leaves_the_speed_up_unknown(
    protocol: str, looptime: float
) -> None:
    async with SimServer(latency=0.5) as server:
        llm: fanflow.BaseLLM
        if protocol == "anthropic":
            llm = fanflow.anthropic("m", base_url=server.root, api_key="sk-ant")
        else:
            llm = fanflow.openai("m", base_url=server.url, api_key="sk-test", stream=True)
        async with llm:
            result = await fanflow.map(llm, "{input}", ["a", "b"])
    assert result.ok
    assert result.summary.busy_time is None
    assert result.summary.speedup is None


def test_only_the_provider_s_own_api_has_round_trips_that_are_work() -> None:
    # OpenAI's and Anthropic's APIs refuse a key's extra calls (429) rather than queue
    # them: a round trip there is the model's time. Anywhere else it may be a queue.
    assert fanflow.openai("m", api_key="sk-test").round_trip_is_work
    assert fanflow.openai(
        "m", base_url="HTTPS://api.openai.com:443/v1/", api_key="sk"
    ).round_trip_is_work
    assert fanflow.anthropic("m", api_key="sk-ant").round_trip_is_work
    assert not fanflow.openai("m", base_url="http://127.0.0.1:8000/v1").round_trip_is_work
    assert not fanflow.anthropic("m", base_url="https://proxy.example/v1").round_trip_is_work


async def test_the_tracker_and_the_report_agree_with_the_summary(
    tmp_path: Path, looptime: float
) -> None:
    # A hedge that lost, a requeued 429, a 5xx retried: the three views count the same.
    llm = ScriptedLLM(
        latency=lambda rng, req: 10.0 if llm.calls == 1 else 1.0,
        failures={2: Fault.rate_limited(1.0, after=0.5), 3: Fault.server_error(after=0.25)},
        limits=Limits(),
    )
    loop = asyncio.get_running_loop()
    tracker = Tracker(4, clock=loop.time)
    result = await fanflow.map(
        llm, "{input}", ["a", "b", "c", "d"], hedge_after=3.0, hooks=[tracker], retry=_quick
    )
    tracker.stop()
    assert result.ok
    kinds = [(a.hedge, a.requeued, a.status) for r in result.records for a in r.attempts]
    assert (True, False, Status.SUCCEEDED) in kinds
    assert any(requeued for _, requeued, _ in kinds)
    writer = RecordsWriter.open(tmp_path / "calls.jsonl")
    for record in result.records:
        writer.write(record)
    writer.close()
    report = summarize_rows(list(read_records(str(tmp_path / "calls.jsonl"))))
    summary, live = result.summary, tracker.snapshot()
    assert summary.busy_time is not None
    assert report.busy_time == pytest.approx(summary.busy_time)
    assert live.busy_time == pytest.approx(summary.busy_time)
    assert live.speedup == pytest.approx(summary.speedup)
    assert report.speedup == pytest.approx(summary.busy_time / report.makespan)


_quick: Any = RetryPolicy(initial=0.5, jitter=False)


def test_records_written_before_service_times_were_kept_give_no_speed_up() -> None:
    # An older records file has each attempt's round trip only: it cannot say the work.
    from fanflow.cli._records import AttemptRow, CallRow

    row = CallRow(
        0, None, "succeeded", 0.0, 2.0, 1, 1, None, None, None,
        (AttemptRow(0.0, 2.0, "succeeded", None, False, False),),
    )  # fmt: skip
    assert summarize_rows([row]).speedup is None
