"""Stream readers on raw server-sent-event bytes: framing, text, errors mid-stream."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp
import pytest

import fanflow


def _reader(payload: bytes) -> aiohttp.StreamReader:
    # aiohttp's own reader, fed the bytes a server would send (the protocol is only
    # consulted for flow control, which these small payloads never trigger).
    reader = aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**16)
    reader.feed_data(payload)
    reader.feed_eof()
    return reader


async def test_openai_stream_joins_deltas_until_done() -> None:
    llm = fanflow.openai("m", base_url="http://127.0.0.1:9", api_key="k", stream=True)
    payload = (
        b": keep-alive comment\n"
        b'data: {"model": "m1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": "lo"},'
        b' "finish_reason": "stop"}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
        b"data: [DONE]\n\n"
        b'data: {"choices": [{"index": 0, "delta": {"content": "ignored"}}]}\n\n'
    )
    start = asyncio.get_running_loop().time()
    response = await llm.read_stream(_reader(payload), start, {})
    assert response.text == "Hello"
    assert response.model == "m1"
    assert response.finish_reason == "stop"
    assert response.usage == fanflow.Usage(3, 2)
    assert response.time_to_first_token is not None
    await llm.aclose()


async def test_anthropic_error_event_mid_stream_is_classified() -> None:
    llm = fanflow.anthropic("m", base_url="http://127.0.0.1:9", api_key="k", stream=True)
    payload = (
        b'event: message_start\ndata: {"type": "message_start", "message": {"model": "m",'
        b' "usage": {"input_tokens": 4}}}\n\n'
        b'data: {"type": "content_block_delta", "delta": {"text": "Hi"}}\n\n'
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error",'
        b' "message": "Overloaded"}}\n\n'
    )
    start = asyncio.get_running_loop().time()
    with pytest.raises(fanflow.errors.Overloaded) as info:
        await llm.read_stream(_reader(payload), start, {})
    assert fanflow.errors.is_retryable(info.value)
    assert "Overloaded" in str(info.value)
    await llm.aclose()


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (b'{"input_tokens": 4}', fanflow.Usage(4, 2)),
        # The cache's counts are apart from Anthropic's input_tokens; fanflow adds them.
        (
            b'{"input_tokens": 4, "cache_creation_input_tokens": 10,'
            b' "cache_read_input_tokens": 3000}',
            fanflow.Usage(3014, 2, cached_input_tokens=3000, cache_write_input_tokens=10),
        ),
    ],
)
async def test_anthropic_stream_collects_text_and_usage(
    usage: bytes, expected: fanflow.Usage
) -> None:
    llm = fanflow.anthropic("m", base_url="http://127.0.0.1:9", api_key="k", stream=True)
    payload = (
        b'data: {"type": "message_start", "message": {"model": "m2",'
        b' "usage": ' + usage + b"}}\n\n"
        b'data: {"type": "content_block_delta", "delta": {"text": "Hi "}}\n\n'
        b'data: {"type": "content_block_delta", "delta": {"text": "there"}}\n\n'
        b'data: {"type": "message_delta", "delta": {"stop_reason": "end_turn"},'
        b' "usage": {"output_tokens": 2}}\n\n'
        b'data: {"type": "message_stop"}\n\n'
    )
    response = await llm.read_stream(_reader(payload), asyncio.get_running_loop().time(), {})
    assert (response.text, response.model, response.finish_reason) == ("Hi there", "m2", "end_turn")
    assert response.usage == expected


async def test_openai_stream_reads_the_cached_prompt_tokens() -> None:
    llm = fanflow.openai("m", base_url="http://127.0.0.1:9", api_key="k", stream=True)
    payload = (
        b'data: {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 2000, "completion_tokens": 1,'
        b' "prompt_tokens_details": {"cached_tokens": 1920}}}\n\n'
        b"data: [DONE]\n\n"
    )
    response = await llm.read_stream(_reader(payload), asyncio.get_running_loop().time(), {})
    assert response.usage == fanflow.Usage(2000, 1, cached_input_tokens=1920)
    await llm.aclose()
