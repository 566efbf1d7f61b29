"""fanflow.openai and fanflow.anthropic against SimServer over real loopback HTTP.

Virtual time (looptime): SimServer runs in the test's loop, so latencies, timeouts and
Retry-After waits are exact and instant.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import pickle
import socket
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import fanflow
from fanflow import Request, RetryPolicy
from fanflow.providers import AnthropicLLM, OpenAILLM
from fanflow.testing import SimServer

from .._helpers import loopback_app

pytestmark = pytest.mark.looptime

Factory = Callable[..., OpenAILLM | AnthropicLLM]


def make_openai(server: SimServer, **kw: Any) -> OpenAILLM:
    return fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test", **kw)


def make_anthropic(server: SimServer, **kw: Any) -> AnthropicLLM:
    return fanflow.anthropic("claude-sim", base_url=server.root, api_key="sk-ant", **kw)


@pytest.fixture(params=["openai", "anthropic"])
def factory(request: pytest.FixtureRequest) -> Factory:
    return {"openai": make_openai, "anthropic": make_anthropic}[request.param]  # type: ignore[return-value]


@pytest.fixture
async def server() -> AsyncIterator[SimServer]:
    async with SimServer(
        fault_on={
            "^e500": "500",
            "^e503": "503",
            "^e529": "529",
            "^e429": "429",
            "^quota": "quota",
            "^junk": "malformed",
            "^reset": "reset",
            "^hang": "hang",
            "^slow": "slow_stream",
        }
    ) as s:
        yield s


async def test_success_and_parameters_passed_through(server: SimServer) -> None:
    llm = make_openai(
        server,
        temperature=0.3,
        max_tokens=50,
        seed=7,
        stop=["END"],
        top_p=0.9,
        n=2,
        response_format={"type": "json_object"},
    )
    async with llm:
        response = await fanflow.call(llm, Request.of("a b c", system="sys"))
    assert response.text == "echo: a b c"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 8)  # n=2
    assert (response.model, response.finish_reason) == ("gpt-sim", "stop")
    body = server.requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a b c"},
    ]
    assert {k: body[k] for k in ("temperature", "max_tokens", "seed", "stop", "top_p", "n")} == {
        "temperature": 0.3,
        "max_tokens": 50,
        "seed": 7,
        "stop": ["END"],
        "top_p": 0.9,
        "n": 2,
    }
    assert body["response_format"] == {"type": "json_object"}


async def test_anthropic_system_and_max_tokens(server: SimServer) -> None:
    async with make_anthropic(server, temperature=0.0, stop=["zz"]) as llm:
        response = await fanflow.call(llm, Request.of("p q", system="be terse"))
        capped = await fanflow.call(llm, Request.of("p q r", max_tokens=2))
    body = server.requests[0].body
    assert body["system"] == "be terse"
    assert body["messages"] == [{"role": "user", "content": "p q"}]
    assert body["max_tokens"] == 1024  # the API requires one: the documented default
    assert body["stop_sequences"] == ["zz"]
    assert (response.text, response.finish_reason) == ("echo: p q", "end_turn")
    assert (capped.text, capped.finish_reason) == ("echo: p", "max_tokens")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 3)


async def test_latency_is_measured_in_loop_time(factory: Factory) -> None:
    async with SimServer(latency=0.25, per_token=0.05) as server, factory(server) as llm:
        response = await fanflow.call(llm, "x y")  # 3 reply tokens
    assert response.latency == pytest.approx(0.4)


async def test_stream_collects_text_and_time_to_first_token(factory: Factory) -> None:
    loop = asyncio.get_running_loop()
    async with SimServer(latency=0.5, per_token=0.1) as server, factory(server, stream=True) as llm:
        t0 = loop.time()
        response = await fanflow.call(llm, "one two three")
        took = loop.time() - t0
    assert response.text == "echo: one two three"
    assert response.time_to_first_token == pytest.approx(0.5 + 0.1)
    assert took == pytest.approx(0.5 + 0.1 * 4)  # as long as the same reply unstreamed
    assert response.usage.output_tokens == 4
    assert server.requests[0].stream


@pytest.mark.parametrize(
    ("prompt", "error", "status", "retryable"),
    [
        ("e500", fanflow.errors.ServerError, 500, True),
        ("e503", fanflow.errors.ServerError, 503, True),
        ("e529", fanflow.errors.Overloaded, 529, True),
        ("e429", fanflow.errors.RateLimited, 429, True),
        ("quota", fanflow.errors.QuotaExceeded, 429, False),
        ("junk", fanflow.errors.ProtocolError, None, True),
        ("reset", fanflow.errors.ProviderConnectionError, None, True),
    ],
)
async def test_faults_are_classified(
    server: SimServer,
    factory: Factory,
    prompt: str,
    error: type[fanflow.errors.ProviderError],
    status: int | None,
    retryable: bool,
) -> None:
    async with factory(server) as llm:
        with pytest.raises(error) as info:
            await llm.complete(llm.prepare(Request.of(prompt)))
    assert type(info.value) is error
    assert info.value.status_code == status
    assert fanflow.errors.is_retryable(info.value) is retryable
    if prompt == "e500":
        assert "The server had an error while processing your request" in str(info.value)
    if prompt == "e429":
        assert info.value.retry_after == 1.0  # retry-after-ms wins over retry-after
    if prompt == "quota":
        assert "quota" in str(info.value) or "usage limits" in str(info.value)


async def test_malformed_stream_event_is_a_protocol_error(
    server: SimServer, factory: Factory
) -> None:
    async with factory(server, stream=True) as llm:
        with pytest.raises(fanflow.errors.ProtocolError, match="bad stream event") as info:
            await llm.complete(llm.prepare(Request.of("junk")))
    assert info.value.retryable


async def test_retries_then_succeeds_through_the_engine(factory: Factory) -> None:
    async with SimServer(fault_on={"x": ["500", "529"]}) as server, factory(server) as llm:
        record = await fanflow.call(
            llm, "x", retry=RetryPolicy(attempts=3, initial=1.0, jitter=False)
        ).record()
    assert record.ok
    assert [type(a.error).__name__ for a in record.attempts] == [
        "ServerError",
        "Overloaded",
        "NoneType",
    ]
    assert [a.wait_before for a in record.attempts] == [0.0, 1.0, 2.0]


async def test_a_500_told_not_to_retry_does_not_claim_a_retry(factory: Factory) -> None:
    async with SimServer(fault_on={"x": ["500"]}) as server, factory(server) as llm:
        record = await fanflow.call(llm, "x", retry=RetryPolicy.none()).record()
        assert server.stats().requests == 1
    assert isinstance(record.error, fanflow.errors.ServerError)
    message = str(record.error)
    assert "HTTP 500" in message
    assert "retries this" not in message  # it was not retried
    assert "retryable" in message  # still says it is the kind that may be retried


async def test_rate_limit_headers_and_retry_after(factory: Factory) -> None:
    loop = asyncio.get_running_loop()
    async with SimServer(rpm=2, tpm=1000) as server, factory(server) as llm:
        first = await fanflow.call(llm, "a")
        await fanflow.call(llm, "a")
        with pytest.raises(fanflow.errors.RateLimited) as info:
            await llm.complete(llm.prepare(Request.of("a")))
        t0 = loop.time()
        record = await fanflow.call(llm, "a", retry=RetryPolicy(attempts=2, initial=0.0)).record()
    state = first.rate_limit
    assert state is not None
    assert (state.requests_limit, state.requests_remaining) == (2, 1)
    assert (state.tokens_limit, state.tokens_remaining) == (1000, 997)
    assert state.requests_reset == pytest.approx(30.0, abs=1.0)  # 1 request at 2/min
    assert state.observed_at is not None
    error = info.value
    assert error.retry_after == pytest.approx(30.0, abs=1.0)
    assert error.rate_limit is not None
    assert error.rate_limit.requests_remaining == 0
    assert record.ok
    # The lane read "0 requests remaining, reset in 30 s" from the second reply and held
    # the next call until the reset, so it went through on its first attempt, no 429.
    assert len(record.attempts) == 1
    assert record.attempts[0].start - t0 == pytest.approx(error.retry_after, abs=1.0)


async def test_per_attempt_timeout_on_a_hang_closes_the_request(
    server: SimServer, factory: Factory
) -> None:
    loop = asyncio.get_running_loop()
    async with factory(server, timeout=5.0, retry=RetryPolicy.none()) as llm:
        t0 = loop.time()
        record = await fanflow.call(llm, "hang").record()
        took = loop.time() - t0
        await asyncio.sleep(0.01)  # the server notices the closed connection
    assert record.status is fanflow.Status.TIMED_OUT
    assert took == 5.0
    stats = server.stats()
    assert (stats.disconnects, stats.in_flight) == (1, 0)


async def test_cancellation_closes_the_request(server: SimServer, factory: Factory) -> None:
    async with factory(server) as llm:
        task = asyncio.create_task(fanflow.call(llm, "hang")._result())
        await asyncio.sleep(3.0)
        assert server.stats().in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)
    assert server.stats().disconnects == 1
    assert server.stats().in_flight == 0


async def test_connection_refused_is_retryable(factory: Factory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    url = f"http://127.0.0.1:{port}"
    llm = (
        fanflow.openai("m", base_url=url + "/v1", api_key="k")
        if factory is make_openai
        else fanflow.anthropic("m", base_url=url, api_key="k")
    )
    async with llm:
        with pytest.raises(fanflow.errors.ProviderConnectionError) as info:
            await llm.complete(llm.prepare(Request.of("x")))
    assert info.value.retryable
    assert "base_url" in str(info.value)


async def test_slow_stream_trips_the_timeout(server: SimServer, factory: Factory) -> None:
    async with factory(server, timeout=2.5, retry=RetryPolicy.none()) as llm:
        record = await fanflow.call(llm, "slow down").record()
    assert record.status is fanflow.Status.TIMED_OUT
    assert record.attempts[0].duration == 2.5


async def test_keys_never_leak(factory: Factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = "sk-very-secret-key-0123456789"
    async with SimServer(api_key="sk-the-right-one") as server:
        llm = (
            fanflow.openai("m", base_url=server.url, api_key=key)
            if factory is make_openai
            else fanflow.anthropic("m", base_url=server.root, api_key=key)
        )
        async with llm:
            record = await fanflow.call(llm, "x", retry=RetryPolicy.none()).record()
    error = record.error
    assert isinstance(error, fanflow.errors.AuthenticationError)
    assert "[redacted]" in str(error)  # SimServer echoed the key; we scrubbed it
    for text in (str(error), repr(error), repr(record), repr(llm), str(vars(llm)), caplog.text):
        assert key not in text
    assert key.encode() not in pickle.dumps(error)
    assert key not in repr(pickle.loads(pickle.dumps(error)))


def test_environment_and_missing_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    with pytest.raises(fanflow.ConfigError, match="OPENAI_API_KEY"):
        fanflow.openai("gpt-4o-mini")
    with pytest.raises(fanflow.ConfigError, match="ANTHROPIC_API_KEY"):
        fanflow.anthropic("claude")
    local = fanflow.openai("llama", base_url="http://127.0.0.1:8080/v1")  # no key needed
    assert local.auth_headers() == {}
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    llm = fanflow.openai("gpt-4o-mini", timeout=3.0, max_tokens=9)
    assert llm.url == "http://127.0.0.1:9/v1/chat/completions"
    assert llm.auth_headers() == {"Authorization": "Bearer sk-env"}
    assert (llm.timeout, llm.defaults["max_tokens"]) == (3.0, 9)
    assert repr(llm) == "fanflow.openai(model='gpt-4o-mini', base_url='http://127.0.0.1:9/v1')"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env")
    claude = fanflow.anthropic("claude", base_url="http://127.0.0.1:9/v1")
    assert claude.url == "http://127.0.0.1:9/v1/messages"
    assert claude.auth_headers()["x-api-key"] == "sk-ant-env"


async def test_one_pool_per_loop_reopened_after_aclose(server: SimServer) -> None:
    llm = make_openai(server)
    first = await llm.transport.session()
    assert await llm.transport.session() is first
    await llm.aclose()
    assert first.closed
    second = await llm.transport.session()
    assert second is not first
    assert (await fanflow.call(llm, "again")).text == "echo: again"
    await llm.aclose()
    await llm.aclose()  # twice is fine
    assert second.closed


async def test_aclose_waits_for_the_sessions_on_other_loops(server: SimServer) -> None:
    llm = make_openai(server)
    other = asyncio.new_event_loop()

    def serve() -> None:
        other.run_forever()
        other.run_until_complete(other.shutdown_asyncgens())
        other.close()

    thread = threading.Thread(target=serve, name="other-loop", daemon=True)
    thread.start()
    try:
        elsewhere = asyncio.run_coroutine_threadsafe(llm.transport.session(), other).result(10)
        here = await llm.transport.session()
        await llm.aclose()
        # Both are closed when aclose() returns: the other loop's close was awaited.
        assert here.closed
        assert elsewhere.closed
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(10)


async def test_a_pickled_handle_works(server: SimServer) -> None:
    async with make_openai(server, max_tokens=5) as llm:
        await fanflow.call(llm, "warm the pool")
        copy = pickle.loads(pickle.dumps(llm))
    async with copy:
        assert (await fanflow.call(copy, "again")).text == "echo: again"
    assert (copy.url, copy.defaults, repr(copy)) == (llm.url, llm.defaults, repr(llm))


async def test_a_handle_never_closed_is_closed_with_its_loop(server: SimServer) -> None:
    # No aclose(): the loop's shutdown_asyncgens closes the pool when the test's loop
    # ends, so filterwarnings=error sees no "Unclosed client session".
    llm = make_openai(server)
    assert (await fanflow.call(llm, "left open")).text == "echo: left open"


async def test_a_handle_dropped_mid_run_leaves_nothing_for_the_collector(server: SimServer) -> None:
    # A handle dropped without aclose() while its loop runs on: the garbage collector
    # must find no open session to finalise (aiohttp would warn "Unclosed connector",
    # an error here) and the loop no task left closing it. The next session opened on
    # the loop closes the dropped one's first.
    dropped = make_openai(server)
    assert (await fanflow.call(dropped, "dropped")).text == "echo: dropped"
    session = weakref.ref(await dropped.transport.session())
    del dropped
    gc.collect()
    kept = session()
    assert kept is not None  # kept, not finalised by the collector
    assert not kept.closed
    async with make_openai(server) as later:
        assert (await fanflow.call(later, "later")).text == "echo: later"
    assert kept.closed


async def test_many_first_calls_close_a_dropped_session_once(server: SimServer) -> None:
    # A new handle's first calls start at once, and each opens the handle's session:
    # the dropped handle's session is closed by one of them, and no call fails for it
    # (a second close of its generator raised "aclose(): asynchronous generator is
    # already running" into a call, seen on the Ray workers, which drop a handle per run).
    dropped = [make_openai(server) for _ in range(3)]
    for llm in dropped:
        assert (await fanflow.call(llm, "dropped")).text == "echo: dropped"
    del dropped, llm
    gc.collect()
    async with make_openai(server) as later:
        result = await fanflow.map(later, "{input}", [f"n{i}" for i in range(20)])
    assert result.ok, [str(e) for e in result.errors.values()][:1]


def test_sync_run_uses_a_session_per_loop_and_closes_it() -> None:
    with SimServer() as server:
        llm = make_openai(server)
        texts = [fanflow.run(fanflow.call(llm, f"n{i}")).text for i in range(2)]
        assert texts == ["echo: n0", "echo: n1"]
        # each fanflow.run had its own loop; each closed its session when the loop ended
        assert len(llm.transport._sessions._by_loop) == 0
        assert server.stats().requests == 2


async def test_virtual_time_never_fires_a_timeout_early_over_real_sockets() -> None:
    """A reply due 1 ms before the timeout always wins; 1 ms after always loses.

    Under looptime the clock jumps when the loop is idle; real loopback I/O must not let
    it jump past a reply that is already on the wire (the server writes in this loop).
    """
    retry = RetryPolicy.none()
    async with SimServer(latency=0.999) as fast, SimServer(latency=1.001) as slow:
        on_time = make_openai(fast, timeout=1.0, retry=retry)
        late = make_openai(slow, timeout=1.0, retry=retry)
        async with on_time, late:
            ok = await fanflow.map(on_time, "{i}", [{"i": i} for i in range(200)], concurrency=50)
            bad = await fanflow.map(late, "{i}", [{"i": i} for i in range(20)], concurrency=20)
    assert ok.ok
    assert set(bad.status.values()) == {fanflow.Status.TIMED_OUT}


async def _headers_seen(**kw: Any) -> list[list[str]]:
    """The User-Agent headers (all of them, per request) a loopback server received."""
    from aiohttp import web

    seen: list[list[str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.getall("User-Agent", []))
        return web.json_response(
            {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
        )

    async with loopback_app("/v1/chat/completions", handle) as base:
        llm = fanflow.openai("m", base_url=f"{base}/v1", api_key="sk-x", **kw)
        async with llm:
            await llm.complete(Request.of("hi"))
    return seen


async def test_requests_name_fanflow_in_their_user_agent() -> None:
    assert await _headers_seen() == [[f"fanflow/{fanflow.__version__}"]]


async def test_a_user_agent_of_your_own_replaces_fanflows() -> None:
    assert await _headers_seen(headers={"user-agent": "mine/1"}) == [["mine/1"]]


async def test_the_handles_connections_read_in_pieces_malloc_keeps_off_mmap() -> None:
    # asyncio reads a plain TCP socket 256 KiB at a time: a buffer that size, allocated
    # per read, went through glibc's mmap and munmap on every reply (about 30 us of
    # system time a call on a loopback server). A handle's connections read 64 KiB at
    # a time, and a reply larger than that still arrives whole.
    from aiohttp import web

    big = "x" * 300_000

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(
            {"choices": [{"message": {"content": big}, "finish_reason": "stop"}]}
        )

    async with loopback_app("/v1/chat/completions", handle) as base:
        llm = fanflow.openai("m", base_url=f"{base}/v1", api_key="sk-x")
        async with llm:
            response = await llm.complete(Request.of("hi"))
            session = await llm.transport.session()  # type: ignore[attr-defined]
            async with session.post(f"{base}/v1/chat/completions", data=b"{}") as reply:
                assert reply.connection is not None
                transport = reply.connection.transport
                assert transport is not None
                read_size = transport.max_size  # type: ignore[attr-defined]
                await reply.read()
    assert response.text == big
    assert read_size <= 64 * 1024
