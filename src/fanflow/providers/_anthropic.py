"""The Anthropic Messages API over HTTP.

Wire translation only. What this API requires, and how a :class:`fanflow.Request` maps
onto it: system messages go to the top-level ``system`` field; ``max_tokens`` is
mandatory (the handle's default, else :data:`DEFAULT_MAX_TOKENS`); ``stop`` becomes
``stop_sequences``; ``seed`` and ``response_format`` have no Messages API equivalent and
are not sent.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any, ClassVar

from .._exceptions import ContentFiltered
from .._limits import Limits
from .._promptcache import CONSTANT_CHARS, minimum_tokens
from .._retry import RetryPolicy
from .._tokens import estimate_tokens
from .._transport import Transport
from .._types import RateLimitState, Request, Response, Usage
from .._util import given
from ._batchapi import AnthropicBatches, BatchAPI
from ._http import HttpLLM, StreamText, endpoint, protocol_error, wall_clock
from ._ratelimit import parse_anthropic
from ._written import check_translatable

__all__ = ["DEFAULT_MAX_TOKENS", "AnthropicLLM", "anthropic"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
#: ``max_tokens`` sent when neither the request nor the handle sets one (the API needs it).
DEFAULT_MAX_TOKENS = 1024


class AnthropicLLM(HttpLLM):
    """A handle on the Anthropic Messages API. Make one with :func:`fanflow.anthropic`."""

    provider: ClassVar[str] = "anthropic"
    request_id_header: ClassVar[str | None] = "request-id"
    hosted: ClassVar[str | None] = DEFAULT_BASE_URL

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None,
        extra_body: Mapping[str, Any] | None = None,
        cache_control: bool = True,
        **kwargs: Any,
    ) -> None:
        base = base_url.rstrip("/").removesuffix("/v1")
        super().__init__(model, base_url=base, api_key=api_key, **kwargs)
        self.extra_body = dict(extra_body or {})
        #: Place ``cache_control`` breakpoints on the constant part of the prompt.
        self.cache_control = cache_control
        self.url = f"{self.base_url}/v1/messages"

    def cache_identity(self) -> dict[str, Any]:
        identity = super().cache_identity()
        return {**identity, "api_version": API_VERSION, "extra_body": self.extra_body}

    def batches(self) -> BatchAPI:
        """This handle's batch endpoints (used by ``mode="batch"``)."""
        return AnthropicBatches(self)

    def auth_headers(self) -> dict[str, str]:
        out = {"anthropic-version": API_VERSION}
        if self._secret is not None:
            out["x-api-key"] = self._secret.reveal()
        return out

    def body(self, request: Request, *, cache_ttl: str | None = None) -> dict[str, Any]:
        """The Messages API body; ``cache_ttl`` (``"1h"``) for the breakpoints placed."""
        if request.body is not None:
            check_translatable(request.body, "anthropic", "the Messages API")
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        for m in request.messages:
            if m.role == "system":
                system.append(m.content)
            else:
                role = "assistant" if m.role == "assistant" else "user"
                messages.append({"role": role, "content": m.content})
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": messages,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop is not None:
            body["stop_sequences"] = list(request.stop)
        if self.stream:
            body["stream"] = True
        if self.cache_control and not _has_blocks(self.extra_body):
            place_breakpoints(body, request, cache_ttl)
        if self.extra_body:
            body.update(self.extra_body)
        return body

    def batch_body(self, request: Request) -> dict[str, Any]:
        # A batch may take hours to run: the one-hour cache outlives it.
        return self.body(request, cache_ttl="1h")

    def rate_limits(self, headers: Mapping[str, str], observed_at: float) -> RateLimitState | None:
        return parse_anthropic(headers, observed_at, wall_clock())

    def parse(self, raw: bytes, latency: float, rate_limit: RateLimitState | None) -> Response:
        try:
            data = json.loads(raw)
            text = "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
            stop = data.get("stop_reason")
            usage = data.get("usage") or {}
            tokens = usage_of(usage)
            model = data.get("model")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise protocol_error("anthropic", f"{type(exc).__name__}: {exc}") from None
        _check_refusal(stop)
        return Response(
            text,
            usage=tokens,
            model=model,
            finish_reason=stop,
            latency=latency,
            raw=data,
            rate_limit=rate_limit,
        )

    async def read_stream(
        self, content: AsyncIterable[bytes], start: float, headers: Mapping[str, str]
    ) -> Response:
        stream = StreamText(start)
        stop: str | None = None
        model: str | None = None
        counts: dict[str, Any] = {}
        try:
            async for data in stream.events(content):
                event = json.loads(data)
                kind = event.get("type")
                if kind == "content_block_delta":
                    stream.add(event["delta"].get("text"))
                elif kind == "message_start":
                    message = event["message"]
                    model = message.get("model")
                    counts.update(message.get("usage") or {})
                elif kind == "message_delta":
                    stop = event["delta"].get("stop_reason") or stop
                    # Cumulative counts: the final output_tokens (and, on newer
                    # versions, the input and cache counts again).
                    counts.update(event.get("usage") or {})
                elif kind == "message_stop":
                    break
                elif kind == "error":
                    # An error after the 200 (e.g. overloaded mid-stream): classify its body.
                    raise self.fail(529 if _overloaded(event) else 500, {}, data, None)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise protocol_error("anthropic", f"bad stream event: {type(exc).__name__}") from None
        _check_refusal(stop)
        return stream.reply(
            usage_of(counts), model, stop, functools.partial(self.rate_limits, headers)
        )


def _has_blocks(extra: Mapping[str, Any]) -> bool:
    """Whether the user's own body fields may carry breakpoints (fanflow adds none)."""
    return bool({"system", "messages", "cache_control"} & extra.keys())


def place_breakpoints(body: dict[str, Any], request: Request, ttl: str | None) -> None:
    """Put ``cache_control`` at the end of the system prompt and of the user turn's
    constant leading text (``request.metadata``, set by a pattern's template), each
    where the prompt up to it is long enough for the model to cache (two of the API's
    four breakpoints at most). Only a template's requests: their prefix is sent again,
    while a single call's would pay the write and never read it."""
    constant = request.metadata.get(CONSTANT_CHARS)
    if constant is None:
        return
    minimum = minimum_tokens("anthropic", body["model"])
    control: dict[str, str] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    system = body.get("system")
    length = estimate_tokens(system) if isinstance(system, str) else 0
    if isinstance(system, str) and length >= minimum:
        body["system"] = [{"type": "text", "text": system, "cache_control": control}]
    messages = body["messages"]
    first = messages[0] if messages else None
    if not constant or first is None or first["role"] != "user":
        return
    text: str = first["content"]
    head, rest = text[:constant], text[constant:]
    if length + estimate_tokens(head) < minimum:
        return
    blocks: list[dict[str, Any]] = [{"type": "text", "text": head, "cache_control": control}]
    if rest:
        blocks.append({"type": "text", "text": rest})
    first["content"] = blocks


def usage_of(usage: Mapping[str, Any]) -> Usage:
    """The API's ``usage``, where ``input_tokens`` excludes the tokens read from the
    prompt cache and those written to it: fanflow's ``input_tokens`` is all three
    (``cache_creation``, where sent, says how many writes were for an hour)."""
    read = usage.get("cache_read_input_tokens") or 0
    written = usage.get("cache_creation_input_tokens") or 0
    # Newer versions split the writes by TTL; an hour's are priced apart.
    split = usage.get("cache_creation")
    hour = (split.get("ephemeral_1h_input_tokens") or 0) if isinstance(split, Mapping) else 0
    return Usage(
        (usage.get("input_tokens") or 0) + read + written,
        usage.get("output_tokens") or 0,
        cached_input_tokens=read,
        cache_write_input_tokens=written,
        cache_write_1h_input_tokens=min(hour, written),
    )


def _overloaded(event: Mapping[str, Any]) -> bool:
    error = event.get("error")
    return isinstance(error, Mapping) and error.get("type") == "overloaded_error"


def _check_refusal(stop: str | None) -> None:
    if stop == "refusal":
        raise ContentFiltered(
            "anthropic: the model refused to answer (stop_reason=refusal)", status_code=200
        )


def anthropic(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | None = 600.0,
    retry: RetryPolicy | None = None,
    limits: Limits | Mapping[str, Limits] | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] | None = None,
    top_p: float | None = None,
    stream: bool = False,
    headers: Mapping[str, str] | None = None,
    extra_body: Mapping[str, Any] | None = None,
    connect_timeout: float | None = 10.0,
    transport: Transport | None = None,
    cache_control: bool = True,
) -> AnthropicLLM:
    """A handle on the Anthropic Messages API.

    Args:
        model: the model name, e.g. ``"claude-sonnet-4-5"``.
        base_url: the API's base URL (default: ``$ANTHROPIC_BASE_URL``, else Anthropic's).
        api_key: the key (default: ``$ANTHROPIC_API_KEY``); required for Anthropic's own
            endpoint. Never logged or shown.
        timeout: seconds per attempt (None: no limit).
        retry: the retry policy (default: :class:`fanflow.RetryPolicy` ()).
        limits: the handle's limits, shared by every pattern using it; or a mapping
            of model name to limits for the models its requests name (``"*"``: the rest).
        temperature, max_tokens, stop, top_p: request defaults, used when a request leaves
            them unset. ``max_tokens`` falls back to :data:`DEFAULT_MAX_TOKENS`, since the
            API requires one.
        stream: stream the reply and record the time to first token.
        headers: extra HTTP headers for every request (e.g. ``anthropic-beta``).
        extra_body: extra JSON fields for every request.
        connect_timeout: seconds to establish a connection.
        transport: sends the requests (default: aiohttp's connection pool); tests pass
            :class:`fanflow.testing.MockTransport` to answer without a server.
        cache_control: place prompt-cache breakpoints (``cache_control``) on the
            requests of a template (``map``, ``as_completed``) at the end of the system
            prompt and of the template's constant leading text, where the prompt up to
            them is long enough for the model to cache (1-hour TTL in batch mode);
            False places none. Never when ``extra_body`` sets ``system``,
            ``messages`` or ``cache_control`` (yours are kept as they are).

    Returns:
        The handle; close it with ``await llm.aclose()`` (or ``async with``).

    Raises:
        ConfigError: no API key for Anthropic's own endpoint.
    """
    base, key = endpoint("Anthropic", "ANTHROPIC", base_url, api_key, DEFAULT_BASE_URL, "/v1")
    defaults = given(temperature=temperature, max_tokens=max_tokens, stop=stop, top_p=top_p)
    return AnthropicLLM(
        model,
        base_url=base,
        api_key=key,
        extra_body=extra_body,
        cache_control=cache_control,
        stream=stream,
        headers=headers,
        connect_timeout=connect_timeout,
        transport=transport,
        limits=limits,
        retry=retry,
        timeout=timeout,
        defaults=defaults,
    )
