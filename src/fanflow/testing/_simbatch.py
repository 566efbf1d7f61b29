"""SimServer's batch endpoints: OpenAI's Batch API and Anthropic's Message Batches.

OpenAI: ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}`` and
``/content``, ``POST /v1/batches``, ``GET /v1/batches[/{id}]``,
``POST /v1/batches/{id}/cancel``. Output and error files are JSONL, one line per
request, matched by ``custom_id``.

Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``,
``POST /v1/messages/batches/{id}/cancel``, ``GET /v1/messages/batches/{id}/results``.

A batch's state is a pure function of the server loop's clock: request *i* of *n* is
processed at ``created + (i + 1) / n * SimBatches.time`` (after validation), so under
``looptime`` a test's polls advance virtual time and see the batch progress, with no
background task. Each request is answered when it is processed, by the same reply
function, limits-free, with the server's fault injection drawn per request (a drawn
``500``/``503``/``529``/``429``/``quota``/``hang``/``reset`` becomes that line's error;
``malformed`` writes a line that is not JSON). A batch that would take longer than
``expire_after`` expires then: the requests not yet processed end ``expired``. A cancel
stops processing at once; the batch ends ``cancel_time`` later. Object shapes follow the
official SDKs' types (``openai.types.Batch``, ``FileObject``;
``anthropic.types.messages.MessageBatch``, ``MessageBatchIndividualResponse``), checked
in tests/testing/test_simbatch_conformance.py.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ._simhttp import _Gone, _reset
from ._simwire import (
    Api,
    WireError,
    anthropic_body,
    complete,
    error_body,
    json_object,
    openai_body,
    parse_request,
)


def _gone() -> web.Response:
    return _Gone(by_client=False)


__all__ = ["SimBatches"]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: Documented per-batch limits (requests, bytes of the input file or request body).
OPENAI_LIMITS = (50_000, 200 * 1024 * 1024)
ANTHROPIC_LIMITS = (100_000, 256 * 1024 * 1024)
_DAY = 24 * 3600

#: Line errors for faults, as (HTTP status, message).
_LINE_ERRORS = {
    "500": (500, "The server had an error while processing your request."),
    "503": (503, "The server is temporarily unavailable."),
    "529": (529, "Overloaded"),
    "429": (429, "Rate limit reached while processing the batch."),
    "quota": (429, "You exceeded your current quota, please check your plan and billing."),
    "hang": (500, "The request did not finish (injected hang)."),
    "reset": (500, "The connection was reset while processing (injected)."),
    "slow_stream": (500, "The request was too slow (injected)."),
}


_OPERATIONS = ("upload", "create", "poll", "results", "cancel")
_CONTROL_FAULTS = ("500", "503", "529", "429", "reset", "lost")


@dataclass(frozen=True, slots=True)
class SimBatches:
    """How SimServer's batch endpoints behave.

    Args:
        time: seconds from a batch's creation until its last request is processed
            (requests are processed evenly over that time).
        validate_time: seconds an OpenAI batch stays ``validating`` first.
        expire_after: seconds after creation at which a batch still running expires;
            None: never.
        cancel_time: seconds from a cancel request until the batch has ended.
        max_requests: requests per batch (None: the API's documented limit, 50,000
            for OpenAI, 100,000 for Anthropic).
        max_bytes: bytes per input file (OpenAI) or request body (Anthropic) (None:
            200 MB, 256 MB).
        unknown_lines: extra result lines with custom ids nobody sent, per batch.
        duplicate_lines: write each successful result line twice.
        control_faults: faults of the batch endpoints themselves, by operation
            (``"upload"``, ``"create"``, ``"poll"``, ``"results"``, ``"cancel"``): each
            call takes the next fault of its list (then answers normally). Kinds:
            ``"500"``, ``"503"``, ``"529"``, ``"429"``, ``"reset"`` (the connection is
            reset before anything is done) and ``"lost"`` (the operation is done, then
            the connection is reset: the reply is lost).
    """

    time: float = 1.0
    validate_time: float = 0.0
    expire_after: float | None = None
    cancel_time: float = 0.0
    max_requests: int | None = None
    max_bytes: int | None = None
    unknown_lines: int = 0
    duplicate_lines: bool = False
    control_faults: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for op, kinds in self.control_faults.items():
            if op not in _OPERATIONS:
                raise ValueError(f"unknown batch operation {op!r}; use {', '.join(_OPERATIONS)}")
            for kind in kinds:
                if kind not in _CONTROL_FAULTS:
                    raise ValueError(
                        f"unknown batch endpoint fault {kind!r}; use {', '.join(_CONTROL_FAULTS)}"
                    )
        for name in ("time", "validate_time", "cancel_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if self.expire_after is not None and self.expire_after <= 0:
            raise ValueError(f"expire_after must be > 0 seconds, got {self.expire_after}")
        for name in ("max_requests", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def limits(self, api: Api) -> tuple[int, int]:
        default = OPENAI_LIMITS if api == "openai" else ANTHROPIC_LIMITS
        return (self.max_requests or default[0], self.max_bytes or default[1])


@dataclass(slots=True)
class _Line:
    custom_id: str
    body: dict[str, Any]
    result: bytes | None = None  # the output line once processed
    ok: bool = False
    ended: str | None = None  # "expired" | "canceled" when it was never processed


@dataclass(slots=True)
class _Batch:
    api: Api
    ident: str
    lines: list[_Line]
    created: float  # server loop time
    created_wall: float
    input_file_id: str | None = None
    endpoint: str = "/v1/chat/completions"
    window: str = "24h"
    metadata: dict[str, str] | None = None
    cancel_at: float | None = None
    ended_at: float | None = None
    status: str = "in_progress"
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    processed: int = 0


@dataclass(slots=True)
class _File:
    ident: str
    filename: str
    purpose: str
    data: bytes
    created_wall: float


class BatchDesk:
    """The batch endpoints of one SimServer (state, routing, wire shapes)."""

    def __init__(self, server: Any, config: SimBatches) -> None:
        # ``server`` is the SimServer (not imported here: it imports this module).
        self.server = server
        self.config = config
        self.batches: dict[str, _Batch] = {}
        self.files: dict[str, _File] = {}
        self._ids = itertools.count()
        self.created = 0
        self.lines_submitted = 0
        self.prompt_submissions: dict[str, int] = {}
        self.cancels = 0
        self._control_used: dict[str, int] = {}

    def reset_counts(self) -> None:
        self.created = self.lines_submitted = self.cancels = 0
        self.prompt_submissions = {}
        self._control_used = {}

    # -- routing ------------------------------------------------------------------

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith(("/v1/files", "/v1/batches", "/v1/messages/batches"))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        api: Api = "anthropic" if path.startswith("/v1/messages/batches") else "openai"
        wrong_key = self.server._authorised(api, request)
        if wrong_key is not None:
            return self._error(api, 401, f"Incorrect API key provided: {wrong_key}.")
        if api == "anthropic" and "anthropic-version" not in request.headers:
            return self._error(api, 400, "anthropic-version: header is required")
        parts = path.strip("/").split("/")
        fault = self._control_fault(_operation(method, parts))
        if fault in ("500", "503", "529", "429"):
            self._count_fault(fault)
            return self._error(api, int(fault), "The server had an error (injected).")
        if fault == "reset":
            self._count_fault(fault)
            _reset(request)
            return _gone()
        try:
            if api == "anthropic":
                response = await self._anthropic(request, method, parts[3:])
            elif parts[1] == "files":
                response = await self._files(request, method, parts[2:])
            else:
                response = await self._openai(request, method, parts[2:])
        except WireError as exc:
            return self._error(api, exc.status, exc.message)
        if fault == "lost":  # done, but the reply never arrives
            self._count_fault(fault)
            _reset(request)
            return _gone()
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

    def _count_fault(self, kind: str) -> None:
        faults = self.server._c.faults
        faults[f"batch:{kind}"] = faults.get(f"batch:{kind}", 0) + 1

    def _error(self, api: Api, status: int, message: str) -> web.Response:
        return web.Response(
            status=status, body=error_body(api, status, message), content_type="application/json"
        )

    def _now(self) -> float:
        loop = self.server._loop
        assert loop is not None
        return float(loop.time())

    def _wall(self, at: float) -> float:
        """The Unix time of a server loop time (for the objects' timestamps)."""
        return time.time() + (at - self._now())

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}sim{next(self._ids)}"

    # -- processing ---------------------------------------------------------------

    def _advance(self, batch: _Batch) -> None:
        """Bring ``batch`` up to the server's current time."""
        if batch.ended_at is not None:
            return
        now = self._now()
        config = self.config
        start = batch.created + (config.validate_time if batch.api == "openai" else 0.0)
        n = len(batch.lines)
        stop = now
        if batch.cancel_at is not None:
            stop = min(stop, batch.cancel_at)
        expire = None if config.expire_after is None else batch.created + config.expire_after
        if expire is not None:
            stop = min(stop, expire)
        while batch.processed < n:
            due = start + (batch.processed + 1) / n * config.time
            if due > stop:
                break
            self._process(batch, batch.lines[batch.processed], due)
            batch.processed += 1
        if batch.processed == n:
            self._end(batch, "completed", start + config.time)
        elif batch.cancel_at is not None and now >= batch.cancel_at + config.cancel_time:
            self._end(batch, "cancelled", batch.cancel_at + config.cancel_time)
        elif expire is not None and now >= expire:
            self._end(batch, "expired", expire)

    def _process(self, batch: _Batch, line: _Line, at: float) -> None:
        """Answer ``line``, processed at ``at`` (server time; its prompt cache entries
        are readable by the lines processed after it)."""
        server = self.server
        api = batch.api
        index = self.lines_submitted  # only for SimRequest.index
        try:
            sim = parse_request(api, _dumps(line.body).encode(), index, self._now())
        except WireError as exc:
            line.result = self._line_error(batch, line, exc.status, exc.message)
            return
        fault = server._draw_fault(sim)
        if fault is not None:
            faults = server._c.faults
            faults[fault] = faults.get(fault, 0) + 1
        if fault == "malformed":
            line.result = b'{"custom_id": "' + line.custom_id.encode() + b'", "respo'
            return
        if fault is not None:
            status, message = _LINE_ERRORS[fault]
            line.result = self._line_error(batch, line, status, message)
            return
        if server.models is not None and sim.model not in server.models:
            message = f"The model `{sim.model}` does not exist or you do not have access."
            line.result = self._line_error(batch, line, 404, message)
            return
        done = complete(sim, server._reply(sim))
        if server._cache is not None:
            done = server._cached(sim, done, at, at)
        server._c.tokens_in += done.input_tokens
        server._c.tokens_out += done.output_tokens
        server._completed(sim)
        ident = self._new_id("")
        if api == "openai":
            body = json.loads(openai_body(sim, done, ident))
            out: dict[str, Any] = {
                "id": f"batch_req_{ident}",
                "custom_id": line.custom_id,
                "response": {"status_code": 200, "request_id": f"req_{ident}", "body": body},
                "error": None,
            }
        else:
            message = json.loads(anthropic_body(sim, done, ident))
            out = {"custom_id": line.custom_id, "result": {"type": "succeeded", "message": message}}
        line.result = _dumps(out).encode()
        line.ok = True

    def _line_error(self, batch: _Batch, line: _Line, status: int, message: str) -> bytes:
        body = json.loads(error_body(batch.api, status, message))
        if batch.api == "openai":
            ident = self._new_id("")
            out: dict[str, Any] = {
                "id": f"batch_req_{ident}",
                "custom_id": line.custom_id,
                "response": {"status_code": status, "request_id": f"req_{ident}", "body": body},
                "error": None,
            }
        else:
            out = {"custom_id": line.custom_id, "result": {"type": "errored", "error": body}}
        return _dumps(out).encode()

    def _end(self, batch: _Batch, status: str, at: float) -> None:
        batch.status = status
        batch.ended_at = at
        ended = {"cancelled": "canceled"}.get(status, status)
        for line in batch.lines:
            if line.result is None:
                line.ended = ended
        if batch.api == "openai":
            ok, bad = self._openai_files(batch)
            if ok:
                batch.output_file_id = self._add_file(f"{batch.ident}_output.jsonl", ok)
            if bad:
                batch.error_file_id = self._add_file(f"{batch.ident}_error.jsonl", bad)

    def _extra(self) -> list[bytes]:
        out = []
        for i in range(self.config.unknown_lines):
            out.append(
                _dumps(
                    {"custom_id": f"nobody-sent-this-{i}", "result": {"type": "canceled"}}
                ).encode()
            )
        return out

    def _openai_files(self, batch: _Batch) -> tuple[bytes, bytes]:
        ok: list[bytes] = []
        bad: list[bytes] = []
        for line in batch.lines:
            if line.result is not None:
                (ok if line.ok else bad).append(line.result)
                if line.ok and self.config.duplicate_lines:
                    ok.append(line.result)
            elif line.ended == "expired":
                bad.append(
                    _dumps(
                        {
                            "id": self._new_id("batch_req_"),
                            "custom_id": line.custom_id,
                            "response": {
                                "status_code": 400,
                                "request_id": self._new_id("req_"),
                                "body": {
                                    "error": {
                                        "message": "This request could not be executed before "
                                        "the completion window expired.",
                                        "type": "invalid_request_error",
                                        "param": None,
                                        "code": "batch_expired",
                                    }
                                },
                            },
                            "error": None,
                        }
                    ).encode()
                )
        for i in range(self.config.unknown_lines):
            ok.append(
                _dumps(
                    {
                        "id": self._new_id("batch_req_"),
                        "custom_id": f"nobody-sent-this-{i}",
                        "response": {"status_code": 200, "request_id": "req_x", "body": {}},
                        "error": None,
                    }
                ).encode()
            )
        return b"\n".join(ok) + (b"\n" if ok else b""), b"\n".join(bad) + (b"\n" if bad else b"")

    def _add_file(self, name: str, data: bytes, purpose: str = "batch_output") -> str:
        ident = self._new_id("file-")
        self.files[ident] = _File(ident, name, purpose, data, time.time())
        return ident

    def _submitted(self, lines: list[_Line], api: Api) -> None:
        self.created += 1
        self.lines_submitted += len(lines)
        counts = self.prompt_submissions
        for line in lines:
            try:
                prompt = parse_request(api, _dumps(line.body).encode(), 0).prompt
            except WireError:
                prompt = ""
            counts[prompt] = counts.get(prompt, 0) + 1

    # -- OpenAI files -------------------------------------------------------------

    async def _files(
        self, request: web.BaseRequest, method: str, rest: list[str]
    ) -> web.StreamResponse:
        if method == "POST" and not rest:
            return await self._upload(request)
        if method == "GET" and rest:
            file = self.files.get(rest[0])
            if file is None:
                raise WireError(404, "invalid_request_error", f"No such File object: {rest[0]}")
            if rest[1:] == ["content"]:
                return web.Response(body=file.data, content_type="application/octet-stream")
            if not rest[1:]:
                return web.json_response(self._file_object(file))
        raise WireError(404, "invalid_request_error", f"no route {method} {request.path}")

    async def _upload(self, request: web.BaseRequest) -> web.Response:
        _, max_bytes = self.config.limits("openai")
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
        ident = self._new_id("file-")
        file = _File(ident, upload.filename or "input.jsonl", "batch", data, time.time())
        self.files[ident] = file
        return web.json_response(self._file_object(file))

    @staticmethod
    def _file_object(file: _File) -> dict[str, Any]:
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

    # -- OpenAI batches -----------------------------------------------------------

    async def _openai(
        self, request: web.BaseRequest, method: str, rest: list[str]
    ) -> web.StreamResponse:
        if method == "POST" and not rest:
            return await self._openai_create(request)
        if method == "GET" and not rest:
            data = [self._openai_object(b) for b in self.batches.values() if b.api == "openai"]
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
        batch = self.batches.get(rest[0]) if rest else None
        if batch is None or batch.api != "openai":
            raise WireError(
                404, "invalid_request_error", f"No such Batch: {rest[0] if rest else ''}"
            )
        if method == "GET" and len(rest) == 1:
            return web.json_response(self._openai_object(batch))
        if method == "POST" and rest[1:] == ["cancel"]:
            self._cancel(batch)
            return web.json_response(self._openai_object(batch))
        raise WireError(404, "invalid_request_error", f"no route {method} {request.path}")

    async def _openai_create(self, request: web.BaseRequest) -> web.Response:
        data = json_object(await request.read())
        file_id = data.get("input_file_id")
        endpoint = data.get("endpoint")
        window = data.get("completion_window")
        if endpoint not in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings"):
            raise WireError(400, "invalid_request_error", f"endpoint: unsupported {endpoint!r}")
        if window != "24h":
            raise WireError(400, "invalid_request_error", "completion_window: must be '24h'")
        file = self.files.get(str(file_id))
        if file is None:
            raise WireError(400, "invalid_request_error", f"input_file_id: no file {file_id!r}")
        metadata = data.get("metadata")
        now = self._now()
        batch = _Batch(
            "openai",
            self._new_id("batch_"),
            [],
            now,
            self._wall(now),
            input_file_id=file.ident,
            endpoint=str(endpoint),
            window=window,
            metadata=dict(metadata) if isinstance(metadata, dict) else None,
        )
        lines, errors = self._openai_lines(file.data, str(endpoint))
        if errors:
            batch.status = "failed"
            batch.ended_at = now
            batch.errors = errors
        else:
            batch.lines = lines
            self._submitted(lines, "openai")
        self.batches[batch.ident] = batch
        return web.json_response(self._openai_object(batch))

    def _openai_lines(self, data: bytes, endpoint: str) -> tuple[list[_Line], list[dict[str, Any]]]:
        """Validate an input file as the API does; errors make the batch ``failed``."""
        max_requests, _ = self.config.limits("openai")
        lines: list[_Line] = []
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
            lines.append(_Line(custom_id, body))
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

    def _openai_object(self, batch: _Batch) -> dict[str, Any]:
        self._advance(batch)
        now = self._now()
        config = self.config
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
            return None if t is None else int(self._wall(t))

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

    def _cancel(self, batch: _Batch) -> None:
        self._advance(batch)
        if batch.ended_at is None and batch.cancel_at is None:
            self.cancels += 1
            batch.cancel_at = self._now()
            self._advance(batch)

    # -- Anthropic ----------------------------------------------------------------

    async def _anthropic(
        self, request: web.BaseRequest, method: str, rest: list[str]
    ) -> web.StreamResponse:
        if method == "POST" and not rest:
            return await self._anthropic_create(request)
        batch = self.batches.get(rest[0]) if rest else None
        if batch is None or batch.api != "anthropic":
            raise WireError(404, "not_found_error", f"No such message batch: {rest[:1]}")
        if method == "GET" and len(rest) == 1:
            return web.json_response(self._anthropic_object(batch))
        if method == "POST" and rest[1:] == ["cancel"]:
            self._cancel(batch)
            return web.json_response(self._anthropic_object(batch))
        if method == "GET" and rest[1:] == ["results"]:
            self._advance(batch)
            if batch.ended_at is None:
                raise WireError(
                    400, "invalid_request_error", f"Message Batch {batch.ident} has not ended"
                )
            return web.Response(
                body=self._anthropic_results(batch), content_type="application/binary"
            )
        raise WireError(404, "not_found_error", f"no route {method} {request.path}")

    async def _anthropic_create(self, request: web.BaseRequest) -> web.Response:
        max_requests, max_bytes = self.config.limits("anthropic")
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
        lines: list[_Line] = []
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
            lines.append(_Line(custom_id, params))
        now = self._now()
        batch = _Batch("anthropic", self._new_id("msgbatch_"), lines, now, self._wall(now))
        self.batches[batch.ident] = batch
        self._submitted(lines, "anthropic")
        return web.json_response(self._anthropic_object(batch))

    def _anthropic_object(self, batch: _Batch) -> dict[str, Any]:
        self._advance(batch)
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
        root = self.server.root
        return {
            "id": batch.ident,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": _rfc3339(self._wall(batch.ended_at)) if batch.ended_at else None,
            "created_at": _rfc3339(batch.created_wall),
            "expires_at": _rfc3339(batch.created_wall + _DAY),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(self._wall(batch.cancel_at))
            if batch.cancel_at is not None
            else None,
            "results_url": f"{root}/v1/messages/batches/{batch.ident}/results" if ended else None,
        }

    def _anthropic_results(self, batch: _Batch) -> bytes:
        out: list[bytes] = []
        for line in batch.lines:
            if line.result is not None:
                out.append(line.result)
                if line.ok and self.config.duplicate_lines:
                    out.append(line.result)
            else:
                kind = line.ended or "canceled"
                out.append(_dumps({"custom_id": line.custom_id, "result": {"type": kind}}).encode())
        out.extend(self._extra())
        return b"\n".join(out) + b"\n"


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


def _err(code: str, line: int | None, message: str) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": None}


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
