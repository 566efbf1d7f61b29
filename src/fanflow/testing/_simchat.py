"""SimServer's chat endpoints (``/v1/chat/completions``, ``/v1/messages``): a request
read and checked, passed through the limits and the faults, then answered, whole or
streamed, after its latency."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from aiohttp import web

from ._simcache import PromptCache
from ._simfaults import FaultKind, Faults
from ._simhttp import _Gone, error_response
from ._simlimits import Limiter
from ._simstats import Counters
from ._simwire import (
    Api,
    Completion,
    SimRequest,
    WireError,
    anthropic_body,
    anthropic_chunks,
    complete,
    openai_body,
    openai_chunks,
    parse_request,
)

__all__ = ["ChatDesk", "EchoKey", "ReplySpec", "Timing"]

EchoKey: TypeAlias = Literal["json", "text", "partial"]
ReplySpec: TypeAlias = "str | Mapping[str, str] | Callable[[SimRequest], str]"


@dataclass(frozen=True, slots=True)
class _Reply:
    """What an admitted chat request is answered with."""

    api: Api
    sim: SimRequest
    done: Completion
    ident: str
    fault: FaultKind | None
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Timing:
    """How long answers take (``SimServer``'s arguments of the same names)."""

    latency: float = 0.0
    per_token: float = 0.0
    jitter: float = 0.0
    slow_delay: float = 1.0


class ChatDesk:
    """The chat endpoints of one SimServer. ``requests`` holds what it was asked, with
    ``keep_requests`` on (see ``SimServer`` for the arguments)."""

    def __init__(
        self,
        *,
        timing: Timing,
        reply: ReplySpec | None,
        api_key: str | None,
        echo_key: EchoKey,
        models: Sequence[str] | None,
        keep_requests: bool,
        counters: Counters,
        limiter: Limiter,
        faults: Faults,
        cache: PromptCache | None,
    ) -> None:
        if echo_key not in ("json", "text", "partial"):
            raise ValueError(f"echo_key must be 'json', 'text' or 'partial', got {echo_key!r}")
        self.timing = timing
        self._reply = make_reply(reply)
        self._api_key = api_key
        self._echo_key = echo_key
        self.models = frozenset(models) if models is not None else None
        self.keep_requests = keep_requests
        self.requests: list[SimRequest] = []
        self.counters = counters
        self.limiter = limiter
        self.faults = faults
        self.cache = cache
        self._ids = itertools.count()

    def reply_to(self, sim: SimRequest) -> Completion:
        """The reply to ``sim`` (its text, with its stop sequences and ``max_tokens``)."""
        return complete(sim, self._reply(sim))

    def authorised(self, api: Api, request: web.BaseRequest) -> str | None:
        """None if the key is right, else the key that was sent (possibly empty)."""
        if self._api_key is None:
            return None
        if api == "openai":
            sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        else:
            sent = request.headers.get("x-api-key", "")
        return None if sent == self._api_key else sent

    def cached(self, sim: SimRequest, done: Completion, now: float, prefilled: float) -> Completion:
        """``done`` with its use of the prompt cache, counted (the cache must be on)."""
        assert self.cache is not None
        use = self.cache.use(sim, now, prefilled)
        done = use.applied(done)
        self.counters.cache(done, use.cacheable)
        return done

    async def handle(self, api: Api, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one chat request, counting it in flight and its response."""
        c = self.counters
        c.requests += 1
        c.in_flight += 1
        c.max_in_flight = max(c.max_in_flight, c.in_flight)
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

    async def _chat(self, api: Api, request: web.BaseRequest) -> web.StreamResponse:
        """One chat request: checked, limited, faulted, then answered after its latency."""
        c = self.counters
        now = asyncio.get_running_loop().time()
        row = c.second(now)
        row[0] += 1
        sim = await self._read(api, request, now)
        if not isinstance(sim, SimRequest):
            return sim  # refused before any limit: a wrong key, a bad body, no such model
        done = self.reply_to(sim)
        now = await self.limiter.arrive(request, now)
        tokens = done.input_tokens + done.output_tokens
        limited = self.limiter.admit(api, sim, tokens, now, c.in_flight)
        if limited is not None:  # nothing is charged on a 429
            row[2] += 1
            return limited
        headers = self.limiter.headers(api)
        row[1] += 1
        row[3] += tokens
        c.tokens_in += done.input_tokens
        c.tokens_out += done.output_tokens
        fault = self.faults.draw(sim)
        if fault is not None:
            c.fault(fault)
            early = await self.faults.act(api, fault, request, headers)
            if early is not None:
                return early
        t = self.timing
        delay = t.latency + (self.faults.rng.uniform(0.0, t.jitter) if t.jitter else 0.0)
        if self.cache is not None:
            done = self.cached(sim, done, now, now + delay)
        ident = f"sim{next(self._ids)}"
        named = ("x-request-id" if api == "openai" else "request-id", f"req_{ident}")
        reply = _Reply(api, sim, done, ident, fault, [*headers, named])  # the API's id of it
        if sim.stream:
            return await self._answer_stream(request, reply, delay)
        return await self._answer(request, reply, delay)

    async def _read(
        self, api: Api, request: web.BaseRequest, now: float
    ) -> SimRequest | web.StreamResponse:
        """The request parsed, or the error answer to a wrong key, a bad body or an
        unknown model."""
        body = await request.read()
        wrong_key = self.authorised(api, request)
        if wrong_key is not None:
            return self._unauthorised(api, wrong_key)
        if api == "anthropic" and "anthropic-version" not in request.headers:
            return error_response(api, 400, "anthropic-version: header is required")
        index = self.counters.requests - 1
        try:
            sim = parse_request(api, body, index, now)
        except WireError as exc:
            return error_response(api, exc.status, exc.message)
        if self.keep_requests:
            self.requests.append(sim)
            self.counters.asked(sim)
        if self.models is not None and sim.model not in self.models:
            return error_response(
                api, 404, f"The model `{sim.model}` does not exist or you do not have access."
            )
        return sim

    def _unauthorised(self, api: Api, key: str) -> web.Response:
        """The 401 for a wrong key, echoing it as ``echo_key`` says."""
        if self._echo_key == "text":
            head = "401 Unauthorized: the API key below is not valid. ".ljust(290, ".")
            text = f"{head}{key}\nCheck the key and try again.\n"
            return web.Response(status=401, text=text, content_type="text/plain")
        if self._echo_key == "partial" and len(key) > 24:
            key = f"{key[:12]}{'*' * (len(key) - 24)}{key[-12:]}"
        return error_response(api, 401, f"Incorrect API key provided: {key}. Check your API key.")

    async def _answer_stream(
        self, request: web.BaseRequest, reply: _Reply, delay: float
    ) -> web.StreamResponse:
        """A streamed answer: the first event after ``delay``, then one word per token."""
        sim, done, fault = reply.sim, reply.done, reply.fault
        make = openai_chunks if reply.api == "openai" else anthropic_chunks
        chunks, first = make(sim, done, reply.ident)
        if fault == "slow_stream":
            gaps = [0.0] + [self.timing.slow_delay] * (len(chunks) - 1)
        else:  # each word takes per_token: the first arrives at latency + per_token
            words = range(first, first + done.output_tokens)
            gaps = [self.timing.per_token if i in words else 0.0 for i in range(len(chunks))]
        if fault == "malformed":  # an event whose data is not JSON
            chunks[first] = b'data: {"choices": [{"delta": \n\n'
        if delay > 0:
            await asyncio.sleep(delay)
        streamed = await self._stream(request, chunks, gaps, reply.headers, "text/event-stream")
        if not isinstance(streamed, _Gone):
            self.counters.completed(sim)
        return streamed

    async def _answer(
        self, request: web.BaseRequest, reply: _Reply, delay: float
    ) -> web.StreamResponse:
        """A whole JSON answer after ``delay`` and the reply's tokens."""
        sim, done, fault = reply.sim, reply.done, reply.fault
        prompt_part = delay  # the rest is the reply's tokens
        delay += self.timing.per_token * done.output_tokens
        if delay > 0:
            await asyncio.sleep(delay)
        if reply.api == "openai":  # its time on the call, as llama.cpp's server says it
            payload = openai_body(sim, done, reply.ident, (prompt_part, delay - prompt_part))
        else:
            payload = anthropic_body(sim, done, reply.ident)
        if fault == "slow_stream":
            step = max(1, len(payload) // 8)
            parts = [payload[i : i + step] for i in range(0, len(payload), step)]
            gaps = [0.0] + [self.timing.slow_delay] * (len(parts) - 1)
            streamed = await self._stream(request, parts, gaps, reply.headers, "application/json")
            if not isinstance(streamed, _Gone):
                self.counters.completed(sim)
            return streamed
        if fault == "malformed":
            payload = payload[: len(payload) // 2]
        self.counters.second(asyncio.get_running_loop().time())[4] += 1
        response = web.Response(body=payload, content_type="application/json")
        for k, v in reply.headers:
            response.headers[k] = v
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:  # the client closed the connection before the reply
            return _Gone(by_client=True)
        self.counters.completed(sim)
        return response

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
        self.counters.second(asyncio.get_running_loop().time())[4] += 1
        return response


def _echo(request: SimRequest) -> str:
    return f"echo: {request.prompt}"


def make_reply(reply: ReplySpec | None) -> Callable[[SimRequest], str]:
    """The reply function of ``SimServer(reply=...)``."""
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
