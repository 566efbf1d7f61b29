"""The official SDKs talk to SimServer: it speaks the real wire formats.

``openai`` and ``anthropic`` parse its replies, streams, errors and headers exactly as
they would the hosted APIs'. SDK retries are off (``max_retries=0``) so each error
surfaces as the SDK's own exception class.
"""

from __future__ import annotations

import anthropic
import openai
import pytest

from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime


def _openai(server: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url, api_key="sk-test", max_retries=0)


def _anthropic(server: SimServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.root, api_key="sk-ant-test", max_retries=0)


async def test_openai_sdk_parses_completion_and_headers() -> None:
    async with SimServer(rpm=100, tpm=1000) as server, _openai(server) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-sim",
            messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "a b"}],
            temperature=0,
            seed=1,
            n=2,
        )
        completion = raw.parse()
    assert completion.model == "gpt-sim"
    assert [c.message.content for c in completion.choices] == ["echo: a b"] * 2
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"


async def test_openai_sdk_streams() -> None:
    async with SimServer(per_token=0.01) as server, _openai(server) as client:
        stream = await client.chat.completions.create(
            model="gpt-sim",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
    assert "".join(parts) == "echo: one two three"
    assert usage is not None
    assert usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("500", openai.InternalServerError),
        ("503", openai.InternalServerError),
        ("429", openai.RateLimitError),
        ("quota", openai.RateLimitError),
    ],
)
async def test_openai_sdk_maps_errors(fault: str, error: type[openai.APIStatusError]) -> None:
    async with SimServer(fault_on={"x": fault}) as server, _openai(server) as client:
        with pytest.raises(error) as info:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
    body = info.value.body
    assert isinstance(body, dict)
    assert body["message"]
    if fault == "quota":
        assert info.value.code == "insufficient_quota"
    if fault == "429":
        assert info.value.response.headers["retry-after-ms"] == "1000"


async def test_openai_sdk_sees_auth_and_malformed() -> None:
    async with (
        SimServer(api_key="sk-good", fault_on={"junk": "malformed"}) as server,
        _openai(server) as client,
    ):
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
        good = openai.AsyncOpenAI(base_url=server.url, api_key="sk-good", max_retries=0)
        async with good:
            with pytest.raises(ValueError, match="Unterminated"):  # not JSON: the SDK says so
                await good.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "junk"}]
                )


async def test_anthropic_sdk_parses_message_and_headers() -> None:
    async with SimServer(rpm=50, tpm=500) as server, _anthropic(server) as client:
        raw = await client.messages.with_raw_response.create(
            model="claude-sim",
            max_tokens=2,
            system="be terse",
            messages=[{"role": "user", "content": "a b c"}],
        )
        message = await raw.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: a"
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 2)
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert raw.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")


async def test_anthropic_sdk_streams() -> None:
    async with (
        SimServer(per_token=0.01) as server,
        _anthropic(server) as client,
        client.messages.stream(
            model="claude-sim", max_tokens=100, messages=[{"role": "user", "content": "p q"}]
        ) as stream,
    ):
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: p q"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("500", anthropic.InternalServerError),
        ("529", anthropic.InternalServerError),
        ("429", anthropic.RateLimitError),
    ],
)
async def test_anthropic_sdk_maps_errors(fault: str, error: type[anthropic.APIStatusError]) -> None:
    async with SimServer(fault_on={"x": fault}) as server, _anthropic(server) as client:
        with pytest.raises(error) as info:
            await client.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    assert info.value.status_code == int(fault)
    body = info.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
