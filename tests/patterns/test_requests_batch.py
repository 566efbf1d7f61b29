"""Ready-made requests through a provider batch (``mode="batch"``) against SimServer's
batch endpoints, in virtual time: the provider's input file keeps the user's
``custom_id``s, and a run that died after submitting finds its batch again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import fanflow
from fanflow.testing import SimBatches, SimServer

from .._helpers import open_batches

pytestmark = pytest.mark.looptime


def batch_line(custom_id: str, content: str) -> dict[str, Any]:
    body = {"model": "gpt-sim", "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


async def input_ids(server: SimServer, batch_id: str) -> list[str]:
    """The custom_ids of a batch's input file, read back over the Batch API."""
    headers = {"Authorization": "Bearer sk-test"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{server.url}/batches/{batch_id}") as reply:
            file_id = (await reply.json())["input_file_id"]
        async with http.get(f"{server.url}/files/{file_id}/content") as reply:
            data = await reply.read()
    return [json.loads(row)["custom_id"] for row in data.splitlines() if row.strip()]


async def test_the_provider_batch_keeps_the_files_custom_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [batch_line(f"task-{i}", f"q{i}") for i in range(4)])
    async with SimServer(batches=SimBatches(time=5.0)) as server:
        llm = fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test")
        async with llm:
            result = await fanflow.map(llm, fanflow.read_requests(path), mode="batch")
        (batch_id,) = {r.batch_id for r in result.records}
        assert batch_id is not None
        sent = await input_ids(server, batch_id)
    assert result.ok
    assert [r.value for r in result.records] == [f"echo: q{i}" for i in range(4)]
    assert sorted(sent) == [f"task-{i}" for i in range(4)]


async def test_a_run_killed_after_submitting_polls_its_batch_with_the_users_ids(
    tmp_path: Path,
) -> None:
    """What a killed run left: the batch submitted with the file's custom_ids and its
    cache keys in the store's journal. The rerun polls that batch, submits nothing."""
    from fanflow._durable import cache_key

    path = write(tmp_path / "in.jsonl", [batch_line(f"task-{i}", f"q{i}") for i in range(3)])
    async with SimServer(batches=SimBatches(time=5.0)) as server:
        llm = fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test")
        async with llm:
            with fanflow.Store(tmp_path / "s.db") as store:
                api = llm.batches()
                requests = [llm.prepare(x.request) for x in fanflow.read_requests(path)]
                lines = [api.line(f"task-{i}", r) for i, r in enumerate(requests)]
                state = await api.submit(lines, {"fanflow_token": "tok1"})
                keys = [cache_key(llm, r) for r in requests]
                await store.record_batch(state.id, "openai", keys)
                result = await fanflow.map(
                    llm, fanflow.read_requests(path), mode="batch", store=store
                )
                assert open_batches(store) == []
        stats = server.stats()
    assert result.ok, [r.error for r in result.records]
    assert [r.value for r in result.records] == ["echo: q0", "echo: q1", "echo: q2"]
    assert {r.batch_id for r in result.records} == {state.id}
    assert (stats.batches, stats.batch_requests) == (1, 3)


async def test_ids_stay_unique_in_a_batch_and_identical_requests_go_once() -> None:
    """Two different requests with the same custom_id: the second line carries its cache
    key (the API refuses a batch with a repeated id). Identical requests with different
    ids: one line, one answer shared."""
    same = {"custom_id": "dup"}
    requests = [
        fanflow.Request.of("a", metadata=same),
        fanflow.Request.of("b", metadata=same),
        fanflow.Request.of("c", metadata={"custom_id": "c-1"}),
        fanflow.Request.of("c", metadata={"custom_id": "c-2"}),
    ]
    async with SimServer(batches=SimBatches(time=5.0)) as server:
        llm = fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test")
        async with llm:
            result = await fanflow.map(llm, requests, mode="batch")
        (batch_id,) = {r.batch_id for r in result.records}
        assert batch_id is not None
        sent = await input_ids(server, batch_id)
        stats = server.stats()
    assert result.outputs == ["echo: a", "echo: b", "echo: c", "echo: c"]
    assert len(sent) == len(set(sent)) == 3
    assert {"dup", "c-1"} <= set(sent)
    assert (stats.batches, stats.batch_requests) == (1, 3)
