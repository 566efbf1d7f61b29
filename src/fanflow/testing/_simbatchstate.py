"""The batches and files of one SimServer, and their processing by the server's clock.

A batch's state is a pure function of the clock: request *i* of *n* is processed at
``created + (i + 1) / n * SimBatches.time`` (after validation), whenever the batch is
next looked at, so no background task runs. Each request is answered as the chat
endpoints would answer it (same reply, model check, prompt cache and faults), free of
the limits, into its result line.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._simchat import ChatDesk
from ._simwire import Api, WireError, anthropic_body, error_body, openai_body, parse_request

__all__ = ["Batch", "BatchState", "File", "Line", "SimBatches", "dumps"]

dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: Documented per-batch limits (requests, bytes of the input file or request body).
OPENAI_LIMITS = (50_000, 200 * 1024 * 1024)
ANTHROPIC_LIMITS = (100_000, 256 * 1024 * 1024)

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

OPERATIONS = ("upload", "create", "poll", "results", "cancel")
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
            if op not in OPERATIONS:
                raise ValueError(f"unknown batch operation {op!r}; use {', '.join(OPERATIONS)}")
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
class Line:
    custom_id: str
    body: dict[str, Any]
    result: bytes | None = None  # the output line once processed
    ok: bool = False
    ended: str | None = None  # "expired" | "canceled" when it was never processed


@dataclass(slots=True)
class Batch:
    api: Api
    ident: str
    lines: list[Line]
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
class File:
    ident: str
    filename: str
    purpose: str
    data: bytes
    created_wall: float


class BatchState:
    """The batches and files of one SimServer; ``chat`` answers their requests and
    ``root`` gives the server's root URL."""

    def __init__(self, chat: ChatDesk, config: SimBatches, root: Callable[[], str]) -> None:
        self.chat = chat
        self.config = config
        self.root = root
        self.batches: dict[str, Batch] = {}
        self.files: dict[str, File] = {}
        self._ids = itertools.count()

    @staticmethod
    def now() -> float:
        """The server loop's time (the batch endpoints run on it)."""
        return asyncio.get_running_loop().time()

    def wall(self, at: float) -> float:
        """The Unix time of a server loop time (for the objects' timestamps)."""
        return time.time() + (at - self.now())

    def new_id(self, prefix: str) -> str:
        return f"{prefix}sim{next(self._ids)}"

    def add_file(self, name: str, data: bytes, purpose: str = "batch_output") -> str:
        ident = self.new_id("file-")
        self.files[ident] = File(ident, name, purpose, data, time.time())
        return ident

    def submitted(self, batch: Batch) -> None:
        """Keep a new batch and count its requests (per prompt too)."""
        self.batches[batch.ident] = batch
        c = self.chat.counters
        c.batches += 1
        c.batch_requests += len(batch.lines)
        for line in batch.lines:
            try:
                prompt = parse_request(batch.api, dumps(line.body).encode(), 0).prompt
            except WireError:
                prompt = ""
            c.batch_prompts[prompt] = c.batch_prompts.get(prompt, 0) + 1

    def cancel(self, batch: Batch) -> None:
        self.advance(batch)
        if batch.ended_at is None and batch.cancel_at is None:
            self.chat.counters.batch_cancels += 1
            batch.cancel_at = self.now()
            self.advance(batch)

    def advance(self, batch: Batch) -> None:
        """Bring ``batch`` up to the server's current time."""
        if batch.ended_at is not None:
            return
        now = self.now()
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

    def _process(self, batch: Batch, line: Line, at: float) -> None:
        """Answer ``line``, processed at ``at`` (server time; its prompt cache entries
        are readable by the lines processed after it)."""
        chat = self.chat
        api = batch.api
        index = chat.counters.batch_requests  # only for SimRequest.index
        try:
            sim = parse_request(api, dumps(line.body).encode(), index, self.now())
        except WireError as exc:
            line.result = self._line_error(batch, line, exc.status, exc.message)
            return
        fault = chat.faults.draw(sim)
        if fault is not None:
            chat.counters.fault(fault)
        if fault == "malformed":
            line.result = b'{"custom_id": "' + line.custom_id.encode() + b'", "respo'
            return
        if fault is not None:
            status, message = _LINE_ERRORS[fault]
            line.result = self._line_error(batch, line, status, message)
            return
        if chat.models is not None and sim.model not in chat.models:
            message = f"The model `{sim.model}` does not exist or you do not have access."
            line.result = self._line_error(batch, line, 404, message)
            return
        done = chat.reply_to(sim)
        if chat.cache is not None:
            done = chat.cached(sim, done, at, at)
        chat.counters.tokens_in += done.input_tokens
        chat.counters.tokens_out += done.output_tokens
        chat.counters.completed(sim)
        ident = self.new_id("")
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
        line.result = dumps(out).encode()
        line.ok = True

    def _line_error(self, batch: Batch, line: Line, status: int, message: str) -> bytes:
        body = json.loads(error_body(batch.api, status, message))
        if batch.api == "openai":
            ident = self.new_id("")
            out: dict[str, Any] = {
                "id": f"batch_req_{ident}",
                "custom_id": line.custom_id,
                "response": {"status_code": status, "request_id": f"req_{ident}", "body": body},
                "error": None,
            }
        else:
            out = {"custom_id": line.custom_id, "result": {"type": "errored", "error": body}}
        return dumps(out).encode()

    def _end(self, batch: Batch, status: str, at: float) -> None:
        batch.status = status
        batch.ended_at = at
        ended = {"cancelled": "canceled"}.get(status, status)
        for line in batch.lines:
            if line.result is None:
                line.ended = ended
        if batch.api == "openai":
            ok, bad = self._openai_files(batch)
            if ok:
                batch.output_file_id = self.add_file(f"{batch.ident}_output.jsonl", ok)
            if bad:
                batch.error_file_id = self.add_file(f"{batch.ident}_error.jsonl", bad)

    def _openai_files(self, batch: Batch) -> tuple[bytes, bytes]:
        """The output and error files of an ended OpenAI batch."""
        ok: list[bytes] = []
        bad: list[bytes] = []
        for line in batch.lines:
            if line.result is not None:
                (ok if line.ok else bad).append(line.result)
                if line.ok and self.config.duplicate_lines:
                    ok.append(line.result)
            elif line.ended == "expired":
                bad.append(self._openai_expired(line))
        for i in range(self.config.unknown_lines):
            ok.append(
                dumps(
                    {
                        "id": self.new_id("batch_req_"),
                        "custom_id": f"nobody-sent-this-{i}",
                        "response": {"status_code": 200, "request_id": "req_x", "body": {}},
                        "error": None,
                    }
                ).encode()
            )
        return b"\n".join(ok) + (b"\n" if ok else b""), b"\n".join(bad) + (b"\n" if bad else b"")

    def _openai_expired(self, line: Line) -> bytes:
        error = {
            "message": "This request could not be executed before the completion window expired.",
            "type": "invalid_request_error",
            "param": None,
            "code": "batch_expired",
        }
        ident = self.new_id("batch_req_")
        response = {"status_code": 400, "request_id": self.new_id("req_"), "body": {"error": error}}
        return dumps(
            {"id": ident, "custom_id": line.custom_id, "response": response, "error": None}
        ).encode()

    def anthropic_results(self, batch: Batch) -> bytes:
        """The results file of an ended Anthropic batch."""
        out: list[bytes] = []
        for line in batch.lines:
            if line.result is not None:
                out.append(line.result)
                if line.ok and self.config.duplicate_lines:
                    out.append(line.result)
            else:
                kind = line.ended or "canceled"
                out.append(dumps({"custom_id": line.custom_id, "result": {"type": kind}}).encode())
        for i in range(self.config.unknown_lines):
            extra = {"custom_id": f"nobody-sent-this-{i}", "result": {"type": "canceled"}}
            out.append(dumps(extra).encode())
        return b"\n".join(out) + b"\n"
