"""SimServer's per-prompt counts: requests received and replies sent in full."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, prompt: str, **extra: Any) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], **extra}
    async with http.post(url + "/chat/completions", json=body) as r:
        await r.read()
        return r.status


async def test_counts_per_prompt_in_stats_and_json(http: aiohttp.ClientSession) -> None:
    async with SimServer(fault_on={"bad": ["500"], "hang": "hang"}) as server:
        assert await post(http, server.url, "a") == 200
        assert await post(http, server.url, "a", stream=True) == 200
        assert await post(http, server.url, "bad") == 500
        assert await post(http, server.url, "bad") == 200
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await post(http, server.url, "hang")
        await asyncio.sleep(0.01)  # let the server see the disconnect
        stats = server.stats()
        async with http.get(server.root + "/stats") as r:
            data = await r.json()
        server.reset()
        cleared = server.stats()
    assert stats.prompt_requests == {"a": 2, "bad": 2, "hang": 1}
    assert stats.prompt_completed == {"a": 2, "bad": 1}  # the 500 and the hang sent none
    assert data["prompt_requests"] == {"a": 2, "bad": 2, "hang": 1}
    assert data["prompt_completed"] == {"a": 2, "bad": 1}
    assert (cleared.prompt_requests, cleared.prompt_completed) == ({}, {})


async def test_no_counts_without_keep_requests(http: aiohttp.ClientSession) -> None:
    async with SimServer(keep_requests=False) as server:
        assert await post(http, server.url, "a") == 200
        stats = server.stats()
    assert stats.requests == 1
    assert (stats.prompt_requests, stats.prompt_completed) == ({}, {})
