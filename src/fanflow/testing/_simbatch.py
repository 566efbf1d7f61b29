"""SimServer's batch endpoints: OpenAI's Batch API and Anthropic's Message Batches.

OpenAI: ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}`` and
``/content``, ``POST /v1/batches``, ``GET /v1/batches[/{id}]``,
``POST /v1/batches/{id}/cancel``. Output and error files are JSONL, one line per
request, matched by ``custom_id``.

Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``,
``POST /v1/messages/batches/{id}/cancel``, ``GET /v1/messages/batches/{id}/results``.

Each request of a batch is processed at its turn of ``SimBatches.time`` and answered
like a chat request, limits-free, with the server's fault injection drawn per request (a
drawn ``500``/``503``/``529``/``429``/``quota``/``hang``/``reset`` becomes that line's
error; ``malformed`` writes a line that is not JSON). A batch that would take longer
than ``expire_after`` expires then: the requests not yet processed end ``expired``. A
cancel stops processing at once; the batch ends ``cancel_time`` later.

This module routes and injects the endpoints' own faults (``control_faults``);
``_simbatchstate.py`` holds the batches and processes them by the clock,
``_simbatchapi.py`` speaks each API.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from ._simbatchapi import AnthropicBatches, OpenAIBatches
from ._simbatchstate import BatchState, SimBatches
from ._simchat import ChatDesk
from ._simhttp import _Gone, _reset, error_response
from ._simwire import Api, WireError

__all__ = ["BatchDesk", "SimBatches"]


class BatchDesk:
    """The batch endpoints of one SimServer: ``chat`` answers their requests; ``root``
    gives the server's root URL."""

    def __init__(self, chat: ChatDesk, config: SimBatches, root: Callable[[], str]) -> None:
        self._chat = chat
        self.state = BatchState(chat, config, root)
        self._openai = OpenAIBatches(self.state)
        self._anthropic = AnthropicBatches(self.state)
        self._control_used: dict[str, int] = {}

    @property
    def config(self) -> SimBatches:
        return self.state.config

    @config.setter
    def config(self, config: SimBatches) -> None:
        self.state.config = config

    def reset(self) -> None:
        """Start the scripted ``control_faults`` again (the counts are the server's)."""
        self._control_used = {}

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith(("/v1/files", "/v1/batches", "/v1/messages/batches"))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        api: Api = "anthropic" if path.startswith("/v1/messages/batches") else "openai"
        wrong_key = self._chat.authorised(api, request)
        if wrong_key is not None:
            return error_response(api, 401, f"Incorrect API key provided: {wrong_key}.")
        if api == "anthropic" and "anthropic-version" not in request.headers:
            return error_response(api, 400, "anthropic-version: header is required")
        parts = path.strip("/").split("/")
        fault = self._control_fault(_operation(method, parts))
        if fault in ("500", "503", "529", "429"):
            self._chat.counters.fault(f"batch:{fault}")
            return error_response(api, int(fault), "The server had an error (injected).")
        if fault == "reset":
            self._chat.counters.fault(f"batch:{fault}")
            _reset(request)
            return _Gone(by_client=False)
        try:
            if api == "anthropic":
                response = await self._anthropic.handle(request, method, parts[3:])
            elif parts[1] == "files":
                response = await self._openai.files(request, method, parts[2:])
            else:
                response = await self._openai.handle(request, method, parts[2:])
        except WireError as exc:
            return error_response(api, exc.status, exc.message)
        if fault == "lost":  # done, but the reply never arrives
            self._chat.counters.fault(f"batch:{fault}")
            _reset(request)
            return _Gone(by_client=False)
        return response

    def _control_fault(self, op: str | None) -> str | None:
        if op is None:
            return None
        used = self._control_used.get(op, 0)
        kinds = self.config.control_faults.get(op, ())
        if used >= len(kinds):
            return None
        self._control_used[op] = used + 1
        return kinds[used]


def _operation(method: str, parts: list[str]) -> str | None:
    """Which batch operation a request is (for ``control_faults``)."""
    if parts[1] == "files":
        if method == "POST":
            return "upload"
        return "results" if parts[-1] == "content" else None
    rest = parts[3:] if parts[1] == "messages" else parts[2:]
    if method == "POST":
        return "cancel" if rest[1:] == ["cancel"] else "create" if not rest else None
    if rest[1:] == ["results"]:
        return "results"
    return "poll" if len(rest) == 1 else None
