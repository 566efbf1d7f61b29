"""The transport seam: how an HTTP handle sends one request and reads its reply.

A handle builds an :class:`HttpRequest` (method, URL, headers with the key, body) and
hands it to its transport's ``send``; the reply it gets back is an async context
manager (leaving it releases the connection) with the status, the headers, ``read()``
for the whole body and ``content`` for the body's lines as they arrive (server-sent
events). The default transport is aiohttp's connection pool (``providers/_http.py``);
:class:`fanflow.testing.MockTransport` answers from a function, with no server.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

__all__ = ["HttpReply", "HttpRequest", "Transport"]


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One HTTP request as a handle sends it.

    ``headers`` are every header of the request, the key's included (a transport is the
    wire: it may see the key; nothing it raises may carry it). ``body`` is bytes, or an
    aiohttp payload for a multipart upload (a provider batch API's input file).
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: Any = None


class HttpReply(Protocol):
    """An HTTP reply: status and headers at once, the body when read."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> AsyncIterable[bytes]:
        """The body's lines, each with its line ending, as they arrive."""
        ...

    async def read(self) -> bytes: ...

    async def __aenter__(self) -> HttpReply: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...


class Transport(Protocol):
    """Sends HTTP requests for a handle; one transport serves every event loop."""

    def send(self, request: HttpRequest) -> Awaitable[HttpReply]:
        """Send ``request`` (an ``async def send`` does); the reply is used in
        ``async with`` (leaving it releases the connection). Raise ``OSError`` (or
        ``aiohttp.ClientError``, ``TimeoutError``) when the request could not be sent or
        the reply not read."""
        ...

    async def aclose(self) -> None:
        """Close the connections it holds; it may be used again after."""
        ...
