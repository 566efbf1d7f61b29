"""MockTransport: an HTTP handle's transport that answers from a function, no server.

``fanflow.openai("m", base_url="http://test/v1", transport=MockTransport(handler))``
sends every request to ``handler(request)`` (sync or async), which returns a
:class:`MockReply`; the handle parses it exactly as a reply off the wire. Raising
``OSError`` in the handler is a connection failure.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from .._transport import HttpReply, HttpRequest

__all__ = ["MockReply", "MockTransport"]


@dataclass(frozen=True)
class MockReply:
    """What the mock server answers: a status, headers and a body."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(
        cls, data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> MockReply:
        """A JSON body."""
        return cls(status, {"Content-Type": "application/json", **(headers or {})}, _dump(data))

    @classmethod
    def events(
        cls, events: Iterable[Any], *, headers: Mapping[str, str] | None = None
    ) -> MockReply:
        """A server-sent-event stream: one ``data:`` line per event (str as is, else
        JSON)."""
        lines = (e.encode() if isinstance(e, str) else _dump(e) for e in events)
        body = b"".join(b"data: " + line + b"\n\n" for line in lines)
        return cls(200, {"Content-Type": "text/event-stream", **(headers or {})}, body)


Handler = Callable[[HttpRequest], MockReply | Awaitable[MockReply]]


class MockTransport:
    """A transport whose every request is answered by ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def __repr__(self) -> str:
        return f"fanflow.testing.MockTransport({getattr(self.handler, '__name__', 'handler')})"

    async def send(self, request: HttpRequest) -> HttpReply:
        reply = self.handler(request)
        if inspect.isawaitable(reply):
            reply = await reply
        if not isinstance(reply, MockReply):
            raise TypeError(
                f"the MockTransport handler returned {type(reply).__name__}, not MockReply"
            )
        return _Reply(reply)

    async def aclose(self) -> None:
        return None


class _Reply:
    """A :class:`MockReply` as the handle reads a reply off the wire."""

    def __init__(self, reply: MockReply) -> None:
        self.status = reply.status
        self.headers = CIMultiDictProxy(CIMultiDict(reply.headers))
        self._body = reply.body

    @property
    def content(self) -> AsyncIterator[bytes]:
        return _Lines(self._body.splitlines(keepends=True))

    async def read(self) -> bytes:
        return self._body

    async def __aenter__(self) -> _Reply:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class _Lines:
    """The body's lines as an async iterator (not a generator: a reader may stop early,
    as it does at ``[DONE]``, without leaving a generator to finalise)."""

    def __init__(self, lines: list[bytes]) -> None:
        self._lines = iter(lines)

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._lines)
        except StopIteration:
            raise StopAsyncIteration from None


def _dump(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
