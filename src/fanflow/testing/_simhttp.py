"""SimServer's HTTP pieces shared by the chat and the batch endpoints: error answers
and connection tricks."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterable

from aiohttp import web

from ._simwire import Api, error_body

__all__ = ["_Gone", "_reset", "error_response"]


def error_response(
    api: Api,
    status: int,
    message: str,
    kind: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> web.Response:
    """The API's JSON error (``error_body``) as a response, with ``headers``."""
    response = web.Response(
        status=status, body=error_body(api, status, message, kind), content_type="application/json"
    )
    for k, v in headers:
        response.headers[k] = v
    return response


class _Gone(web.Response):
    """Returned when the connection is already closed: aiohttp's write of it fails
    quietly (no error log), and SimServer counts no response for it."""

    def __init__(self, *, by_client: bool) -> None:
        super().__init__(status=499)
        self.by_client = by_client


def _reset(request: web.BaseRequest) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), as a crashed proxy would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
