"""SimServer's connection tricks, shared by the chat and the batch endpoints."""

from __future__ import annotations

import contextlib
import socket
import struct

from aiohttp import web

__all__ = ["_Gone", "_reset"]


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
