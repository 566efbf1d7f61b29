"""SimServer's batch endpoints, one class per API: routes, input validation, and the
batch and file objects in the official SDKs' shapes (``openai.types.Batch``,
``FileObject``; ``anthropic.types.messages.MessageBatch``), checked in
tests/testing/test_simbatch_conformance.py."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ._simbatchstate import Batch, BatchState, File, Line
from ._simwire import WireError, json_object

__all__ = ["AnthropicBatches", "OpenAIBatches"]

_DAY = 24 * 3600


class _Endpoints:
    """One API's batch endpoints over the server's batches and files."""

    def __init__(self, state: BatchState) -> None:
        self.state = state


class OpenAIBatches(_Endpoints):
    """OpenAI's Files (``/v1/files``) and Batch API (``/v1/batches``)."""

    async def files(
        self, request: web.BaseRequest, method: str, rest: list[str]
    ) -> web.StreamResponse:
        if method == "POST" and not rest:
            return await self._upload(request)
        if method == "GET" and rest:
            file = self.state.files.get(rest[0])
            if file is None:
                raise WireError(404, "invalid_request_error", f"No such File object: {rest[0]}")
            if rest[1:] == ["content"]:
                return web.Response(body=file.data, content_type="application/octet-stream")
            if not rest[1:]:
                return web.json_response(self._file_object(file))
        raise WireError(404, "invalid_request_error", f"no route {method} {request.path}")

    async def _upload(self, request: web.BaseRequest) -> web.Response:
        _, max_bytes = self.state.config.limits("openai")
        if request.content_length is not None and request.content_length > max_bytes + 65536:
            raise WireError(413, "invalid_request_error", "File is too large.")
        form = await request.post()
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            raise WireError(400, "invalid_request_error", "purpose: expected 'batch'")
        if not isinstance(upload, web.FileField):
            raise WireError(400, "invalid_request_error", "file: a file part is required")
        data = upload.file.read()
        if len(data) > max_bytes:
            raise WireError(
                400,
                "invalid_request_error",
                f"File is too large: {len(data)} bytes; the limit for purpose 'batch' is "
                f"{max_bytes} bytes.",
            )
        ident = self.state.new_id("file-")
        file = File(ident, upload.filename or "input.jsonl", "batch", data, time.time())
        self.state.files[ident] = file
        return web.json_response(self._file_object(file))

    @staticmethod
    def _file_object(file: File) -> dict[str, Any]:
        return {
            "id": file.ident,
            "object": "file",
            "bytes": len(file.data),
            "created_at": int(file.created_wall),
            "filename": file.filename,
            "purpose": file.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }

    async def handle(
        self, request: web.BaseRequest, method: str, rest: list[str]
    ) -> web.StreamResponse:
        if method == "POST" and not rest:
            return await self._create(request)
        if method == "GET" and not rest:
            data = [self._object(b) for b in self.state.batches.values() if b.api == "openai"]
            data.reverse()  # newest first, as the API lists them
            return web.json_response(
                {
                    "object": "list",
                    "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                    "has_more": False,
                }
            )
        batch = self.state.batches.get(rest[0]) if rest else None
        if batch is None or batch.api != "openai":
            raise WireError(
                404, "invalid_request_error", f"No such Batch: {rest[0] if rest else ''}"
            )
        if method == "GET" and len(rest) == 1:
            return web.json_response(self._object(batch))
        if method == "POST" and rest[1:] == ["cancel"]:
            self.state.cancel(batch)
            return web.json_response(self._object(batch))
        raise WireError(404, "invalid_request_error", f"no route {method} {request.path}")

    async def _create(self, request: web.BaseRequest) -> web.Response:
        data = json_object(await request.read())
        file_id = data.get("input_file_id")
        endpoint = data.get("endpoint")
        window = data.get("completion_window")
        if endpoint not in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings"):
            raise WireError(400, "invalid_request_error", f"endpoint: unsupported {endpoint!r}")
        if window != "24h":
            raise WireError(400, "invalid_request_error", "completion_window: must be '24h'")
        file = self.state.files.get(str(file_id))
        if file is None:
            raise WireError(400, "invalid_request_error", f"input_file_id: no file {file_id!r}")
        metadata = data.get("metadata")
        now = self.state.now()
        batch = Batch(
            "openai",
            self.state.new_id("batch_"),
            [],
            now,
            self.state.wall(now),
            input_file_id=file.ident,
            endpoint=str(endpoint),
            window=window,
            metadata=dict(metadata) if isinstance(metadata, dict) else None,
        )
        lines, errors = self._lines(file.data, str(endpoint))
        if errors:
            batch.status = "failed"
            batch.ended_at = now
            batch.errors = errors
            self.state.batches[batch.ident] = batch
        else:
            batch.lines = lines
            self.state.submitted(batch)
        return web.json_response(self._object(batch))

    def _lines(self, data: bytes, endpoint: str) -> tuple[list[Line], list[dict[str, Any]]]:
        """Validate an input file as the API does; errors make the batch ``failed``."""
        max_requests, _ = self.state.config.limits("openai")
        lines: list[Line] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                custom_id = row["custom_id"]
                body = row["body"]
                if not isinstance(custom_id, str) or not isinstance(body, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                errors.append(_err("invalid_json_line", number, "the line is not a valid request"))
                continue
            if row.get("method") != "POST" or row.get("url") != endpoint:
                errors.append(
                    _err("invalid_url", number, f"url must be {endpoint} with method POST")
                )
            if custom_id in seen:
                errors.append(
                    _err("duplicate_custom_id", number, f"custom_id {custom_id!r} is repeated")
                )
            seen.add(custom_id)
            lines.append(Line(custom_id, body))
        if len(lines) > max_requests:
            errors.append(
                _err(
                    "too_many_requests",
                    None,
                    f"the file has {len(lines)} requests; the limit is {max_requests}",
                )
            )
        if not lines and not errors:
            errors.append(_err("empty_file", None, "the file has no requests"))
        return lines, errors

    def _object(self, batch: Batch) -> dict[str, Any]:
        self.state.advance(batch)
        now = self.state.now()
        config = self.state.config
        status = batch.status
        if batch.ended_at is None:
            if batch.cancel_at is not None:
                status = "cancelling"
            elif now < batch.created + config.validate_time:
                status = "validating"
            else:
                status = "in_progress"
        failed = sum(1 for line in batch.lines if line.result is not None and not line.ok)
        if batch.ended_at is not None:
            failed += sum(1 for line in batch.lines if line.ended == "expired")
        completed = sum(1 for line in batch.lines if line.ok)

        def at(t: float | None) -> int | None:
            return None if t is None else int(self.state.wall(t))

        ended = batch.ended_at
        return {
            "id": batch.ident,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": None,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.window,
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_wall),
            "in_progress_at": at(batch.created + config.validate_time)
            if status not in ("validating", "failed")
            else None,
            "expires_at": int(batch.created_wall) + _DAY,
            "finalizing_at": at(ended) if status == "completed" else None,
            "completed_at": at(ended) if status == "completed" else None,
            "failed_at": at(ended) if status == "failed" else None,
            "expired_at": at(ended) if status == "expired" else None,
            "cancelling_at": at(batch.cancel_at),
            "cancelled_at": at(ended) if status == "cancelled" else None,
            "request_counts": {
                "total": len(batch.lines),
                "completed": completed,
                "failed": failed,
            },
            "metadata": batch.metadata,
        }


class AnthropicBatches(_Endpoints):
    """Anthropic's Message Batches (``/v1/messages/batches``)."""

    async def handle(
        self, request: web.BaseRequest, method: str, rest: list[str]
    ) -> web.StreamResponse:
        if method == "POST" and not rest:
            return await self._create(request)
        batch = self.state.batches.get(rest[0]) if rest else None
        if batch is None or batch.api != "anthropic":
            raise WireError(404, "not_found_error", f"No such message batch: {rest[:1]}")
        if method == "GET" and len(rest) == 1:
            return web.json_response(self._object(batch))
        if method == "POST" and rest[1:] == ["cancel"]:
            self.state.cancel(batch)
            return web.json_response(self._object(batch))
        if method == "GET" and rest[1:] == ["results"]:
            self.state.advance(batch)
            if batch.ended_at is None:
                raise WireError(
                    400, "invalid_request_error", f"Message Batch {batch.ident} has not ended"
                )
            return web.Response(
                body=self.state.anthropic_results(batch), content_type="application/binary"
            )
        raise WireError(404, "not_found_error", f"no route {method} {request.path}")

    async def _create(self, request: web.BaseRequest) -> web.Response:
        max_requests, max_bytes = self.state.config.limits("anthropic")
        body = await request.read()
        if len(body) > max_bytes:
            raise WireError(
                413, "request_too_large", f"Request exceeds the maximum size of {max_bytes} bytes"
            )
        data = json_object(body)
        requests = data.get("requests")
        if not isinstance(requests, list) or not requests:
            raise WireError(400, "invalid_request_error", "requests: a non-empty list is required")
        if len(requests) > max_requests:
            raise WireError(
                400,
                "invalid_request_error",
                f"requests: at most {max_requests} requests per batch, got {len(requests)}",
            )
        lines: list[Line] = []
        seen: set[str] = set()
        for i, item in enumerate(requests):
            if not isinstance(item, dict):
                raise WireError(400, "invalid_request_error", f"requests.{i}: must be an object")
            custom_id, params = item.get("custom_id"), item.get("params")
            if not isinstance(custom_id, str) or not isinstance(params, dict):
                raise WireError(
                    400, "invalid_request_error", f"requests.{i}: custom_id and params required"
                )
            if custom_id in seen:
                raise WireError(
                    400,
                    "invalid_request_error",
                    f"requests.{i}.custom_id: {custom_id!r} is not unique within the batch",
                )
            seen.add(custom_id)
            lines.append(Line(custom_id, params))
        now = self.state.now()
        batch = Batch("anthropic", self.state.new_id("msgbatch_"), lines, now, self.state.wall(now))
        self.state.submitted(batch)
        return web.json_response(self._object(batch))

    def _object(self, batch: Batch) -> dict[str, Any]:
        self.state.advance(batch)
        ended = batch.ended_at is not None
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:  # the API tallies requests only once the whole batch has ended
            for line in batch.lines:
                if line.ok:
                    counts["succeeded"] += 1
                elif line.result is not None:
                    counts["errored"] += 1
                else:
                    counts[line.ended or "canceled"] += 1
        else:
            counts["processing"] = len(batch.lines)
        status = (
            "ended" if ended else ("canceling" if batch.cancel_at is not None else "in_progress")
        )
        root = self.state.root()
        return {
            "id": batch.ident,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": _rfc3339(self.state.wall(batch.ended_at)) if batch.ended_at else None,
            "created_at": _rfc3339(batch.created_wall),
            "expires_at": _rfc3339(batch.created_wall + _DAY),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(self.state.wall(batch.cancel_at))
            if batch.cancel_at is not None
            else None,
            "results_url": f"{root}/v1/messages/batches/{batch.ident}/results" if ended else None,
        }


def _err(code: str, line: int | None, message: str) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": None}


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
