"""Azure OpenAI: ``fanflow.openai(..., api_version=)`` sends the key in the ``api-key``
header and the version as the ``api-version`` query parameter, to a deployment URL.

The server is a real aiohttp server on loopback that answers as Azure does: 401 without
the ``api-key`` header, 404 without ``api-version``; it keeps what each request carried.
The library test runs it in the test's loop; the CLI test runs it in a thread and the
command in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import fanflow

KEY = "azure-key-7d1c0e9b5a3f4e62"
VERSION = "2024-10-21"
DEPLOYMENT = "/openai/deployments/my-gpt"


@dataclass
class AzureLike:
    """What each request carried: path, query, the api-key header and Authorization."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "api-key": request.headers.get("api-key"),
                "authorization": request.headers.get("Authorization"),
            }
        )
        if request.headers.get("api-key") != KEY:
            return web.json_response({"error": {"code": "401", "message": "bad key"}}, status=401)
        if "api-version" not in request.query:
            return web.json_response(
                {"error": {"code": "404", "message": "no version"}}, status=404
            )
        body = await request.json()
        text = "azure: " + body["messages"][-1]["content"]
        return web.json_response(
            {
                "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                "model": "gpt-4o",
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(DEPLOYMENT + "/chat/completions", self.handle)
        return app


async def _serve(server: AzureLike) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}{DEPLOYMENT}"


@pytest.fixture
async def azure() -> AsyncIterator[tuple[AzureLike, str]]:
    server = AzureLike()
    runner, url = await _serve(server)
    try:
        yield server, url
    finally:
        await runner.cleanup()


async def test_api_version_sends_the_api_key_header_and_query(
    azure: tuple[AzureLike, str],
) -> None:
    server, url = azure
    async with fanflow.openai("gpt-4o", base_url=url, api_key=KEY, api_version=VERSION) as llm:
        result = await fanflow.map(llm, "{q}", [{"q": "hello"}])
    assert result.outputs == ["azure: hello"]
    assert server.seen == [
        {
            "path": DEPLOYMENT + "/chat/completions",
            "query": {"api-version": VERSION},
            "api-key": KEY,
            "authorization": None,
        }
    ]


async def test_without_api_version_azure_refuses(azure: tuple[AzureLike, str]) -> None:
    server, url = azure
    async with fanflow.openai("gpt-4o", base_url=url, api_key=KEY) as llm:
        result = await fanflow.map(llm, "{q}", [{"q": "hello"}])
    assert result.records[0].status is fanflow.Status.FAILED
    assert isinstance(result.records[0].error, fanflow.errors.AuthenticationError)
    assert KEY not in str(result.records[0].error)
    assert server.seen[0]["authorization"] == f"Bearer {KEY}"  # the OpenAI way, refused


def test_empty_api_version_is_refused() -> None:
    with pytest.raises(fanflow.ConfigError, match="api_version is empty"):
        fanflow.openai("gpt-4o", base_url="http://127.0.0.1:9/x", api_version=" ")


@pytest.fixture
def azure_thread() -> Iterator[tuple[AzureLike, str]]:
    server = AzureLike()
    ready: list[tuple[web.AppRunner, str]] = []
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        ready.append(loop.run_until_complete(_serve(server)))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield server, ready[0][1]
    finally:
        asyncio.run_coroutine_threadsafe(ready[0][0].cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_cli_api_version(azure_thread: tuple[AzureLike, str], tmp_path: Path) -> None:
    server, url = azure_thread
    (tmp_path / "in.jsonl").write_text('{"q": "hi"}\n')
    env = {"PATH": "/usr/bin:/bin", "FANFLOW_API_KEY": KEY}
    done = subprocess.run(
        [sys.executable, "-m", "fanflow", "map", "in.jsonl", "-p", "{q}", "--base-url", url,
         "--model", "gpt-4o", "--api-version", VERSION, "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == "azure: hi"
    assert server.seen[0]["query"] == {"api-version": VERSION}
    assert server.seen[0]["api-key"] == KEY
