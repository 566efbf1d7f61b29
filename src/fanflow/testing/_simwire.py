"""SimServer's wire formats: request parsing and reply bodies for both APIs.

Kept apart from the server (``_sim.py``) so the shapes can be checked against the
official SDKs in one place (tests/testing/test_sim_conformance.py). The shapes follow
the public API references: OpenAI Chat Completions (``chat.completion`` objects,
``chat.completion.chunk`` server-sent events, ``{"error": {...}}`` bodies) and the
Anthropic Messages API (``message`` objects, ``message_start`` ... ``message_stop``
events, ``{"type": "error", "error": {...}}`` bodies).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["Completion", "SimRequest", "WireError", "complete", "count_tokens", "parse_request"]

Api = Literal["openai", "anthropic"]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def count_tokens(text: str) -> int:
    """SimServer's tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One chat request as SimServer saw it (API keys are not kept).

    Attributes:
        api: ``"openai"`` or ``"anthropic"``.
        index: arrival number on this server, from 0 (reset by ``reset()``).
        model: the model named in the request.
        messages: ``(role, text)`` pairs; for Anthropic the system prompt is not among them.
        system: the system prompt (Anthropic's ``system`` or OpenAI's system messages).
        max_tokens: the request's output cap, if any.
        stream: whether a server-sent-event stream was asked for.
        body: the parsed JSON body, as sent.
        at: the server loop's time (``loop.time()``) when the request arrived; in a
            test whose loop runs the server, the test's own (virtual) clock.
    """

    api: Api
    index: int
    model: str
    messages: tuple[tuple[str, str], ...]
    system: str | None
    max_tokens: int | None
    stream: bool
    body: Mapping[str, Any] = field(repr=False)
    at: float = 0.0

    @property
    def prompt(self) -> str:
        """The text of the last user message ('' if none)."""
        for role, text in reversed(self.messages):
            if role == "user":
                return text
        return ""

    @property
    def input_tokens(self) -> int:
        n = sum(count_tokens(text) for _, text in self.messages)
        return n + (count_tokens(self.system) if self.system else 0)


class WireError(Exception):
    """A request the server rejects: becomes an HTTP error in the API's own shape."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; raise :class:`WireError` if it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        raise WireError(400, "invalid_request_error", "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise WireError(400, "invalid_request_error", "the request body must be a JSON object")
    return data


def parse_request(api: Api, body: bytes, index: int, at: float = 0.0) -> SimRequest:
    """Parse and validate a chat request body; raise :class:`WireError` on bad input."""
    data = json_object(body)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise WireError(400, "invalid_request_error", "model: field required")
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise WireError(400, "invalid_request_error", "messages: a non-empty list is required")
    messages: list[tuple[str, str]] = []
    system_parts: list[str] = []
    for i, m in enumerate(raw_messages):
        if not isinstance(m, dict) or "role" not in m:
            raise WireError(400, "invalid_request_error", f"messages.{i}: role required")
        role = str(m["role"])
        text = _text_of(m.get("content"))
        if api == "anthropic" and role not in ("user", "assistant"):
            raise WireError(
                400,
                "invalid_request_error",
                f'messages.{i}.role: Input should be "user" or "assistant"; '
                "put the system prompt in the top-level system field",
            )
        if role in ("system", "developer"):
            system_parts.append(text)
        else:
            messages.append((role, text))
    max_tokens = data.get("max_tokens", data.get("max_completion_tokens"))
    if api == "anthropic":
        if "system" in data:
            system_parts.append(_text_of(data["system"]))
        if not isinstance(max_tokens, int):
            raise WireError(400, "invalid_request_error", "max_tokens: Field required")
        _check_breakpoints(data)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise WireError(400, "invalid_request_error", "max_tokens: must be an integer >= 1")
    return SimRequest(
        api=api,
        index=index,
        model=model,
        messages=tuple(messages),
        system="\n\n".join(system_parts) if system_parts else None,
        max_tokens=max_tokens,
        stream=bool(data.get("stream", False)),
        body=data,
        at=at,
    )


#: The most ``cache_control`` blocks one Anthropic request may carry.
MAX_BREAKPOINTS = 4


def _check_breakpoints(data: Mapping[str, Any]) -> None:
    contents = [data.get("system")] + [
        m.get("content") for m in data.get("messages") or () if isinstance(m, dict)
    ]
    found = sum(
        1
        for content in contents
        if isinstance(content, list)
        for block in content
        if isinstance(block, dict) and block.get("cache_control") is not None
    )
    if found > MAX_BREAKPOINTS:
        raise WireError(
            400,
            "invalid_request_error",
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {found}.",
        )


@dataclass(frozen=True, slots=True)
class Completion:
    """The reply chosen for a request, already cut to its limits; ``cached_tokens`` and
    ``cache_write_tokens`` of its ``input_tokens`` were read from / written to the
    prompt cache."""

    words: tuple[str, ...]
    finish: Literal["stop", "length", "stop_sequence"]
    stop_sequence: str | None
    input_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0  # of cache_write_tokens, at "ttl": "1h" breakpoints
    caching: bool = False  # the server models prompt caching: report its usage fields

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def output_tokens(self) -> int:
        return len(self.words)


def complete(request: SimRequest, text: str) -> Completion:
    """Apply the request's stop sequences and max_tokens to the reply ``text``."""
    finish: Literal["stop", "length", "stop_sequence"] = "stop"
    stop_hit: str | None = None
    stops = request.body.get("stop" if request.api == "openai" else "stop_sequences")
    if isinstance(stops, str):
        stops = [stops]
    if isinstance(stops, list):
        cut = len(text)
        for s in stops:
            at = text.find(s) if isinstance(s, str) and s else -1
            if 0 <= at < cut:
                cut, stop_hit = at, s
        if stop_hit is not None:
            text = text[:cut]
            finish = "stop_sequence" if request.api == "anthropic" else "stop"
    words = tuple(text.split())
    if request.max_tokens is not None and len(words) > request.max_tokens:
        words = words[: request.max_tokens]
        finish, stop_hit = "length", None
    return Completion(words, finish, stop_hit, request.input_tokens)


# --------------------------------------------------------------------------- OpenAI


def openai_body(
    request: SimRequest, c: Completion, ident: str, timings: tuple[float, float] | None = None
) -> bytes:
    """A Chat Completions reply; ``timings`` (seconds on the prompt, on the reply), when
    given, are reported as llama.cpp's server reports them (so a client can tell the
    model's time from a queue's)."""
    n = request.body.get("n") or 1
    choice = {
        "message": {"role": "assistant", "content": c.text, "refusal": None},
        "logprobs": None,
        "finish_reason": c.finish,
    }
    body = {
        "id": f"chatcmpl-{ident}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [{"index": i, **choice} for i in range(int(n))],
        "usage": _openai_usage(c, c.output_tokens * int(n)),
        "system_fingerprint": "fp_fanflow_sim",
    }
    if timings is not None:
        body["timings"] = {
            "prompt_n": c.input_tokens,
            "prompt_ms": timings[0] * 1000,
            "predicted_n": c.output_tokens * int(n),
            "predicted_ms": timings[1] * 1000,
        }
    return _dumps(body).encode()


def openai_chunks(request: SimRequest, c: Completion, ident: str) -> tuple[list[bytes], int]:
    """The SSE events of a streamed reply (role, one per word, finish, usage, [DONE]),
    and the index of the first word's event."""
    created = int(time.time())
    head = f'{{"id":"chatcmpl-{ident}","object":"chat.completion.chunk","created":{created},'
    head += f'"model":{_dumps(request.model)},"system_fingerprint":"fp_fanflow_sim",'

    def event(delta: str, finish: str | None = None) -> bytes:
        fin = "null" if finish is None else f'"{finish}"'
        choice = f'{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{fin}}}'
        return f'data: {head}"choices":[{choice}]}}\n\n'.encode()

    out = [event('{"role":"assistant","content":"","refusal":null}')]
    for i, word in enumerate(c.words):
        out.append(event(f'{{"content":{_dumps(word if i == 0 else " " + word)}}}'))
    out.append(event("{}", c.finish))
    options = request.body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        usage = f'"usage":{_dumps(_openai_usage(c, c.output_tokens))}'
        out.append(f'data: {head}"choices":[],{usage}}}\n\n'.encode())
    out.append(b"data: [DONE]\n\n")
    return out, 1


def _openai_usage(c: Completion, output_tokens: int) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": c.input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": c.input_tokens + output_tokens,
    }
    if c.caching:
        usage["prompt_tokens_details"] = {"cached_tokens": c.cached_tokens, "audio_tokens": 0}
    return usage


_OPENAI_CODES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
    529: ("server_error", None),
}


def openai_error(status: int, message: str, kind: str | None = None) -> bytes:
    etype, code = _OPENAI_CODES.get(status, ("server_error", None))
    if kind == "insufficient_quota":
        etype = code = "insufficient_quota"
    elif kind == "tokens":
        etype = "tokens"
    return _dumps(
        {"error": {"message": message, "type": etype, "param": None, "code": code}}
    ).encode()


# --------------------------------------------------------------------------- Anthropic


def _anthropic_stop(c: Completion) -> str:
    return {"stop": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}[c.finish]


def anthropic_body(request: SimRequest, c: Completion, ident: str) -> bytes:
    return _dumps(
        {
            "id": f"msg_{ident}",
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [{"type": "text", "text": c.text}],
            "stop_reason": _anthropic_stop(c),
            "stop_sequence": c.stop_sequence,
            "usage": _anthropic_usage(c, c.output_tokens),
        }
    ).encode()


def _anthropic_usage(c: Completion, output_tokens: int) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` excludes what was read from or written to
    the cache."""
    if not c.caching:
        return {"input_tokens": c.input_tokens, "output_tokens": output_tokens}
    return {
        "input_tokens": c.input_tokens - c.cached_tokens - c.cache_write_tokens,
        "cache_creation_input_tokens": c.cache_write_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": c.cache_write_tokens - c.cache_write_1h_tokens,
            "ephemeral_1h_input_tokens": c.cache_write_1h_tokens,
        },
        "cache_read_input_tokens": c.cached_tokens,
        "output_tokens": output_tokens,
    }


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {_dumps(data)}\n\n".encode()


def anthropic_chunks(request: SimRequest, c: Completion, ident: str) -> tuple[list[bytes], int]:
    """The SSE events of a streamed reply, and the index of the first word's event."""
    message: dict[str, Any] = {
        "id": f"msg_{ident}",
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _anthropic_usage(c, 1),
    }
    out = [
        _sse("message_start", {"type": "message_start", "message": message}),
        _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _sse("ping", {"type": "ping"}),
    ]
    for i, word in enumerate(c.words):
        delta = {"type": "text_delta", "text": word if i == 0 else " " + word}
        out.append(
            _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _anthropic_stop(c), "stop_sequence": c.stop_sequence},
                "usage": {"output_tokens": c.output_tokens},
            },
        )
    )
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return out, 3


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str, kind: str | None = None) -> bytes:
    etype = _ANTHROPIC_TYPES.get(status, "api_error")
    return _dumps({"type": "error", "error": {"type": etype, "message": message}}).encode()


def error_body(api: Api, status: int, message: str, kind: str | None = None) -> bytes:
    if api == "openai":
        return openai_error(status, message, kind)
    return anthropic_error(status, message, kind)


# --------------------------------------------------------------------------- headers


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: ``120ms``, ``1s``, ``17.28s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    head = f"{int(hours)}h" if hours else ""
    return f"{head}{int(minutes)}m{round(secs, 3):g}s"


def rfc3339(epoch: float) -> str:
    """Anthropic's reset format: an RFC 3339 UTC time, rounded up to the second."""
    return datetime.fromtimestamp(math.ceil(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class BucketView:
    """One rate-limit bucket as the headers report it."""

    limit: int
    remaining: int
    reset: float  # seconds until full


def limit_headers(
    api: Api, requests: BucketView | None, tokens: BucketView | None, now_epoch: float
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if api == "openai":
        for name, b in (("requests", requests), ("tokens", tokens)):
            if b is not None:
                out += [
                    (f"x-ratelimit-limit-{name}", str(b.limit)),
                    (f"x-ratelimit-remaining-{name}", str(b.remaining)),
                    (f"x-ratelimit-reset-{name}", go_duration(b.reset)),
                ]
        return out
    for name, b in (("requests", requests), ("tokens", tokens)):
        if b is not None:
            out += [
                (f"anthropic-ratelimit-{name}-limit", str(b.limit)),
                (f"anthropic-ratelimit-{name}-remaining", str(b.remaining)),
                (f"anthropic-ratelimit-{name}-reset", rfc3339(now_epoch + b.reset)),
            ]
    return out


def retry_headers(api: Api, wait: float) -> list[tuple[str, str]]:
    """Retry-After as each API sends it (OpenAI adds the millisecond form)."""
    out = [("retry-after", str(max(1, math.ceil(wait))))]
    if api == "openai":
        out.append(("retry-after-ms", str(max(1, math.ceil(wait * 1000)))))
    return out
