"""The transport seam: provider behaviour tested with no server (MockTransport).

The loopback tests beside this file prove the real wire; these drive the same handles
through :class:`fanflow.testing.MockTransport` and check what the handle sends and how
it reads what comes back.
"""

from __future__ import annotations

import asyncio
import json
import pickle
from typing import Any

import pytest

import fanflow
from fanflow.errors import AuthenticationError, ProviderConnectionError, RateLimited
from fanflow.testing import MockReply, MockTransport

from .._helpers import SentRequest

pytestmark = pytest.mark.looptime

KEY = "sk-transport-0123456789abcdefghij"


def chat(text: str, *, prompt_tokens: int = 3) -> MockReply:
    return MockReply.json(
        {
            "id": "c1",
            "model": "m-2024",
            "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1},
        }
    )


def handle(handler: Any, **kwargs: Any) -> fanflow.BaseLLM:
    return fanflow.openai(
        "m", base_url="http://mock.test/v1", api_key=KEY, transport=MockTransport(handler), **kwargs
    )


async def test_the_handle_sends_the_api_s_request_and_reads_its_reply() -> None:
    seen: list[SentRequest] = []

    def server(request: SentRequest) -> MockReply:
        seen.append(request)
        body = json.loads(request.body)
        return chat(body["messages"][-1]["content"].upper())

    llm = handle(server, temperature=0.2)
    result = await fanflow.map(llm, "say {w}", [{"w": "a"}, {"w": "b"}])
    assert result.outputs == ["SAY A", "SAY B"]
    assert [r.method for r in seen] == ["POST", "POST"]
    assert {r.url for r in seen} == {"http://mock.test/v1/chat/completions"}
    assert seen[0].headers["Authorization"] == f"Bearer {KEY}"
    body = json.loads(seen[0].body)
    assert body["model"] == "m"
    assert body["temperature"] == 0.2
    assert result.records[0].usage.input_tokens == 3


async def test_a_429_with_retry_after_is_waited_then_retried(looptime: float) -> None:
    answers = iter(
        [
            MockReply.json(
                {"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "7"}
            ),
            chat("ok"),
        ]
    )

    llm = handle(lambda request: next(answers))
    start = asyncio.get_running_loop().time()
    result = await fanflow.map(llm, "x", [{}])
    assert result.outputs == ["ok"]
    assert asyncio.get_running_loop().time() - start == pytest.approx(7.0, abs=0.01)
    assert len(result.records[0].attempts) == 2
    assert isinstance(result.records[0].attempts[0].error, RateLimited)


async def test_a_refused_key_fails_without_the_key_in_the_message() -> None:
    def server(request: SentRequest) -> MockReply:
        return MockReply.json({"error": {"message": f"bad key {KEY}"}}, status=401)

    result = await fanflow.map(handle(server), "x {i}", [{"i": i} for i in range(3)])
    errors = [r.error for r in result.records]
    assert isinstance(errors[0], AuthenticationError)
    assert all(KEY not in str(e) and KEY[:12] not in str(e) for e in errors)


async def test_an_oserror_in_the_transport_is_a_connection_failure() -> None:
    def server(request: SentRequest) -> MockReply:
        raise ConnectionRefusedError("refused")

    llm = handle(server, retry=fanflow.RetryPolicy(attempts=1))
    result = await fanflow.map(llm, "x", [{}])
    assert isinstance(result.records[0].error, ProviderConnectionError)


async def test_a_stream_is_read_event_by_event() -> None:
    events = [
        {"model": "m", "choices": [{"index": 0, "delta": {"content": "he"}}]},
        {
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "llo"}, "finish_reason": "stop"}],
        },
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
        "[DONE]",
    ]

    async def server(request: SentRequest) -> MockReply:
        assert json.loads(request.body)["stream"] is True
        return MockReply.events(events)

    response = await handle(server, stream=True).complete(fanflow.Request.of("hi"))
    assert response.text == "hello"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 2)
    assert response.finish_reason == "stop"


async def test_anthropic_goes_through_the_same_seam() -> None:
    def server(request: SentRequest) -> MockReply:
        assert request.url == "http://mock.test/v1/messages"
        assert request.headers["x-api-key"] == KEY
        return MockReply.json(
            {
                "id": "msg_1",
                "model": "claude-x",
                "content": [{"type": "text", "text": "bonjour"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 5, "output_tokens": 1},
            }
        )

    llm = fanflow.anthropic(
        "claude-x", base_url="http://mock.test", api_key=KEY, transport=MockTransport(server)
    )
    response = await llm.complete(fanflow.Request.of("hi"))
    assert response.text == "bonjour"
    assert response.usage.input_tokens == 5


def test_a_handle_on_the_default_transport_pickles_without_its_pool() -> None:
    llm = fanflow.openai("m", base_url="http://127.0.0.1:9/v1", api_key=KEY)
    copy = pickle.loads(pickle.dumps(llm))
    assert copy.transport is not llm.transport
    assert copy.wire_headers()["Authorization"] == f"Bearer {KEY}"
