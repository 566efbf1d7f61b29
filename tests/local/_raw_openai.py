"""A minimal OpenAI-compatible chat client over raw HTTP/1.1, for end-to-end tests.

Stands in for ``fanflow.openai`` until that provider lands on main: one request per
connection (``Connection: close``), JSON in, JSON out, no retries of its own (the engine
retries). It is a real client talking to a real server; nothing is faked.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import fanflow


class RawOpenAI(fanflow.BaseLLM):
    def __init__(self, host: str, port: int, **options: Any) -> None:
        super().__init__(**options)
        self.host = host
        self.port = port

    async def complete(self, request: fanflow.Request) -> fanflow.Response:
        body: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in request.messages]
        }
        for name in ("model", "temperature", "max_tokens", "seed", "top_p"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.stop:
            body["stop"] = list(request.stop)
        status, reply = await self._post("/v1/chat/completions", body)
        if status != 200:
            raise fanflow.ServerError(f"HTTP {status}: {reply}", status_code=status)
        usage = reply["usage"]
        choice = reply["choices"][0]
        return fanflow.Response(
            choice["message"]["content"] or "",
            usage=fanflow.Usage(usage["prompt_tokens"], usage["completion_tokens"]),
            model=reply.get("model"),
            finish_reason=choice.get("finish_reason"),
            raw=reply,
        )

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        payload = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            rest = _unchunk(rest)
        return status, json.loads(rest)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out
