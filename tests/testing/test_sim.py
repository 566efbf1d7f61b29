"""SimServer over real loopback HTTP, in virtual time (looptime)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

CHAT = "/chat/completions"
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], **extra}


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any
) -> tuple[int, Mapping[str, str], bytes]:
    async with http.post(url, json=body, **kw) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_openai_reply_is_the_echo_with_usage(http: aiohttp.ClientSession) -> None:
    async with SimServer() as server:
        status, _, body = await post(http, server.url + CHAT, chat("red green blue"))
    data = json.loads(body)
    assert status == 200
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "echo: red green blue"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def test_max_tokens_and_stop_cut_the_reply(http: aiohttp.ClientSession) -> None:
    async with SimServer() as server:
        _, _, body = await post(http, server.url + CHAT, chat("a b c d", max_tokens=2))
        _, _, stopped = await post(http, server.url + CHAT, chat("a b STOP c", stop=["STOP"]))
        _, _, anth = await post(
            http,
            server.url + "/messages",
            {
                "model": "m",
                "max_tokens": 50,
                "system": "be brief",
                "messages": [{"role": "user", "content": "x y"}],
                "stop_sequences": ["y"],
            },
            headers=ANTHROPIC_HEADERS,
        )
    cut = json.loads(body)["choices"][0]
    assert (cut["message"]["content"], cut["finish_reason"]) == ("echo: a", "length")
    assert json.loads(stopped)["choices"][0]["message"]["content"] == "echo: a b"
    a = json.loads(anth)
    assert a["content"] == [{"type": "text", "text": "echo: x"}]
    assert (a["stop_reason"], a["stop_sequence"]) == ("stop_sequence", "y")
    assert a["usage"] == {"input_tokens": 4, "output_tokens": 2}  # system counts as input


async def test_latency_is_base_plus_per_token(http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    async with SimServer(latency=0.5, per_token=0.1) as server:
        t0 = loop.time()
        await post(http, server.url + CHAT, chat("one two"))  # reply: 3 tokens
        assert loop.time() - t0 == pytest.approx(0.8)


async def test_jitter_is_seeded(http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()

    async def durations(seed: int) -> list[float]:
        out = []
        async with SimServer(latency=1.0, jitter=1.0, seed=seed) as server:
            for _ in range(3):
                t0 = loop.time()
                await post(http, server.url + CHAT, chat("x"))
                out.append(round(loop.time() - t0, 6))
        return out

    first, again, other = await durations(1), await durations(1), await durations(2)
    assert first == again != other
    assert all(1.0 <= d <= 2.0 for d in first)


async def test_rpm_bucket_answers_429_with_headers(http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    async with SimServer(rpm=60) as server:
        results = [await post(http, server.url + CHAT, chat("x")) for _ in range(61)]
        assert [s for s, _, _ in results].count(200) == 60
        status, headers, body = results[-1]
        assert status == 429
        assert headers["retry-after-ms"] == "1000"
        assert headers["retry-after"] == "1"
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "1m0s"
        assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        t0 = loop.time()
        await asyncio.sleep(1.0)  # the bucket refills one request per second
        assert (await post(http, server.url + CHAT, chat("x")))[0] == 200
        assert (await post(http, server.url + CHAT, chat("x")))[0] == 429
        assert loop.time() - t0 == 1.0
        stats = server.stats()
        arrivals = [r.at - server.requests[0].at for r in server.requests]
    assert stats.responses == {200: 61, 429: 2}
    assert arrivals == [0.0] * 61 + [1.0, 1.0]  # the test's own virtual clock
    assert [(s.second, s.admitted, s.rate_limited) for s in stats.timeline] == [
        (0, 60, 1),
        (1, 1, 1),
    ]


async def test_tpm_bucket_and_anthropic_headers(http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "a b"}]}
    async with SimServer(tpm=12) as server:  # each call: 2 in + 3 out = 5 tokens
        url = server.url + "/messages"
        ok1 = await post(http, url, body, headers=ANTHROPIC_HEADERS)
        ok2 = await post(http, url, body, headers=ANTHROPIC_HEADERS)
        limited = await post(http, url, body, headers=ANTHROPIC_HEADERS)
    assert (ok1[0], ok2[0], limited[0]) == (200, 200, 429)
    headers = ok2[1]
    assert headers["anthropic-ratelimit-tokens-limit"] == "12"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "2"
    assert headers["anthropic-ratelimit-tokens-reset"].endswith("Z")
    assert limited[1]["retry-after"] == "15"  # 3 tokens missing at 12 per minute
    assert "retry-after-ms" not in limited[1]
    assert json.loads(limited[2])["error"]["type"] == "rate_limit_error"


async def test_max_in_flight_refuses_the_excess(http: aiohttp.ClientSession) -> None:
    async with SimServer(latency=1.0, max_in_flight=3) as server:
        results = await asyncio.gather(
            *(post(http, server.url + CHAT, chat(str(i))) for i in range(5))
        )
        stats = server.stats()
    assert sorted(s for s, _, _ in results) == [200, 200, 200, 429, 429]
    assert stats.responses == {200: 3, 429: 2}


@pytest.mark.parametrize(
    ("kind", "status", "error_type"),
    [
        ("500", 500, "server_error"),
        ("503", 503, "server_error"),
        ("529", 529, "server_error"),
        ("429", 429, "requests"),
        ("quota", 429, "insufficient_quota"),
    ],
)
async def test_status_faults(
    http: aiohttp.ClientSession, kind: str, status: int, error_type: str
) -> None:
    async with SimServer(fault_on={"^bad": kind}) as server:
        got = await post(http, server.url + CHAT, chat("bad one"))
        fine = await post(http, server.url + CHAT, chat("good one"))
        stats = server.stats()
    assert got[0] == status
    assert json.loads(got[2])["error"]["type"] == error_type
    assert fine[0] == 200
    assert stats.faults == {kind: 1}


async def test_fault_sequence_then_normal(http: aiohttp.ClientSession) -> None:
    async with SimServer(fault_on={"x": ["503", "529"]}) as server:
        statuses = [(await post(http, server.url + CHAT, chat("x")))[0] for _ in range(3)]
    assert statuses == [503, 529, 200]


async def test_seeded_fault_draws_repeat(http: aiohttp.ClientSession) -> None:
    async def run(seed: int) -> list[int]:
        async with SimServer(faults={"500": 0.3, "503": 0.2}, seed=seed) as server:
            return [(await post(http, server.url + CHAT, chat("x")))[0] for _ in range(40)]

    first, again = await run(7), await run(7)
    assert first == again
    assert {200, 500, 503} == set(first)


async def test_hang_until_client_gives_up(http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    async with SimServer(fault_on={"hang": "hang"}) as server:
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(30):
                await post(http, server.url + CHAT, chat("hang"))
        assert loop.time() - t0 == 30
        await asyncio.sleep(0.01)  # let the server see the disconnect
        stats = server.stats()
    assert stats.disconnects == 1
    assert stats.in_flight == 0
    assert stats.responses == {}


async def test_hang_released_when_server_closes(http: aiohttp.ClientSession) -> None:
    server = SimServer(fault_on={"hang": "hang"})
    await server.start()
    task = asyncio.create_task(post(http, server.url + CHAT, chat("hang")))
    await asyncio.sleep(5)
    await server.aclose()
    with pytest.raises(aiohttp.ClientError):
        await task


async def test_reset_and_malformed(http: aiohttp.ClientSession) -> None:
    async with SimServer(fault_on={"reset": "reset", "junk": "malformed"}) as server:
        with pytest.raises(aiohttp.ClientError):
            await post(http, server.url + CHAT, chat("reset"))
        status, _, body = await post(http, server.url + CHAT, chat("junk"))
    assert status == 200
    with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
        json.loads(body)


async def test_streams_word_by_word(http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    async with SimServer(latency=0.2, per_token=0.1, fault_on={"slow": "slow_stream"}) as server:
        arrivals: list[tuple[float, bytes]] = []
        t0 = loop.time()
        body = chat("a b", stream=True, stream_options={"include_usage": True})
        async with http.post(server.url + CHAT, json=body) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    arrivals.append((round(loop.time() - t0, 6), line[6:].strip()))
        slow_t0 = loop.time()
        async with http.post(server.url + CHAT, json=chat("slow", stream=True)) as r:
            await r.read()
        slow = loop.time() - slow_t0
    texts = [
        json.loads(d)["choices"][0]["delta"].get("content")
        for _, d in arrivals
        if d != b"[DONE]" and json.loads(d)["choices"]
    ]
    assert texts == ["", "echo:", " a", " b", None]
    assert [t for t, _ in arrivals] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])
    assert arrivals[-1][1] == b"[DONE]"
    assert json.loads(arrivals[-2][1])["usage"]["completion_tokens"] == 3
    assert slow == pytest.approx(0.2 + 4 * 1.0)  # 5 events, 1 s apart (slow_delay)


async def test_reply_scripts(http: aiohttp.ClientSession) -> None:
    async with SimServer(reply={"capital": "Paris", r"\d+\+\d+": "4"}) as server:
        a = await post(http, server.url + CHAT, chat("the capital of France?"))
        b = await post(http, server.url + CHAT, chat("2+2"))
        c = await post(http, server.url + CHAT, chat("other"))
    async with SimServer(reply=lambda r: f"#{r.index} {r.prompt.upper()}") as server:
        d = await post(http, server.url + CHAT, chat("hi"))
        e = await post(http, server.url + CHAT, chat("yo"))
        seen = [r.prompt for r in server.requests]
    replies = [json.loads(x[2])["choices"][0]["message"]["content"] for x in (a, b, c, d, e)]
    assert replies == ["Paris", "4", "echo: other", "#0 HI", "#1 YO"]
    assert seen == ["hi", "yo"]


async def test_wire_validation_and_auth(http: aiohttp.ClientSession) -> None:
    async with SimServer(api_key="sk-right", models=["m"]) as server:
        good = {"Authorization": "Bearer sk-right"}
        wrong = await post(
            http, server.url + CHAT, chat("x"), headers={"Authorization": "Bearer sk-wrong"}
        )
        ok = await post(http, server.url + CHAT, chat("x"), headers=good)
        missing = await post(http, server.url + CHAT, {**chat("x"), "model": "nope"}, headers=good)
        anth_headers = {"x-api-key": "sk-right", **ANTHROPIC_HEADERS}
        no_max = await post(http, server.url + "/messages", chat("x"), headers=anth_headers)
        system_role = await post(
            http,
            server.url + "/messages",
            {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "s"}]},
            headers=anth_headers,
        )
        no_version = await post(
            http, server.url + "/messages", chat("x"), headers={"x-api-key": "sk-right"}
        )
    assert wrong[0] == 401
    assert "sk-wrong" in json.loads(wrong[2])["error"]["message"]
    assert ok[0] == 200
    assert missing[0] == 404
    assert no_max[0] == 400
    assert "max_tokens" in no_max[2].decode()
    assert system_role[0] == 400
    assert "system" in system_role[2].decode()
    assert no_version[0] == 400


async def test_stats_endpoint_and_reset(http: aiohttp.ClientSession) -> None:
    async with SimServer(latency=0.5) as server:
        await asyncio.gather(*(post(http, server.url + CHAT, chat("a b")) for _ in range(4)))
        await asyncio.sleep(1.0)
        await post(http, server.url + CHAT, chat("a b"))
        async with http.get(server.root + "/stats") as r:
            stats = await r.json()
        async with http.post(server.root + "/stats/reset") as r:
            assert r.status == 200
        after = server.stats()
    assert stats["requests"] == 5
    assert stats["responses"] == {"200": 5}
    assert stats["max_in_flight"] == 4
    assert (stats["tokens_in"], stats["tokens_out"]) == (10, 15)
    assert [(s["second"], s["requests"], s["completed"]) for s in stats["timeline"]] == [
        (0, 4, 4),
        (1, 1, 0),
        (2, 0, 1),
    ]
    assert (after.requests, after.timeline, after.responses) == (0, (), {})


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault 'boom'"):
        SimServer(fault_on={"x": "boom"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"add up to 1\.5"):
        SimServer(faults={"500": 0.9, "503": 0.6})
    with pytest.raises(ValueError, match="rpm must be >= 1"):
        SimServer(rpm=0)
    with pytest.raises(RuntimeError, match="not running"):
        _ = SimServer().url


def test_runs_in_a_thread_for_sync_code() -> None:
    with SimServer() as server:
        req = urllib.request.Request(
            server.url + CHAT,
            data=json.dumps(chat("sync")).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.loads(r.read())
        assert server.stats().requests == 1
    assert body["choices"][0]["message"]["content"] == "echo: sync"


async def test_a_stream_left_midway_is_a_disconnect_not_a_completion(
    http: aiohttp.ClientSession,
) -> None:
    async with SimServer(fault_on={"slow": "slow_stream"}) as server:
        with pytest.raises(TimeoutError):
            async with (
                asyncio.timeout(2.5),
                http.post(server.url + CHAT, json=chat("slow", stream=True)) as r,
            ):
                await r.read()
        await asyncio.sleep(5)  # the server's next write finds the connection closed
        stats = server.stats()
    assert stats.disconnects == 1
    assert stats.responses == {}
    assert stats.prompt_requests == {"slow": 1}
    assert stats.prompt_completed == {}
