"""The official SDKs' batch helpers talk to SimServer's batch endpoints.

``openai`` (``files.create``, ``batches.create/retrieve/cancel/list``,
``files.content``) and ``anthropic`` (``messages.batches.create/retrieve/cancel/
results``) parse SimServer's objects into their own types: the SDKs' types are the
judge of the wire shapes. Virtual time: a batch's processing time passes in the polls.
"""

from __future__ import annotations

import asyncio
import json

import anthropic
import openai
import pytest

from fanflow.testing import SimBatches, SimServer

pytestmark = pytest.mark.looptime


def _openai(server: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url, api_key="sk-test", max_retries=0)


def _anthropic(server: SimServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.root, api_key="sk-ant-test", max_retries=0)


def _jsonl(prompts: list[str], *, model: str = "gpt-sim") -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": p}]},
            }
        )
        for i, p in enumerate(prompts)
    ]
    return ("\n".join(lines) + "\n").encode()


async def test_openai_sdk_runs_a_batch_end_to_end() -> None:
    loop = asyncio.get_running_loop()
    async with (
        SimServer(batches=SimBatches(time=10.0), fault_on={"bad": "500"}) as server,
        _openai(server) as client,
    ):
        file = await client.files.create(
            file=("in.jsonl", _jsonl(["a b", "bad one", "c"])), purpose="batch"
        )
        assert (file.object, file.purpose) == ("file", "batch")
        batch = await client.batches.create(
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"job": "j1"},
        )
        assert batch.status == "in_progress"
        assert batch.metadata == {"job": "j1"}
        assert batch.request_counts is not None
        assert batch.request_counts.total == 3
        t0 = loop.time()
        await asyncio.sleep(5.0)  # 2 of 3 requests are due at 3.33 s and 6.67 s
        mid = await client.batches.retrieve(batch.id)
        assert mid.status == "in_progress"
        assert mid.request_counts is not None
        assert (mid.request_counts.completed, mid.request_counts.failed) == (1, 0)
        await asyncio.sleep(5.0)
        done = await client.batches.retrieve(batch.id)
        assert loop.time() - t0 == pytest.approx(10.0)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        assert done.output_file_id is not None
        assert done.error_file_id is not None
        out = (await client.files.content(done.output_file_id)).text.splitlines()
        err = (await client.files.content(done.error_file_id)).text.splitlines()
        listed = await client.batches.list()
    rows = {json.loads(line)["custom_id"]: json.loads(line) for line in out}
    assert sorted(rows) == ["r0", "r2"]
    body = rows["r0"]["response"]["body"]
    completion = openai.types.chat.ChatCompletion.model_validate(body)
    assert completion.choices[0].message.content == "echo: a b"
    failed = json.loads(err[0])
    assert failed["custom_id"] == "r1"
    assert failed["response"]["status_code"] == 500
    assert [b.id for b in listed.data] == [batch.id]
    stats = server.stats()
    assert (stats.batches, stats.batch_requests) == (1, 3)
    assert stats.batch_prompts == {"a b": 1, "bad one": 1, "c": 1}


async def test_openai_sdk_sees_cancel_expiry_and_validation_failure() -> None:
    async with (
        SimServer(batches=SimBatches(time=10.0, expire_after=6.0, cancel_time=2.0)) as server,
        _openai(server) as client,
    ):
        data = _jsonl(["a", "b", "c", "d", "e"])  # one every 2 s
        ids = []
        for _ in range(2):
            file = await client.files.create(file=("in.jsonl", data), purpose="batch")
            b = await client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            ids.append(b.id)
        await asyncio.sleep(3.0)
        cancelling = await client.batches.cancel(ids[0])
        assert cancelling.status == "cancelling"
        await asyncio.sleep(4.0)
        cancelled = await client.batches.retrieve(ids[0])
        expired = await client.batches.retrieve(ids[1])
        dup = _jsonl(["x", "y"]).replace(b'"r1"', b'"r0"')
        file = await client.files.create(file=("dup.jsonl", dup), purpose="batch")
        failed = await client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert expired.error_file_id is not None
        expired_lines = (await client.files.content(expired.error_file_id)).text.splitlines()
    assert cancelled.status == "cancelled"
    assert cancelled.request_counts is not None
    assert cancelled.request_counts.completed == 1  # only "a" (at 2 s) before the cancel
    assert expired.status == "expired"
    assert expired.request_counts is not None
    assert expired.request_counts.completed == 3  # 2, 4, 6 s; the rest expired
    codes = [json.loads(x)["response"]["body"]["error"]["code"] for x in expired_lines]
    assert codes == ["batch_expired", "batch_expired"]
    assert failed.status == "failed"
    assert failed.errors is not None
    assert failed.errors.data is not None
    assert failed.errors.data[0].code == "duplicate_custom_id"
    assert failed.errors.data[0].line == 2


async def test_openai_sdk_gets_a_clear_error_for_a_file_over_the_limit() -> None:
    async with (
        SimServer(batches=SimBatches(max_bytes=100)) as server,
        _openai(server) as client,
    ):
        with pytest.raises(openai.BadRequestError, match="too large"):
            await client.files.create(file=("in.jsonl", _jsonl(["a"] * 5)), purpose="batch")


def _params(prompt: str) -> dict[str, object]:
    return {
        "model": "claude-sim",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": prompt}],
    }


async def test_anthropic_sdk_runs_a_message_batch_end_to_end() -> None:
    async with (
        SimServer(batches=SimBatches(time=4.0), fault_on={"bad": "529"}) as server,
        _anthropic(server) as client,
    ):
        batch = await client.messages.batches.create(
            requests=[
                {"custom_id": "a", "params": _params("x y")},  # type: ignore[list-item]
                {"custom_id": "b", "params": _params("bad")},  # type: ignore[list-item]
            ]
        )
        assert batch.processing_status == "in_progress"
        assert batch.request_counts.processing == 2
        assert batch.results_url is None
        await asyncio.sleep(4.0)
        ended = await client.messages.batches.retrieve(batch.id)
        assert ended.processing_status == "ended"
        assert (ended.request_counts.succeeded, ended.request_counts.errored) == (1, 1)
        assert ended.results_url is not None
        results = {r.custom_id: r async for r in await client.messages.batches.results(batch.id)}
    ok = results["a"].result
    assert ok.type == "succeeded"
    assert ok.message.content[0].type == "text"
    assert ok.message.content[0].text == "echo: x y"
    assert ok.message.usage.output_tokens == 3
    bad = results["b"].result
    assert bad.type == "errored"
    assert bad.error.error.type == "overloaded_error"


async def test_anthropic_sdk_sees_cancel_and_expiry() -> None:
    async with (
        SimServer(batches=SimBatches(time=10.0, expire_after=5.0)) as server,
        _anthropic(server) as client,
    ):
        reqs = [{"custom_id": f"r{i}", "params": _params(f"p{i}")} for i in range(5)]
        one = await client.messages.batches.create(requests=reqs)  # type: ignore[arg-type]
        two = await client.messages.batches.create(requests=reqs)  # type: ignore[arg-type]
        await asyncio.sleep(3.0)
        canceling = await client.messages.batches.cancel(one.id)
        assert canceling.processing_status == "ended"  # cancel_time=0: ends at once
        await asyncio.sleep(3.0)
        expired = await client.messages.batches.retrieve(two.id)
        one_results = [r.result.type async for r in await client.messages.batches.results(one.id)]
        two_results = [r.result.type async for r in await client.messages.batches.results(two.id)]
        with pytest.raises(anthropic.BadRequestError, match="not unique"):
            await client.messages.batches.create(requests=[reqs[0], reqs[0]])  # type: ignore[list-item]
    assert one_results == ["succeeded", "canceled", "canceled", "canceled", "canceled"]
    assert expired.request_counts.expired == 3
    assert two_results == ["succeeded", "succeeded", "expired", "expired", "expired"]
