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
a client can tell the model's time from a queue's (decision 0170).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from aiohttp import web

from ._simbatch import BatchDesk, SimBatches
from ._simcache import PromptCache, SimCache
from ._simhttp import _Gone, _reset
from ._simwire import (
    Api,
    BucketView,
    Completion,
    SimRequest,
    WireError,
    anthropic_body,
    anthropic_chunks,
    complete,
    error_body,
    limit_headers,
    openai_body,
    openai_chunks,
    parse_request,
    retry_headers,
)

__all__ = ["FAULTS", "SimBatches", "SimCache", "SimSecond", "SimServer", "SimStats"]

FaultKind: TypeAlias = Literal[
    "500", "503", "529", "429", "quota", "hang", "reset", "malformed", "slow_stream"
]
#: Every fault SimServer can inject, in the order a seeded draw walks them.
FAULTS: tuple[str, ...] = (
    "500",
    "503",
    "529",
    "429",
    "quota",
    "hang",
    "reset",
    "malformed",
    "slow_stream",
)

EchoKey: TypeAlias = Literal["json", "text", "partial"]
ReplySpec: TypeAlias = "str | Mapping[str, str] | Callable[[SimRequest], str]"
FaultSpec: TypeAlias = (
    "Mapping[str, FaultKind | Sequence[FaultKind]] | Callable[[SimRequest], FaultKind | None]"
)

#: The largest request body SimServer reads (a batch body or file at the APIs' limit).
_MAX_BODY = 300 * 1024 * 1024

_PATHS: dict[str, Api] = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}


def _echo(request: SimRequest) -> str:
    return f"echo: {request.prompt}"


@dataclass(slots=True)
class _Bucket:
    """A continuously refilling token bucket (capacity ``limit``, refill ``limit`` per
    ``period`` seconds)."""

    limit: int
    level: float
    at: float
    period: float = 60.0

    def refill(self, now: float) -> None:
        rate = self.limit / self.period
        self.level = min(float(self.limit), self.level + (now - self.at) * rate)
        self.at = now

    def wait_for(self, amount: int) -> float:
        """Seconds until ``amount`` is available (0 if it is now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / (self.limit / self.period)

    def view(self) -> BucketView:
        reset = (self.limit - self.level) / (self.limit / self.period)
        return BucketView(self.limit, max(0, int(self.level)), reset)


@dataclass(frozen=True, slots=True)
class SimSecond:
    """What SimServer saw during one second (since start or the last reset).

    Attributes:
        second: whole seconds since the server started (or was reset).
        requests: chat requests that arrived.
        admitted: requests that passed the limits (in flight, RPM, TPM).
        rate_limited: requests refused with 429 by those limits (injected 429s excluded).
        tokens: input + output tokens charged to the TPM bucket.
        completed: successful replies whose last byte was sent in this second.
    """

    second: int
    requests: int = 0
    admitted: int = 0
    rate_limited: int = 0
    tokens: int = 0
    completed: int = 0


@dataclass(frozen=True, slots=True)
class SimStats:
    """A snapshot of SimServer's counters (``server.stats()`` or ``GET /stats``).

    Attributes:
        requests: chat requests received.
        responses: responses sent, by HTTP status (resets and hangs send none).
        in_flight: requests being handled now.
        max_in_flight: the most handled at once.
        tokens_in: input tokens of admitted requests.
        tokens_out: output tokens of admitted requests.
        disconnects: requests whose client went away before the reply was complete.
        faults: injected faults by kind.
        timeline: one entry per second with any activity, in order.
        prompt_requests: requests received per prompt (the last user message), with
            ``keep_requests`` on (else empty).
        prompt_completed: replies sent in full per prompt (a 200 written to the end),
            with ``keep_requests`` on: a test can prove that no answered prompt was
            asked again (batch results count here too).
        batches: batches created (OpenAI and Anthropic).
        batch_requests: requests submitted in batches.
        batch_cancels: batches whose cancellation was asked for.
        batch_prompts: requests submitted in batches per prompt: a test can prove that
            no item was submitted twice.
        cache_hits: admitted requests that read a prefix from the prompt cache
            (``prompt_cache`` on).
        cache_misses: admitted requests long enough to cache that read nothing from it.
        cached_tokens: input tokens read from the prompt cache.
        cache_write_tokens: input tokens written to it (reported by Anthropic's API).
        cache_write_1h_tokens: of ``cache_write_tokens``, those written at ``"ttl": "1h"``
            breakpoints (Anthropic's ``cache_creation.ephemeral_1h_input_tokens``).
    """

    requests: int
    responses: Mapping[int, int]
    in_flight: int
    max_in_flight: int
    tokens_in: int
    tokens_out: int
    disconnects: int
    faults: Mapping[str, int]
    timeline: tuple[SimSecond, ...] = field(repr=False)
    prompt_requests: Mapping[str, int] = field(default_factory=dict, repr=False)
    prompt_completed: Mapping[str, int] = field(default_factory=dict, repr=False)
    batches: int = 0
    batch_requests: int = 0
    batch_cancels: int = 0
    batch_prompts: Mapping[str, int] = field(default_factory=dict, repr=False)
    cache_hits: int = 0
    cache_misses: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "disconnects": self.disconnects,
            "faults": dict(self.faults),
            "timeline": [
                {
                    "second": s.second,
                    "requests": s.requests,
                    "admitted": s.admitted,
                    "rate_limited": s.rate_limited,
                    "tokens": s.tokens,
                    "completed": s.completed,
                }
                for s in self.timeline
            ],
            "prompt_requests": dict(self.prompt_requests),
            "prompt_completed": dict(self.prompt_completed),
            "batches": self.batches,
            "batch_requests": self.batch_requests,
            "batch_cancels": self.batch_cancels,
            "batch_prompts": dict(self.batch_prompts),
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cache_write_1h_tokens": self.cache_write_1h_tokens,
        }


class _Counters:
    __slots__ = (
        "cache_hits",
        "cache_misses",
        "cache_write_1h_tokens",
        "cache_write_tokens",
        "cached_tokens",
        "disconnects",
        "faults",
        "in_flight",
        "max_in_flight",
        "prompt_completed",
        "prompt_requests",
        "requests",
        "responses",
        "timeline",
        "tokens_in",
        "tokens_out",
    )

    def __init__(self) -> None:
        self.cache_hits = self.cache_misses = self.cached_tokens = 0
        self.cache_write_tokens = self.cache_write_1h_tokens = 0
        self.requests = 0
        self.responses: dict[int, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.disconnects = 0
        self.faults: dict[str, int] = {}
        self.timeline: dict[int, list[int]] = {}  # second -> [req, adm, 429, tok, done]
        self.prompt_requests: dict[str, int] = {}
        self.prompt_completed: dict[str, int] = {}


@dataclass(frozen=True, slots=True)
class _Reply:
    """What an admitted chat request is answered with."""

    api: Api
    sim: SimRequest
    done: Completion
    ident: str
    fault: FaultKind | None
    headers: list[tuple[str, str]]


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
            only answers 429 (nginx's ``limit_req``, many gateways).
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
        for name, limit in (("rpm", rpm), ("tpm", tpm), ("max_in_flight", max_in_flight)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1, got {limit}; use None for no limit")
        self.latency = latency
        self.per_token = per_token
        self.jitter = jitter
        self.seed = seed
        self.rpm = rpm
        self.tpm = tpm
        self.max_in_flight = max_in_flight
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, got {period}")
        self.period = period
        self.arrival_jitter = arrival_jitter
        self.connect_delay = connect_delay
        self.rate_headers = rate_headers
        # Connections seen (by their handler, kept so that an id is never reused).
        self._connections: dict[int, object] = {}
        self._arrival_rng = random.Random(seed + 1)  # apart from the fault draws
        self.slow_delay = slow_delay
        self.models = frozenset(models) if models is not None else None
        self._api_key = api_key
        if echo_key not in ("json", "text", "partial"):
            raise ValueError(f"echo_key must be 'json', 'text' or 'partial', got {echo_key!r}")
        self.echo_key = echo_key
        self.keep_requests = keep_requests
        self._reply = self._make_reply(reply)
        self._fault_rates = self._check_rates(faults or {})
        self._fault_on = fault_on
        self._fault_seq: dict[str, list[FaultKind]] = {}
        self._fault_rx: list[tuple[re.Pattern[str], FaultKind | None, str]] = []
        if isinstance(fault_on, Mapping):
            for pattern, kind in fault_on.items():
                if isinstance(kind, str):
                    self._check_kind(kind)
                    self._fault_rx.append((re.compile(pattern), kind, pattern))
                else:
                    kinds = list(kind)
                    for k in kinds:
                        self._check_kind(k)
                    self._fault_seq[pattern] = kinds
                    self._fault_rx.append((re.compile(pattern), None, pattern))
        self._fault_seq_init = {k: list(v) for k, v in self._fault_seq.items()}
        self.host = host
        self.port = port
        self.requests: list[SimRequest] = []
        self._c = _Counters()
        self._rng = random.Random(seed)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._req_bucket: _Bucket | None = None
        self._tok_bucket: _Bucket | None = None
        self._runner: web.ServerRunner | None = None
        self._hangs: set[asyncio.Future[None]] = set()
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None
        self.batch_config = batches if batches is not None else SimBatches()
        self._desk = BatchDesk(self, self.batch_config)
        cache = SimCache() if prompt_cache is True else prompt_cache or None
        self._cache = PromptCache(cache) if cache is not None else None

    # -- configuration helpers --------------------------------------------------------

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(FAULTS)}")

    def _check_rates(self, rates: Mapping[str, float]) -> list[tuple[float, FaultKind]]:
        out: list[tuple[float, FaultKind]] = []
        total = 0.0
        for kind in FAULTS:  # a fixed order, so the draws are reproducible
            p = rates.get(kind, 0.0)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"fault probability for {kind!r} must be in [0, 1], got {p}")
            if p:
                total += p
                out.append((total, kind))  # type: ignore[arg-type]
        for kind in rates:
            self._check_kind(kind)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities add up to {total:g}, more than 1")
        return out

    @staticmethod
    def _make_reply(reply: ReplySpec | None) -> Callable[[SimRequest], str]:
        if reply is None:
            return _echo
        if isinstance(reply, str):
            text = reply
            return lambda _r: text
        if isinstance(reply, Mapping):
            rules = [(re.compile(p), t) for p, t in reply.items()]

            def by_regex(request: SimRequest) -> str:
                prompt = request.prompt
                for rx, text in rules:
                    if rx.search(prompt):
                        return text
                return _echo(request)

            return by_regex
        return reply

    def __repr__(self) -> str:
        return f"fanflow.testing.SimServer(url={self.url if self._runner else None!r})"

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
        self._loop = asyncio.get_running_loop()
        self._reset_state()
        loop = self._loop

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
        for fut in list(self._hangs):
            if not fut.done():
                fut.set_result(None)
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

    def _reset_state(self) -> None:
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        self._t0 = now
        self._c = _Counters()
        if self._cache is not None:
            self._cache.clear()
        self.requests = []
        self._rng = random.Random(self.seed)
        self._fault_seq = {k: list(v) for k, v in self._fault_seq_init.items()}
        period = self.period
        self._req_bucket = _Bucket(self.rpm, float(self.rpm), now, period) if self.rpm else None
        self._tok_bucket = _Bucket(self.tpm, float(self.tpm), now, period) if self.tpm else None

    def set_batches(self, config: SimBatches) -> None:
        """Change how the batch endpoints behave from now on (batches already created
        follow the new processing time, measured from their creation)."""
        self.batch_config = config
        self._desk.config = config

    def reset(self) -> None:
        """Clear counters, recorded requests, buckets and scripted fault sequences."""
        in_flight = self._c.in_flight
        self._reset_state()
        self._c.in_flight = in_flight
        self._desk.reset_counts()

    def stats(self) -> SimStats:
        """A snapshot of the counters."""
        c = self._c
        timeline = tuple(SimSecond(s, *c.timeline[s]) for s in sorted(c.timeline))
        return SimStats(
            requests=c.requests,
            responses=dict(c.responses),
            in_flight=c.in_flight,
            max_in_flight=c.max_in_flight,
            tokens_in=c.tokens_in,
            tokens_out=c.tokens_out,
            disconnects=c.disconnects,
            faults=dict(c.faults),
            timeline=timeline,
            prompt_requests=dict(c.prompt_requests),
            prompt_completed=dict(c.prompt_completed),
            batches=self._desk.created,
            batch_requests=self._desk.lines_submitted,
            batch_cancels=self._desk.cancels,
            batch_prompts=dict(self._desk.prompt_submissions),
            cache_hits=c.cache_hits,
            cache_misses=c.cache_misses,
            cached_tokens=c.cached_tokens,
            cache_write_tokens=c.cache_write_tokens,
            cache_write_1h_tokens=c.cache_write_1h_tokens,
        )

    def _second(self, now: float) -> list[int]:
        s = int(now - self._t0)
        row = self._c.timeline.get(s)
        if row is None:
            row = self._c.timeline[s] = [0, 0, 0, 0, 0]
        return row

    # -- request handling -------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        api = _PATHS.get(request.path)
        if api is None or request.method != "POST":
            return await self._other(request)
        c = self._c
        c.requests += 1
        c.in_flight += 1
        if c.in_flight > c.max_in_flight:
            c.max_in_flight = c.in_flight
        try:
            response = await self._chat(api, request)
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            c.disconnects += 1
            raise
        finally:
            c.in_flight -= 1
        if isinstance(response, _Gone):
            if response.by_client:
                c.disconnects += 1
        else:
            c.responses[response.status] = c.responses.get(response.status, 0) + 1
        return response

    async def _other(self, request: web.BaseRequest) -> web.StreamResponse:
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

    def _error(
        self,
        api: Api,
        status: int,
        message: str,
        kind: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> web.Response:
        response = web.Response(
            status=status,
            body=error_body(api, status, message, kind),
            content_type="application/json",
        )
        for k, v in headers or ():
            response.headers[k] = v
        return response

    def _unauthorised(self, api: Api, key: str) -> web.Response:
        """The 401 for a wrong key, echoing it as ``echo_key`` says."""
        if self.echo_key == "text":
            head = "401 Unauthorized: the API key below is not valid. ".ljust(290, ".")
            text = f"{head}{key}\nCheck the key and try again.\n"
            return web.Response(status=401, text=text, content_type="text/plain")
        if self.echo_key == "partial" and len(key) > 24:
            key = f"{key[:12]}{'*' * (len(key) - 24)}{key[-12:]}"
        return self._error(api, 401, f"Incorrect API key provided: {key}. Check your API key.")

    def _authorised(self, api: Api, request: web.BaseRequest) -> str | None:
        """None if the key is right, else the key that was sent (possibly empty)."""
        if self._api_key is None:
            return None
        if api == "openai":
            sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        else:
            sent = request.headers.get("x-api-key", "")
        return None if sent == self._api_key else sent

    async def _chat(self, api: Api, request: web.BaseRequest) -> web.StreamResponse:
        """One chat request: checked, limited, faulted, then answered after its latency."""
        loop = self._loop
        assert loop is not None
        now = loop.time()
        row = self._second(now)
        row[0] += 1
        sim = await self._read(api, request, now)
        if not isinstance(sim, SimRequest):
            return sim  # refused before any limit: a wrong key, a bad body, no such model
        done = complete(sim, self._reply(sim))
        now = await self._arrive(request, now)
        # ---- limits: in flight, then requests, then tokens (nothing charged on a 429)
        limited = self._limit(api, sim, done.input_tokens + done.output_tokens, now)
        if limited is not None:
            row[2] += 1
            return limited
        headers = self._limit_headers(api)
        row[1] += 1
        row[3] += done.input_tokens + done.output_tokens
        self._c.tokens_in += done.input_tokens
        self._c.tokens_out += done.output_tokens
        # ---- faults
        fault = self._draw_fault(sim)
        if fault is not None:
            self._c.faults[fault] = self._c.faults.get(fault, 0) + 1
            early = await self._fault(api, fault, request, headers)
            if early is not None:
                return early
        # ---- latency and reply
        delay = self.latency + (self._rng.uniform(0.0, self.jitter) if self.jitter else 0.0)
        if self._cache is not None:
            done = self._cached(sim, done, now, now + delay)
        reply = _Reply(api, sim, done, f"sim{next(self._ids)}", fault, headers)
        if sim.stream:
            return await self._answer_stream(request, reply, delay)
        return await self._answer(request, reply, delay)

    async def _read(
        self, api: Api, request: web.BaseRequest, now: float
    ) -> SimRequest | web.StreamResponse:
        """The request parsed, or the error answer to a wrong key, a bad body or an
        unknown model."""
        body = await request.read()
        wrong_key = self._authorised(api, request)
        if wrong_key is not None:
            return self._unauthorised(api, wrong_key)
        if api == "anthropic" and "anthropic-version" not in request.headers:
            return self._error(api, 400, "anthropic-version: header is required")
        index = self._c.requests - 1
        try:
            sim = parse_request(api, body, index, now)
        except WireError as exc:
            return self._error(api, exc.status, exc.message)
        if self.keep_requests:
            self.requests.append(sim)
            counts = self._c.prompt_requests
            counts[sim.prompt] = counts.get(sim.prompt, 0) + 1
        if self.models is not None and sim.model not in self.models:
            return self._error(
                api, 404, f"The model `{sim.model}` does not exist or you do not have access."
            )
        return sim

    async def _arrive(self, request: web.BaseRequest, now: float) -> float:
        """Wait for a new connection's set-up and the arrival jitter; the time after."""
        late = 0.0
        if self.connect_delay and id(request.protocol) not in self._connections:
            self._connections[id(request.protocol)] = request.protocol
            late = self.connect_delay
        if self.arrival_jitter:
            late += self._arrival_rng.uniform(0.0, self.arrival_jitter)
        if not late:
            return now
        await asyncio.sleep(late)
        assert self._loop is not None
        return self._loop.time()

    async def _answer_stream(
        self, request: web.BaseRequest, reply: _Reply, delay: float
    ) -> web.StreamResponse:
        """A streamed answer: the first event after ``delay``, then one word per token."""
        sim, done, fault = reply.sim, reply.done, reply.fault
        make = openai_chunks if reply.api == "openai" else anthropic_chunks
        chunks, first = make(sim, done, reply.ident)
        if fault == "slow_stream":
            gaps = [0.0] + [self.slow_delay] * (len(chunks) - 1)
        else:  # each word takes per_token: the first arrives at latency + per_token
            words = range(first, first + done.output_tokens)
            gaps = [self.per_token if i in words else 0.0 for i in range(len(chunks))]
        if fault == "malformed":  # an event whose data is not JSON
            chunks[first] = b'data: {"choices": [{"delta": \n\n'
        if delay > 0:
            await asyncio.sleep(delay)
        streamed = await self._stream(request, chunks, gaps, reply.headers, "text/event-stream")
        if not isinstance(streamed, _Gone):
            self._completed(sim)
        return streamed

    async def _answer(
        self, request: web.BaseRequest, reply: _Reply, delay: float
    ) -> web.StreamResponse:
        """A whole JSON answer after ``delay`` and the reply's tokens."""
        sim, done, fault = reply.sim, reply.done, reply.fault
        prompt_part = delay  # the rest is the reply's tokens
        delay += self.per_token * done.output_tokens
        if delay > 0:
            await asyncio.sleep(delay)
        if reply.api == "openai":  # its time on the call, as llama.cpp's server says it
            payload = openai_body(sim, done, reply.ident, (prompt_part, delay - prompt_part))
        else:
            payload = anthropic_body(sim, done, reply.ident)
        if fault == "slow_stream":
            step = max(1, len(payload) // 8)
            parts = [payload[i : i + step] for i in range(0, len(payload), step)]
            gaps = [0.0] + [self.slow_delay] * (len(parts) - 1)
            streamed = await self._stream(request, parts, gaps, reply.headers, "application/json")
            if not isinstance(streamed, _Gone):
                self._completed(sim)
            return streamed
        if fault == "malformed":
            payload = payload[: len(payload) // 2]
        assert self._loop is not None
        self._second(self._loop.time())[4] += 1
        response = web.Response(body=payload, content_type="application/json")
        for k, v in reply.headers:
            response.headers[k] = v
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:  # the client closed the connection before the reply
            return _Gone(by_client=True)
        self._completed(sim)
        return response

    def _cached(
        self, sim: SimRequest, done: Completion, now: float, prefilled: float
    ) -> Completion:
        """``done`` with its use of the prompt cache, counted."""
        assert self._cache is not None
        use = self._cache.use(sim, now, prefilled)
        done = use.applied(done)
        c = self._c
        c.cache_hits += done.cached_tokens > 0
        c.cache_misses += use.cacheable and not done.cached_tokens
        c.cached_tokens += done.cached_tokens
        c.cache_write_tokens += done.cache_write_tokens
        c.cache_write_1h_tokens += done.cache_write_1h_tokens
        return done

    def _completed(self, sim: SimRequest) -> None:
        if self.keep_requests:
            done = self._c.prompt_completed
            done[sim.prompt] = done.get(sim.prompt, 0) + 1

    async def _stream(
        self,
        request: web.BaseRequest,
        chunks: list[bytes],
        gaps: list[float],
        headers: list[tuple[str, str]],
        content_type: str,
    ) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = content_type
        for k, v in headers:
            response.headers[k] = v
        if content_type == "text/event-stream":
            response.headers["Cache-Control"] = "no-cache"
        try:
            await response.prepare(request)
            for gap, chunk in zip(gaps, chunks, strict=True):
                if gap > 0:
                    await asyncio.sleep(gap)
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:  # the client closed the connection mid-reply
            return _Gone(by_client=True)
        assert self._loop is not None
        self._second(self._loop.time())[4] += 1
        return response

    # -- limits -----------------------------------------------------------------------

    def _limit(self, api: Api, sim: SimRequest, tokens: int, now: float) -> web.Response | None:
        c = self._c
        if self.max_in_flight is not None and c.in_flight > self.max_in_flight:
            return self._error(
                api,
                429,
                f"Too many concurrent requests: limit {self.max_in_flight} in flight. "
                "Lower your concurrency.",
                headers=self._limit_headers(api) + retry_headers(api, 1.0),
            )
        rb, tb = self._req_bucket, self._tok_bucket
        if rb is not None:
            rb.refill(now)
        if tb is not None:
            tb.refill(now)
            if tokens > tb.limit:
                return self._error(
                    api,
                    429,
                    f"Request too large for {sim.model}: tokens per min (TPM): "
                    f"Limit {tb.limit}, Requested {tokens}.",
                    kind="tokens",
                    headers=self._limit_headers(api),
                )
        wait_r = rb.wait_for(1) if rb is not None else 0.0
        wait_t = tb.wait_for(tokens) if tb is not None else 0.0
        if wait_r > 0 or wait_t > 0:
            what = "requests" if wait_r >= wait_t else "tokens"
            limit = rb.limit if what == "requests" and rb else tb.limit if tb else 0
            wait = max(wait_r, wait_t)
            return self._error(
                api,
                429,
                f"Rate limit reached for {sim.model} on {what} per min: Limit {limit}. "
                f"Please try again in {wait * 1000:.0f}ms.",
                kind=what,
                headers=self._limit_headers(api) + retry_headers(api, wait),
            )
        if rb is not None:
            rb.level -= 1
        if tb is not None:
            tb.level -= tokens
        return None

    def _limit_headers(self, api: Api) -> list[tuple[str, str]]:
        rb, tb = self._req_bucket, self._tok_bucket
        if (rb is None and tb is None) or not self.rate_headers:
            return []
        return limit_headers(
            api,
            rb.view() if rb is not None else None,
            tb.view() if tb is not None else None,
            time.time(),
        )

    # -- faults -----------------------------------------------------------------------

    def _draw_fault(self, sim: SimRequest) -> FaultKind | None:
        scripted: FaultKind | None = None
        fault_on = self._fault_on
        if callable(fault_on):
            scripted = fault_on(sim)
            if scripted is not None:
                self._check_kind(scripted)
        elif self._fault_rx:
            prompt = sim.prompt
            for rx, kind, pattern in self._fault_rx:
                if rx.search(prompt):
                    if kind is not None:
                        scripted = kind
                        break
                    seq = self._fault_seq[pattern]
                    if seq:
                        scripted = seq.pop(0)
                        break
        # Draw even when scripted, so scripting one prompt does not shift the others.
        draw = self._rng.random() if self._fault_rates else 1.0
        if scripted is not None:
            return scripted
        for threshold, kind in self._fault_rates:
            if draw < threshold:
                return kind
        return None

    async def _fault(
        self,
        api: Api,
        fault: FaultKind,
        request: web.BaseRequest,
        headers: list[tuple[str, str]],
    ) -> web.StreamResponse | None:
        """Act out a fault; None for faults that shape the reply later."""
        if fault in ("500", "503"):
            msg = "The server had an error while processing your request. Sorry about that!"
            return self._error(api, int(fault), msg, headers=headers)
        if fault == "529":
            return self._error(api, 529, "Overloaded", headers=headers)
        if fault == "429":
            return self._error(
                api,
                429,
                "Rate limit reached (injected). Please try again in 1s.",
                headers=headers + retry_headers(api, 1.0),
            )
        if fault == "quota":
            msg = (
                "You exceeded your current quota, please check your plan and billing details."
                if api == "openai"
                else "You have reached your specified API usage limits."
            )
            return self._error(api, 429, msg, kind="insufficient_quota", headers=headers)
        if fault == "hang":
            assert self._loop is not None
            fut: asyncio.Future[None] = self._loop.create_future()
            self._hangs.add(fut)
            try:
                await fut  # until the server closes or the client goes away
            finally:
                self._hangs.discard(fut)
            _reset(request)
            return _Gone(by_client=False)
        if fault == "reset":
            _reset(request)
            return _Gone(by_client=False)
        return None


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
