"""SimServer: an OpenAI- and Anthropic-compatible HTTP server for tests and benchmarks.

It listens on loopback and answers ``POST /v1/chat/completions`` (OpenAI) and
``POST /v1/messages`` (Anthropic) with deterministic replies, after a modelled latency,
within RPM/TPM/in-flight limits enforced with real 429 responses and the real
rate-limit headers, and with faults drawn from seeded probabilities or scripted by
prompt. ``GET /stats`` reports what it saw; ``POST /stats/reset`` clears it.

All waiting is ``asyncio.sleep`` on the server's event loop and all its clocks read
``loop.time()``: run it in the test's own loop (``async with SimServer() as server``)
and, under ``looptime``, its latency and rate-limit windows are virtual too, so a test
of a 60 s window finishes instantly. For sync code, ``with SimServer() as server`` runs
it on a loop in a background thread (real time).

Rate limits are token buckets, as the hosted APIs document theirs: a bucket holds
``rpm`` requests (``tpm`` tokens), refills continuously at ``rpm / 60`` per second, and
a request is refused with 429 when its bucket lacks what it needs. Tokens are counted
at admission as input plus output (the reply is known in advance). Token counts use
one token per whitespace-separated word.

An OpenAI reply (not streamed) says the time the server spent on it in llama.cpp's
``timings`` field (``prompt_ms``: the latency, ``predicted_ms``: the per-token time), so
a client can tell the model's time from a queue's.

This module holds the server's life and routing; the parts are ``_simchat.py`` (the
chat endpoints), ``_simlimits.py`` (the limits), ``_simfaults.py`` (the faults),
``_simstats.py`` (the counters), ``_simcache.py`` (the prompt cache), ``_simbatch.py``
(the batch endpoints) and ``_simwire.py`` (the two APIs' wire shapes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from ._simbatch import BatchDesk, SimBatches
from ._simcache import PromptCache, SimCache
from ._simchat import ChatDesk, EchoKey, ReplySpec, Timing
from ._simfaults import FAULTS, FaultKind, Faults, FaultSpec
from ._simlimits import Limiter
from ._simstats import Counters, SimSecond, SimStats
from ._simwire import Api, SimRequest

__all__ = [
    "FAULTS",
    "FaultKind",
    "SimBatches",
    "SimCache",
    "SimSecond",
    "SimServer",
    "SimStats",
]

#: The largest request body SimServer reads (a batch body or file at the APIs' limit).
_MAX_BODY = 300 * 1024 * 1024

_PATHS: dict[str, Api] = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}


class SimServer:
    """An OpenAI- and Anthropic-compatible chat server on loopback, for tests.

    Args:
        latency: seconds before a reply starts (time to first token).
        per_token: seconds per output token, added to the latency. A stream sends word
            *i* at ``latency + i * per_token`` (so the first token comes at
            ``latency + per_token`` and the last when a plain reply would).
        jitter: up to this many seconds added to each latency, drawn uniformly from a
            generator seeded with ``seed``.
        seed: seed of the jitter and of the fault draws.
        rpm: requests per minute (a token bucket, as the hosted APIs do); None: no limit.
        tpm: tokens (input + output) per minute; None: no limit.
        period: the window of ``rpm`` and ``tpm`` in seconds (60: per minute). A
            shorter one makes real-time tests of rate limits quick (``rpm=20,
            period=1.0``: 20 requests per second, a burst of 20).
        max_in_flight: requests handled at once beyond which the server answers 429.
        arrival_jitter: up to this many seconds (uniform, seeded) between a request's
            arrival and its check against ``rpm``/``tpm``: the network and the client's
            event loop running late, so a client paced exactly at the limit meets an
            empty bucket now and then, as it would at a hosted API.
        connect_delay: seconds by which the first request on each new connection reaches
            the limits late (the TCP and TLS handshakes to a distant API). A client's
            first burst opens many connections at once and lands late on a full bucket,
            whose refill meanwhile is lost; requests on warm connections then catch up.
        rate_headers: send the rate-limit headers (``x-ratelimit-*`` /
            ``anthropic-ratelimit-*``) with ``rpm``/``tpm``; False for a server that
            only answers 429 (many gateways).
        retry_after: send a Retry-After with the limits' 429s; False for a server that
            says nothing but 429 (nginx's ``limit_req``).
        reply: the reply text: a string, ``{regex: text}`` matched on the prompt (first
            match wins; unmatched prompts get the echo), or ``fn(SimRequest) -> str``.
            Default: ``"echo: <prompt>"``. ``max_tokens`` and stop sequences apply.
        faults: ``{kind: probability}`` drawn per request from the seeded generator;
            kinds are in :data:`FAULTS`: ``"500"``, ``"503"``, ``"529"``, ``"429"``,
            ``"quota"`` (a 429 saying the quota is spent), ``"hang"`` (never answer),
            ``"reset"`` (reset the connection), ``"malformed"`` (a 200 that is not
            JSON; in a stream, an event that is not JSON), ``"slow_stream"`` (the body
            trickles, ``slow_delay`` per chunk).
        fault_on: faults scripted by request: ``{regex: kind}`` for every prompt that
            matches, ``{regex: [kind, kind]}`` for the first matches only (then normal
            replies), or ``fn(SimRequest) -> kind | None``.
        slow_delay: seconds between chunks of a ``slow_stream`` fault.
        api_key: when set, requests must carry it (``Authorization: Bearer`` or
            ``x-api-key``) or get 401. The message echoes the wrong key, harsher than
            the hosted APIs, so clients' redaction gets tested (see ``echo_key``).
        echo_key: how a 401 echoes the wrong key: ``"json"`` (the API's JSON error,
            the key in full), ``"text"`` (a plain-text body, as a proxy might send,
            with the key starting at byte 290, so a client that cuts the body at 300
            bytes before redacting keeps its first 10 characters) or ``"partial"`` (the
            JSON error with a cut key, its first and last 12 characters around
            asterisks, as some APIs print keys: a redaction of the whole key misses it).
        models: when set, other model names get 404.
        keep_requests: record every request in ``server.requests`` (turn off for long
            runs: the list grows with every request).
        batches: how the batch endpoints (OpenAI's Batch API, Anthropic's Message
            Batches) behave: processing time, expiry, cancellation, limits
            (:class:`SimBatches`; default ``SimBatches()``, 1 s per batch). Faults apply
            per batched request as well.
        prompt_cache: model the providers' prompt caches (True, or a :class:`SimCache`
            for its TTL and minimum): a prefix is readable once the prefill of a request
            carrying it ends (its ``latency``), OpenAI's automatically from 1,024 tokens
            in steps of 128, Anthropic's at ``cache_control`` breakpoints; replies report
            the cache in their usage, as the APIs do. Off by default.
        host: the address to listen on (loopback by default).
        port: the port (0: any free port).

    Use as ``async with SimServer() as server:`` on the current event loop, or as
    ``with SimServer() as server:`` from sync code (a background thread runs it).
    ``server.url`` is the base URL to give clients (``.../v1``).
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        per_token: float = 0.0,
        jitter: float = 0.0,
        seed: int = 0,
        rpm: int | None = None,
        tpm: int | None = None,
        max_in_flight: int | None = None,
        period: float = 60.0,
        arrival_jitter: float = 0.0,
        connect_delay: float = 0.0,
        rate_headers: bool = True,
        retry_after: bool = True,
        reply: ReplySpec | None = None,
        faults: Mapping[str, float] | None = None,
        fault_on: FaultSpec | None = None,
        slow_delay: float = 1.0,
        api_key: str | None = None,
        echo_key: EchoKey = "json",
        models: Sequence[str] | None = None,
        keep_requests: bool = True,
        batches: SimBatches | None = None,
        prompt_cache: bool | SimCache = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        for name, value in (
            ("latency", latency),
            ("per_token", per_token),
            ("jitter", jitter),
            ("arrival_jitter", arrival_jitter),
            ("connect_delay", connect_delay),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        self.seed = seed
        self.host = host
        self.port = port
        self._counters = Counters(keep_prompts=keep_requests)
        late = (arrival_jitter, connect_delay)
        self._limiter = Limiter(
            rpm, tpm, max_in_flight, period, late, rate_headers, seed, retry_after
        )
        cache = SimCache() if prompt_cache is True else prompt_cache or None
        self._chat = ChatDesk(
            timing=Timing(latency, per_token, jitter, slow_delay),
            reply=reply,
            api_key=api_key,
            echo_key=echo_key,
            models=models,
            keep_requests=keep_requests,
            counters=self._counters,
            limiter=self._limiter,
            faults=Faults(faults or {}, fault_on, seed),
            cache=PromptCache(cache) if cache is not None else None,
        )
        self.batch_config = batches if batches is not None else SimBatches()
        self._desk = BatchDesk(self._chat, self.batch_config, lambda: self.root)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.ServerRunner | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"fanflow.testing.SimServer(url={self.url if self._runner else None!r})"

    @property
    def requests(self) -> list[SimRequest]:
        """Every chat request received since start or the last reset, in order (with
        ``keep_requests`` on; else empty)."""
        return self._chat.requests

    # -- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL for clients, e.g. ``http://127.0.0.1:54321/v1``."""
        if self._runner is None:
            raise RuntimeError("SimServer is not running; use `async with SimServer() as s:`")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root(self) -> str:
        """The server's root URL (``/stats`` lives there)."""
        return self.url[: -len("/v1")]

    async def start(self) -> None:
        """Start listening on the running event loop."""
        if self._runner is not None:
            raise RuntimeError("SimServer is already running")
        self._loop = loop = asyncio.get_running_loop()
        self._restart(loop.time())

        def make_request(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> web.BaseRequest:
            # Batch files and bodies are up to 256 MB; aiohttp's default cap is 1 MB.
            assert loop is not None
            return web.BaseRequest(
                message, payload, protocol, writer, task, loop, client_max_size=_MAX_BODY
            )

        server = web.Server(
            self._handle, handler_cancellation=True, access_log=None, request_factory=make_request
        )
        runner = web.ServerRunner(server, shutdown_timeout=0.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=1024, reuse_address=True)
        await site.start()
        sockets = runner.addresses
        self.port = int(sockets[0][1])
        self._runner = runner

    async def aclose(self) -> None:
        """Stop the server: hung requests are released and connections closed."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._chat.faults.release()
        await runner.cleanup()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> SimServer:
        """Run the server on an event loop in a background thread (for sync code)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._thread_stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                await self._thread_stop.wait()
            finally:
                await self.aclose()

        self._thread = threading.Thread(
            target=asyncio.run, args=(serve(),), name="fanflow-simserver", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        loop, stop, thread = self._loop, self._thread_stop, self._thread
        if loop is not None and stop is not None and thread is not None:
            loop.call_soon_threadsafe(stop.set)
            thread.join()
        self._thread = None

    # -- stats ------------------------------------------------------------------------

    def _restart(self, now: float) -> None:
        """Counters, recorded requests, buckets, the cache and fault draws from ``now``."""
        self._counters.clear(now)
        self._chat.requests = []
        self._chat.faults.reset()
        self._limiter.reset(now)
        if self._chat.cache is not None:
            self._chat.cache.clear()

    def set_batches(self, config: SimBatches) -> None:
        """Change how the batch endpoints behave from now on (batches already created
        follow the new processing time, measured from their creation)."""
        self.batch_config = config
        self._desk.config = config

    def reset(self) -> None:
        """Clear counters, recorded requests, buckets and scripted fault sequences."""
        self._restart(self._loop.time() if self._loop is not None else 0.0)
        self._desk.reset()

    def stats(self) -> SimStats:
        """A snapshot of the counters."""
        return self._counters.snapshot()

    # -- routing ----------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        api = _PATHS.get(request.path)
        if api is not None and request.method == "POST":
            return await self._chat.handle(api, request)
        if request.path == "/stats" and request.method == "GET":
            return web.json_response(self.stats().as_json())
        if request.path == "/stats/reset" and request.method == "POST":
            self.reset()
            return web.json_response({"ok": True})
        if self._desk.handles(request.path):
            return await self._desk.handle(request)
        return web.json_response(
            {"error": {"message": f"no route {request.method} {request.path}", "type": "none"}},
            status=404,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Run SimServer in the foreground: ``python -m fanflow.testing.sim --port 8000``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="fanflow sim", description="An OpenAI/Anthropic-compatible test server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before a reply")
    parser.add_argument("--per-token", type=float, default=0.0, help="seconds per token")
    parser.add_argument("--jitter", type=float, default=0.0, help="max extra seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--tpm", type=int, default=None)
    parser.add_argument("--max-in-flight", type=int, default=None)
    parser.add_argument(
        "--period", type=float, default=60.0, help="seconds of --rpm/--tpm (default 60)"
    )
    parser.add_argument(
        "--batch-time", type=float, default=1.0, help="seconds a batch takes (default 1)"
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=P",
        help=f"fault probability, e.g. 500=0.01 (kinds: {', '.join(FAULTS)})",
    )
    args = parser.parse_args(argv)
    faults = {}
    for spec in args.fault:
        kind, _, p = spec.partition("=")
        faults[kind] = float(p)
    server = SimServer(
        host=args.host,
        port=args.port,
        latency=args.latency,
        per_token=args.per_token,
        jitter=args.jitter,
        seed=args.seed,
        rpm=args.rpm,
        tpm=args.tpm,
        max_in_flight=args.max_in_flight,
        period=args.period,
        faults=faults,
        keep_requests=False,
        batches=SimBatches(time=args.batch_time),
    )

    async def serve() -> None:
        async with server:
            print(json.dumps({"url": server.url}), flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
