"""Requests users already have: OpenAI Batch API input lines and bare chat-completions
bodies (the OpenAI cookbook's ``api_request_parallel_processor.py`` request files).

Two line shapes, told apart line by line (a file may mix them; each line is answered in
its own shape, see ``docs/decisions/0180-bring-your-own-requests.md``):

- ``"batch"``: ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
  "body": {...}}``, as the Batch API takes;
- ``"body"``: a chat-completions body itself (``{"model": ..., "messages": [...]}``),
  with the cookbook's optional ``metadata`` field, which is kept apart and not sent.

:func:`read_requests` streams a file (one line in memory at a time, plus the custom ids
seen, to refuse a duplicate); :func:`ready_request` turns one item (a
:class:`RequestLine`, a :class:`fanflow.Request` or a body dict) into the request
``fanflow.map(llm, requests)`` sends. The body goes on the request as written
(``Request.body``), so tool turns, ``tools``, ``max_completion_tokens`` and every other
field reach an OpenAI-compatible endpoint unchanged; the typed fields (model, messages
as text, sampling parameters) are read from it for limits, estimates, prices and keys.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .._exceptions import ConfigError, TemplateError
from .._types import Message, Request

__all__ = [
    "BATCH_URL",
    "BadLine",
    "NotARequest",
    "RequestLine",
    "is_request_line",
    "read_requests",
    "ready_request",
    "request_of",
]

log = logging.getLogger("fanflow")

#: The one endpoint a Batch API input line may name (fanflow runs chat completions).
BATCH_URL = "/v1/chat/completions"

Shape = Literal["batch", "body"]

_ROLES: dict[str, Any] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}


class NotARequest(ValueError):
    """A line or item that is not a chat-completions request (the reason is the text)."""


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line of an input file that was skipped, and why (request files here; the
    command line's item files too)."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}; skipped"


@dataclass(frozen=True, slots=True)
class RequestLine:
    """One request read from a file, with what is needed to answer it in its shape.

    Attributes:
        request: what is sent (``request.body`` is the body as written).
        shape: ``"batch"`` (a Batch API input line) or ``"body"`` (a bare body).
        custom_id: the batch line's ``custom_id`` (None for a bare body); a job's
            records and sinks name the item by it.
        line: the line number in the file (1-based; None when built in memory).
        metadata: a bare body's ``metadata`` field (the cookbook's), not sent.
    """

    request: Request
    shape: Shape = "body"
    custom_id: str | None = None
    line: int | None = None
    metadata: Any = field(default=None)


def _text(content: Any, where: str) -> str:
    """The text of a message's content (a string, None, or a list of parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        return "".join(p for p in parts if isinstance(p, str))
    raise NotARequest(f"{where} has content of type {type(content).__name__}")


def _messages(body: Mapping[str, Any]) -> tuple[Message, ...]:
    raw = body.get("messages")
    if raw is None:
        raise NotARequest("has no 'messages' (a chat-completions request needs them)")
    if not isinstance(raw, list) or not raw:
        raise NotARequest("'messages' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        where = f"message {i}"
        if not isinstance(m, Mapping):
            raise NotARequest(f"{where} is not an object")
        role = _ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise NotARequest(f"{where} has role {m.get('role')!r}; use {', '.join(_ROLES)}")
        out.append(Message(role, _text(m.get("content"), where)))
    return tuple(out)


def _typed(body: Mapping[str, Any], name: str, kinds: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise NotARequest(f"'{name}' is {value!r}, not a {_kind(kinds)}")
    return value


def _kind(kinds: type | tuple[type, ...]) -> str:
    first = kinds[0] if isinstance(kinds, tuple) else kinds
    return {int: "number", float: "number", str: "string", dict: "JSON object"}[first]


def _stop(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise NotARequest(f"'stop' is {stop!r}, not a string or a list of strings")


def request_of(body: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Request:
    """The request of a chat-completions body: sent as written, typed fields read from it.

    Raises:
        NotARequest: it is not a chat-completions body (no messages, a bad field type).
    """
    max_tokens = _typed(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", int)
    return Request(
        messages=_messages(body),
        model=_typed(body, "model", str),
        temperature=_typed(body, "temperature", (int, float)),
        max_tokens=max_tokens,
        seed=_typed(body, "seed", int),
        stop=_stop(body),
        top_p=_typed(body, "top_p", (int, float)),
        response_format=_typed(body, "response_format", dict),
        metadata=metadata or {},
        body=body,
    )


def is_request_line(value: Any) -> bool:
    """Whether a JSON line is meant as a request (either shape), rather than an item."""
    return isinstance(value, Mapping) and (
        ("custom_id" in value and "body" in value) or "messages" in value
    )


def _batch_line(value: Mapping[str, Any], number: int | None) -> RequestLine:
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise NotARequest(f"'custom_id' is {custom_id!r}; give each line a unique string")
    method = value.get("method", "POST")
    if method != "POST":
        raise NotARequest(f"request {custom_id!r} has method {method!r}; the Batch API takes POST")
    url = value.get("url", BATCH_URL)
    if url != BATCH_URL:
        raise NotARequest(
            f"request {custom_id!r} is for {url!r}; fanflow runs {BATCH_URL} requests only"
        )
    body = value.get("body")
    if not isinstance(body, Mapping):
        raise NotARequest(f"request {custom_id!r} has no 'body' object")
    try:
        request = request_of(dict(body), {"custom_id": custom_id})
    except NotARequest as exc:
        raise NotARequest(f"request {custom_id!r}: the body {exc}") from None
    return RequestLine(request, "batch", custom_id, number)


def parse_request_line(value: Any, number: int | None = None) -> RequestLine:
    """One JSON line (already decoded) as a :class:`RequestLine`.

    Raises:
        NotARequest: it is neither shape, or not a valid request of its shape.
    """
    if not isinstance(value, Mapping):
        raise NotARequest(f"expected a JSON object, got {type(value).__name__}")
    if "custom_id" in value or "body" in value:
        return _batch_line(value, number)
    if "messages" not in value:
        raise NotARequest(
            "is neither a Batch API line (custom_id, method, url, body) nor a "
            "chat-completions body (messages)"
        )
    body = dict(value)
    metadata = body.pop("metadata", None)  # the cookbook's: kept with the line, not sent
    info = metadata if isinstance(metadata, Mapping) else {}
    return RequestLine(request_of(body, info), "body", None, number, metadata)


def ready_request(item: Any) -> Request:
    """The request of one item of ``fanflow.map(llm, requests)``.

    Raises:
        TemplateError: the item is not a request (that item fails, no call is made).
    """
    if isinstance(item, RequestLine):
        return item.request
    if isinstance(item, Request):
        return item
    try:
        if isinstance(item, Mapping):
            return parse_request_line(item).request
    except NotARequest as exc:
        raise TemplateError(f"the item is not a chat-completions request: it {exc}") from None
    raise TemplateError(
        f"the item is a {type(item).__name__}, not a request; give fanflow.Request objects, "
        "chat-completions bodies (dicts with 'messages') or fanflow.read_requests(path)"
    )


def _warn(bad: BadLine) -> None:
    log.warning("fanflow: %s", bad)


def read_requests(
    path: str | os.PathLike[str],
    *,
    on_bad: Callable[[BadLine], None] | None = None,
    max_bytes: int | None = None,
) -> Iterator[RequestLine]:
    """Stream the requests of a JSONL file: Batch API input lines or chat-completions bodies.

    Lines are read one at a time (a file of millions of lines is never loaded). A line
    that is not a request (not JSON, no ``messages``, a ``url`` other than
    ``/v1/chat/completions``, a ``method`` other than POST, a ``custom_id`` already
    used, longer than ``max_bytes``) is reported as ``file:line: reason`` to ``on_bad``
    (default: a warning on the ``fanflow`` logger) and skipped. Blank lines are skipped.

    Args:
        path: the file.
        on_bad: receives each skipped line.
        max_bytes: the longest line accepted (the provider's request size; None: any).

    Raises:
        ConfigError: the file cannot be opened (raised by this call, before iterating).
    """
    name = os.fspath(path)
    try:
        stream = open(name, "rb")  # noqa: SIM115 - closed by the generator
    except OSError as exc:
        raise ConfigError(f"request file {name} cannot be read: {exc.strerror}") from None
    return _read(stream, name, on_bad or _warn, max_bytes)


def _read(
    stream: Any, name: str, on_bad: Callable[[BadLine], None], max_bytes: int | None
) -> Iterator[RequestLine]:
    seen: dict[str, int] = {}  # custom_id -> the line that used it first
    with stream:
        for number, raw in enumerate(stream, 1):
            try:
                got = _line(raw, number, max_bytes, seen)
            except NotARequest as exc:
                on_bad(BadLine(name, number, str(exc)))
                continue
            if got is not None:
                yield got


def _line(
    raw: bytes, number: int, max_bytes: int | None, seen: dict[str, int]
) -> RequestLine | None:
    if max_bytes is not None and len(raw) > max_bytes:
        raise NotARequest(f"is {len(raw):,} bytes, over the provider's {max_bytes:,}")
    if not raw.strip():
        return None
    try:
        value = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        raise NotARequest(f"is not UTF-8 text (byte {exc.start + 1} of the line)") from None
    except ValueError as exc:
        raise NotARequest(f"is not valid JSON ({exc})") from None
    except RecursionError:
        raise NotARequest("is not valid JSON (nested too deeply)") from None
    line = parse_request_line(value, number)
    if line.custom_id is not None:
        first = seen.setdefault(line.custom_id, number)
        if first != number:
            raise NotARequest(f"custom_id {line.custom_id!r} was already used on line {first}")
    return line
