"""The OpenAI Chat Completions API (and every server that speaks it) over HTTP.

Wire translation only: Request -> JSON body, JSON (or a server-sent-event stream) ->
Response. Connections, errors and secrets are in ``_http.py``.
"""

from __future__ import annotations

import functools
import json
import math
import urllib.parse
from collections.abc import AsyncIterable, Mapping, Sequence
from typing import Any, ClassVar

from .._exceptions import ConfigError, ContentFiltered
from .._limits import Limits
from .._promptcache import TEMPLATE_KEY
from .._retry import RetryPolicy
from .._transport import Transport
from .._types import RateLimitState, Request, Response, Usage
from .._util import given
from ._batchapi import BatchAPI, OpenAIBatches
from ._http import HttpLLM, StreamText, endpoint, protocol_error
from ._ratelimit import parse_openai

__all__ = ["OpenAILLM", "openai"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAILLM(HttpLLM):
    """A handle on an OpenAI-compatible Chat Completions endpoint. Make one with
    :func:`fanflow.openai`."""

    provider: ClassVar[str] = "openai"
    request_id_header: ClassVar[str | None] = "x-request-id"
    hosted: ClassVar[str | None] = DEFAULT_BASE_URL

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None,
        n: int | None = None,
        extra_body: Mapping[str, Any] | None = None,
        api_version: str | None = None,
        prompt_cache_key: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, base_url=base_url, api_key=api_key, **kwargs)
        if prompt_cache_key is None:  # a field other servers may not know
            prompt_cache_key = self.base_url == DEFAULT_BASE_URL
        #: Send a template's ``prompt_cache_key`` (one per template).
        self.prompt_cache_key = prompt_cache_key
        if n is not None and n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if api_version is not None and not api_version.strip():
            raise ConfigError("api_version is empty; give Azure's, e.g. api_version='2024-10-21'")
        self.n = n
        self.extra_body = dict(extra_body or {})
        self.api_version = api_version
        self.url = f"{self.base_url}/chat/completions"
        if api_version is not None:
            self.url += "?" + urllib.parse.urlencode({"api-version": api_version})

    def batches(self) -> BatchAPI:
        """This handle's batch endpoints (used by ``mode="batch"``)."""
        return OpenAIBatches(self)

    def auth_headers(self) -> dict[str, str]:
        if self._secret is None:
            return {}
        if self.api_version is not None:
            # Azure OpenAI: the key goes in its own header (learn.microsoft.com, "Azure
            # OpenAI REST API reference": api-key header, api-version query parameter).
            return {"api-key": self._secret.reveal()}
        return {"Authorization": f"Bearer {self._secret.reveal()}"}

    def cache_identity(self) -> dict[str, Any]:
        return {**super().cache_identity(), "n": self.n, "extra_body": self.extra_body}

    def body(self, request: Request) -> dict[str, Any]:
        if request.body is not None:
            return self._written_body(request, request.body)
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop is not None:
            body["stop"] = list(request.stop)
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.response_format is not None:
            body["response_format"] = dict(request.response_format)
        if self.n is not None:
            body["n"] = self.n
        key = request.metadata.get(TEMPLATE_KEY)
        if key is not None and self.prompt_cache_key:
            body["prompt_cache_key"] = key  # extra_body's, if it has one, wins below
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self.extra_body:
            body.update(self.extra_body)
        return body

    def _written_body(self, request: Request, written: Mapping[str, Any]) -> dict[str, Any]:
        """A ready-made body as written; the handle's defaults only where it has none.

        Its typed fields were read from it (``fanflow.read_requests``), so those set on
        ``request`` and missing from the body are the handle's defaults. Whether to
        stream is the handle's choice, so the body's ``stream`` is not sent.
        """
        body = {k: v for k, v in written.items() if k not in ("stream", "stream_options")}
        body["model"] = request.model or self.model
        typed = {
            "temperature": request.temperature,
            "seed": request.seed,
            "stop": list(request.stop) if request.stop is not None else None,
            "top_p": request.top_p,
            "response_format": request.response_format,
            "n": self.n,
        }
        if "max_completion_tokens" not in body:
            typed["max_tokens"] = request.max_tokens
        for name, value in typed.items():
            if value is not None:
                body.setdefault(name, value)
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        for name, value in self.extra_body.items():
            body.setdefault(name, value)
        return body

    def rate_limits(self, headers: Mapping[str, str], observed_at: float) -> RateLimitState | None:
        return parse_openai(headers, observed_at)

    def parse(self, raw: bytes, latency: float, rate_limit: RateLimitState | None) -> Response:
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason")
            usage = data.get("usage") or {}
            tokens = _usage(usage)
            model = data.get("model")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise protocol_error("openai", f"{type(exc).__name__}: {exc}") from None
        _check_filter(finish)
        return Response(
            text,
            usage=tokens,
            model=model,
            finish_reason=finish,
            latency=latency,
            raw=data,
            rate_limit=rate_limit,
            service_time=generation_time(data.get("timings")),
        )

    async def read_stream(
        self, content: AsyncIterable[bytes], start: float, headers: Mapping[str, str]
    ) -> Response:
        stream = StreamText(start)
        finish: str | None = None
        model: str | None = None
        tokens = Usage()
        try:
            async for data in stream.events(content):
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    message = self.scrub(str(chunk["error"].get("message", chunk["error"])))
                    raise protocol_error("openai", f"error in stream: {message}")
                model = chunk.get("model", model)
                for choice in chunk.get("choices") or ():
                    if choice.get("index", 0) != 0:
                        continue
                    stream.add((choice.get("delta") or {}).get("content"))
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage")
                if usage:
                    tokens = _usage(usage)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise protocol_error("openai", f"bad stream event: {type(exc).__name__}") from None
        _check_filter(finish)
        return stream.reply(tokens, model, finish, functools.partial(parse_openai, headers))


def _usage(usage: Mapping[str, Any]) -> Usage:
    """The API's ``usage``: ``prompt_tokens`` includes the ``cached_tokens`` read from the
    prompt cache (OpenAI charges no cache writes)."""
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        usage.get("prompt_tokens") or 0,
        usage.get("completion_tokens") or 0,
        cached_input_tokens=details.get("cached_tokens") or 0,
    )


def _check_filter(finish: str | None) -> None:
    if finish == "content_filter":
        raise ContentFiltered(
            "openai: the content filter stopped the reply (finish_reason=content_filter)",
            status_code=200,
        )


def openai(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | None = 600.0,
    retry: RetryPolicy | None = None,
    limits: Limits | Mapping[str, Limits] | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    top_p: float | None = None,
    response_format: Mapping[str, Any] | None = None,
    n: int | None = None,
    stream: bool = False,
    headers: Mapping[str, str] | None = None,
    extra_body: Mapping[str, Any] | None = None,
    connect_timeout: float | None = 10.0,
    transport: Transport | None = None,
    api_version: str | None = None,
    prompt_cache_key: bool | None = None,
) -> OpenAILLM:
    """A handle on the OpenAI Chat Completions API, or any server that speaks it.

    Works with OpenAI and with OpenAI-compatible servers (vLLM, llama.cpp's server,
    Ollama, LM Studio, OpenRouter, ...): point ``base_url`` at them.

    Args:
        model: the model name, e.g. ``"gpt-4o-mini"``.
        base_url: the API's base URL (default: ``$OPENAI_BASE_URL``, else OpenAI's).
        api_key: the key (default: ``$OPENAI_API_KEY``). Required for OpenAI's own
            endpoint; optional for other servers. Never logged or shown.
        timeout: seconds per attempt (None: no limit).
        retry: the retry policy (default: :class:`fanflow.RetryPolicy` ()).
        limits: the handle's limits, shared by every pattern using it; or a mapping
            of model name to limits for the models its requests name (``"*"``: the rest).
        temperature, max_tokens, seed, stop, top_p, response_format: request defaults,
            used when a request leaves them unset.
        n: choices per request; ``Response.text`` is the first, all are in
            ``Response.raw``.
        stream: stream the reply (server-sent events) and record the time to first
            token in ``Response.time_to_first_token``; the text is still collected whole.
        headers: extra HTTP headers for every request.
        extra_body: extra JSON fields for every request (vendor-specific options).
        connect_timeout: seconds to establish a connection.
        transport: sends the requests (default: aiohttp's connection pool); tests pass
            :class:`fanflow.testing.MockTransport` to answer without a server.
        api_version: Azure OpenAI's API version (e.g. ``"2024-10-21"``): sent as the
            ``api-version`` query parameter, and the key then goes in the ``api-key``
            header as Azure expects. Point ``base_url`` at the deployment,
            ``https://RESOURCE.openai.azure.com/openai/deployments/DEPLOYMENT``.
        prompt_cache_key: send OpenAI's ``prompt_cache_key``, one per template of a
            map (the requests of one template share a prefix; the key keeps them on one
            cache) unless ``extra_body`` sets one. None (the default): only to OpenAI's
            own endpoint, as other servers may refuse a field they do not know.

    Returns:
        The handle; close it with ``await llm.aclose()`` (or ``async with``).

    Raises:
        ConfigError: no API key for OpenAI's own endpoint, or an invalid option.
    """
    base, key = endpoint("OpenAI", "OPENAI", base_url, api_key, DEFAULT_BASE_URL)
    defaults = given(
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        stop=stop,
        top_p=top_p,
        response_format=response_format,
    )
    return OpenAILLM(
        model,
        base_url=base,
        api_key=key,
        n=n,
        extra_body=extra_body,
        api_version=api_version,
        prompt_cache_key=prompt_cache_key,
        stream=stream,
        headers=headers,
        connect_timeout=connect_timeout,
        transport=transport,
        limits=limits,
        retry=retry,
        timeout=timeout,
        defaults=defaults,
    )


def generation_time(timings: Any) -> float | None:
    """Seconds from llama.cpp's ``timings`` (its server's reply field): the time it spent
    on the prompt and on the reply, its queue left out. None when absent or unreadable."""
    if not isinstance(timings, dict):
        return None
    try:
        ms = float(timings["prompt_ms"]) + float(timings["predicted_ms"])
    except (KeyError, TypeError, ValueError):
        return None
    return ms / 1000 if 0 <= ms < math.inf else None
