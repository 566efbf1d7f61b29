"""The providers' batch APIs: OpenAI's Batch API and Anthropic's Message Batches.

Wire translation only, over the handle's own HTTP plumbing (its pooled session, key,
error classification and scrubbing in ``_http.py``):

- OpenAI: upload a JSONL file (``POST /files``, ``purpose=batch``), create the batch
  (``POST /batches`` for ``/v1/chat/completions``, ``completion_window=24h``), poll
  (``GET /batches/{id}``), read the output and error files
  (``GET /files/{id}/content``), cancel (``POST /batches/{id}/cancel``).
- Anthropic: ``POST /v1/messages/batches`` with the requests inline, poll, read the
  results (``GET .../results``), cancel.

Both return the same small types (:class:`BatchState`, :class:`BatchLine`), so the batch
backend (``backends/_batch.py``) knows no API. Limits are the documented ones: OpenAI
50,000 requests and 200 MB per input file; Anthropic 100,000 requests and 256 MB per
batch.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp

from .._batchapi import BatchAPI, BatchLine, BatchState
from .._batchinfo import batch_extra
from .._exceptions import RETRYABLE, ProtocolError, ProviderError
from .._transport import HttpRequest
from .._types import Request, Response, Usage
from ._http import REQUEST_ID, TRANSPORT_ERRORS

if TYPE_CHECKING:
    from ._http import HttpLLM

__all__ = ["AnthropicBatches", "BatchAPI", "BatchLine", "BatchState", "OpenAIBatches"]

_ANTHROPIC_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class HttpBatchAPI(BatchAPI):
    """A batch API over a handle's HTTP plumbing."""

    llm: HttpLLM

    def __init__(self, llm: HttpLLM) -> None:
        super().__init__(llm)
        self.llm = llm

    # -- plumbing -----------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        *,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """One HTTP exchange through the handle's transport; errors are classified."""
        llm = self.llm
        wire = llm.wire_headers()
        request = HttpRequest(method, url, {**wire, **headers} if headers else wire, data)
        try:
            async with await llm.transport.send(request) as reply:
                status, resp_headers = reply.status, reply.headers
                raw = await reply.read()
        except TRANSPORT_ERRORS as exc:
            raise llm.broken(url, exc) from None
        if status != 200:
            raise llm.fail(status, resp_headers, raw, None)
        return raw

    async def _json(self, method: str, url: str, **kw: Any) -> Any:
        raw = await self._send(method, url, **kw)
        try:
            return json.loads(raw)
        except ValueError:
            raise self._protocol(f"{method} {url} did not answer JSON") from None

    def _protocol(self, what: str) -> ProtocolError:
        return ProtocolError(
            f"{self.llm.provider}: the batch API's reply was not as expected ({what}); {RETRYABLE}"
        )

    def _line_error(self, status: int, body: Any) -> ProviderError:
        raw = _dumps(body).encode() if not isinstance(body, bytes) else body
        return self.llm.fail(status, {}, raw, None)


def _lines(raw: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL body; lines that are not JSON objects are skipped (the
    requests they stood for end with no result and are sent again)."""
    out = []
    for text in raw.splitlines():
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("custom_id"), str):
            out.append(row)
    return out


class OpenAIBatches(HttpBatchAPI):
    """OpenAI's Batch API for ``/v1/chat/completions``."""

    max_requests = 50_000
    max_bytes = 200 * 1024 * 1024
    endpoint = "/v1/chat/completions"

    def line(self, custom_id: str, request: Request) -> bytes:
        body = self.llm.batch_body(request)
        body.pop("stream", None)
        body.pop("stream_options", None)
        row = {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body}
        return _dumps(row).encode()

    async def submit(self, lines: Sequence[bytes], metadata: Mapping[str, str]) -> BatchState:
        base = self.llm.base_url
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file",
            # A stream, not bytes: aiohttp sends a file of many megabytes in chunks.
            io.BytesIO(b"\n".join(lines) + b"\n"),
            filename="fanflow-batch.jsonl",
            content_type="application/jsonl",
        )
        # The session's default Content-Type is JSON: name the multipart one (with its
        # boundary) explicitly.
        payload = form()
        headers = {"Content-Type": payload.content_type}
        file = await self._json("POST", f"{base}/files", data=payload, headers=headers)
        body = {
            "input_file_id": file["id"],
            "endpoint": self.endpoint,
            "completion_window": "24h",
            "metadata": dict(metadata),
        }
        data = await self._json("POST", f"{base}/batches", data=_dumps(body).encode())
        return self._state(data)

    async def poll(self, batch_id: str) -> BatchState:
        return self._state(await self._json("GET", f"{self.llm.base_url}/batches/{batch_id}"))

    async def find(self, token: str) -> BatchState | None:
        data = await self._json("GET", f"{self.llm.base_url}/batches?limit=100")
        for batch in data.get("data") or () if isinstance(data, dict) else ():
            metadata = batch.get("metadata") if isinstance(batch, dict) else None
            if isinstance(metadata, dict) and metadata.get("fanflow_token") == token:
                return self._state(batch)
        return None

    async def cancel(self, batch_id: str) -> BatchState:
        url = f"{self.llm.base_url}/batches/{batch_id}/cancel"
        return self._state(await self._json("POST", url))

    def _state(self, data: Any) -> BatchState:
        try:
            status = str(data["status"])
            counts = data.get("request_counts") or {}
            reason = None
            if status == "failed":
                errors = (data.get("errors") or {}).get("data") or []
                reason = "; ".join(
                    f"{e.get('code')}: {e.get('message')}"
                    + (f" (line {e['line']})" if e.get("line") else "")
                    for e in errors
                )
                reason = reason or "the provider gave no reason"
            return BatchState(
                id=str(data["id"]),
                status=status,
                ended=status in ("completed", "expired", "cancelled", "failed"),
                total=int(counts.get("total", 0)),
                done=int(counts.get("completed", 0)) + int(counts.get("failed", 0)),
                failed_reason=reason,
                refs=(data.get("output_file_id"), data.get("error_file_id")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._protocol(f"a batch object: {type(exc).__name__}: {exc}") from None

    async def results(self, state: BatchState) -> list[BatchLine]:
        out: list[BatchLine] = []
        for file_id in state.refs:
            if not file_id:
                continue
            raw = await self._send("GET", f"{self.llm.base_url}/files/{file_id}/content")
            for row in _lines(raw):
                out.append(self._line(row, state.id))
        return out

    def _line(self, row: dict[str, Any], batch_id: str) -> BatchLine:
        custom_id = row["custom_id"]
        response = row.get("response")
        error = row.get("error")
        if isinstance(response, dict):
            status = int(response.get("status_code") or 0)
            body = response.get("body")
            if status == 200:
                try:
                    parsed = self.llm.parse(_dumps(body).encode(), 0.0, None)
                except ProviderError as exc:
                    return BatchLine(custom_id, "errored", error=exc)
                named = response.get("request_id")  # the provider's id of the request
                answered = _with_batch(parsed, batch_id, named if isinstance(named, str) else None)
                return BatchLine(custom_id, "succeeded", response=answered)
            code = (body or {}).get("error", {}).get("code") if isinstance(body, dict) else None
            if code == "batch_expired":
                return BatchLine(custom_id, "expired")
            if code == "batch_cancelled":
                return BatchLine(custom_id, "canceled")
            return BatchLine(custom_id, "errored", error=self._line_error(status, body))
        message = error if isinstance(error, dict) else {"message": str(error)}
        return BatchLine(custom_id, "errored", error=self._line_error(400, {"error": message}))


class AnthropicBatches(HttpBatchAPI):
    """Anthropic's Message Batches."""

    max_requests = 100_000
    max_bytes = 256 * 1024 * 1024

    def takes_id(self, custom_id: str) -> bool:
        """Anthropic's documented custom_id: 1 to 64 letters, digits, ``_`` or ``-``."""
        return _ANTHROPIC_ID.fullmatch(custom_id) is not None

    def line(self, custom_id: str, request: Request) -> bytes:
        body = self.llm.batch_body(request)
        body.pop("stream", None)
        return _dumps({"custom_id": custom_id, "params": body}).encode()

    @property
    def _url(self) -> str:
        return f"{self.llm.base_url}/v1/messages/batches"

    async def submit(self, lines: Sequence[bytes], metadata: Mapping[str, str]) -> BatchState:
        body = io.BytesIO(b'{"requests":[' + b",".join(lines) + b"]}")
        return self._state(await self._json("POST", self._url, data=body))

    async def poll(self, batch_id: str) -> BatchState:
        return self._state(await self._json("GET", f"{self._url}/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchState:
        return self._state(await self._json("POST", f"{self._url}/{batch_id}/cancel"))

    def _state(self, data: Any) -> BatchState:
        try:
            counts = data["request_counts"]
            status = str(data["processing_status"])
            total = sum(int(v) for v in counts.values())
            done = total - int(counts.get("processing", 0))
            return BatchState(
                id=str(data["id"]),
                status=status,
                ended=status == "ended",
                total=total,
                done=done if status == "ended" else 0,
                refs=(data.get("results_url"),),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._protocol(f"a message batch object: {type(exc).__name__}: {exc}") from None

    async def results(self, state: BatchState) -> list[BatchLine]:
        url = state.refs[0] if state.refs and state.refs[0] else f"{self._url}/{state.id}/results"
        raw = await self._send("GET", url)
        out: list[BatchLine] = []
        for row in _lines(raw):
            result = row.get("result")
            kind = result.get("type") if isinstance(result, dict) else None
            custom_id = row["custom_id"]
            if kind == "succeeded":
                assert isinstance(result, dict)
                try:
                    parsed = self.llm.parse(_dumps(result.get("message")).encode(), 0.0, None)
                except ProviderError as exc:
                    out.append(BatchLine(custom_id, "errored", error=exc))
                    continue
                out.append(
                    BatchLine(custom_id, "succeeded", response=_with_batch(parsed, state.id))
                )
            elif kind == "errored":
                assert isinstance(result, dict)
                body = result.get("error") or {}
                inner = body.get("error", {}) if isinstance(body, dict) else {}
                status = _ANTHROPIC_STATUS.get(str(inner.get("type")), 500)
                out.append(BatchLine(custom_id, "errored", error=self._line_error(status, body)))
            elif kind in ("expired", "canceled"):
                out.append(BatchLine(custom_id, kind))
        return out


_ANTHROPIC_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def _with_batch(response: Response, batch_id: str, request_id: str | None = None) -> Response:
    """The response of a batched request: no latency of its own, its batch named (and
    the provider's id of the request, where its result line gave one)."""
    extra = {**response.extra, **batch_extra(batch_id)}
    if request_id:
        extra[REQUEST_ID] = request_id
    return Response(
        response.text,
        usage=response.usage if response.usage is not None else Usage(),
        model=response.model,
        finish_reason=response.finish_reason,
        latency=None,
        raw=response.raw,
        extra=extra,
    )
