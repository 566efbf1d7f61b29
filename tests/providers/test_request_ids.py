"""The API's id of each request (OpenAI's ``x-request-id`` header, Anthropic's
``request-id``) is kept with its answer, and with its error: ``extra["request_id"]``."""

from __future__ import annotations

from typing import Any

import pytest

import fanflow
from fanflow import Request
from fanflow.testing import MockReply, MockTransport, SimServer

from .._helpers import SentRequest

pytestmark = pytest.mark.looptime

KEY = "sk-ids-0123456789abcdefghij"
CHAT = {
    "id": "c1",
    "model": "m",
    "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}


def mocked(reply: MockReply) -> fanflow.BaseLLM:
    def server(request: SentRequest) -> MockReply:
        return reply

    return fanflow.openai(
        "m",
        base_url="http://mock.test/v1",
        api_key=KEY,
        transport=MockTransport(server),
        retry=fanflow.RetryPolicy(attempts=1),
    )


async def test_an_answer_keeps_the_id_its_header_gave() -> None:
    llm = mocked(MockReply.json(CHAT, headers={"x-request-id": "req_abc123"}))
    result = await fanflow.map(llm, [Request.of("hi")])
    response = result.records[0].response
    assert response is not None
    assert response.extra["request_id"] == "req_abc123"


async def test_an_answer_without_the_header_names_no_id() -> None:
    result = await fanflow.map(mocked(MockReply.json(CHAT)), [Request.of("hi")])
    response = result.records[0].response
    assert response is not None
    assert "request_id" not in response.extra


async def test_an_error_keeps_the_id_its_header_gave() -> None:
    problem = {"error": {"message": "bad max_tokens", "type": "invalid_request_error"}}
    reply = MockReply.json(problem, status=400, headers={"x-request-id": "req_bad1"})
    result = await fanflow.map(mocked(reply), [Request.of("hi")])
    error = result.records[0].error
    assert isinstance(error, fanflow.errors.ProviderError)
    assert error.status_code == 400
    assert error.extra["request_id"] == "req_bad1"


@pytest.mark.parametrize(
    ("make", "stream"),
    [("openai", False), ("openai", True), ("anthropic", False), ("anthropic", True)],
)
async def test_each_api_s_header_is_read_off_the_wire(make: str, stream: bool) -> None:
    async with SimServer() as server:
        maker: Any = getattr(fanflow, make)
        llm = maker("sim-model", base_url=server.url, api_key=KEY, stream=stream)
        async with llm:
            result = await fanflow.map(llm, [Request.of("a"), Request.of("b")])
    ids = [r.response.extra["request_id"] for r in result.records if r.response is not None]
    assert len(ids) == 2
    assert all(i.startswith("req_sim") for i in ids)
    assert ids[0] != ids[1]
