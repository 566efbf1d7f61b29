"""OpenTelemetry traces and metrics for fanflow's calls (the ``otel`` extra).

``fanflow.otel.instrument()`` makes every pattern report through the application's
tracer and meter providers (the global ones unless given): one CLIENT span ``chat
{model}`` per model call, following the OpenTelemetry GenAI semantic conventions
(:data:`SEMCONV_VERSION`), under one span per pattern run (``fanflow.map``, ...), which
is a child of the application's current span. A call tried more than once (retries,
requeued 429s, hedges) has one child span per attempt. Metrics: the conventions'
``gen_ai.client.operation.duration`` and ``gen_ai.client.token.usage``, and fanflow's
own under ``fanflow.client.`` (calls in flight, queue wait, 429/529 answers, cost).

No prompt or answer text is recorded unless ``capture_content=True`` or
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``; never a key or a header.
Importing :mod:`fanflow` imports none of this: only this module needs
``opentelemetry-api`` (decision 0185).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, TypeAlias
from urllib.parse import urlsplit

try:
    from opentelemetry import metrics, trace
    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TracerProvider
except ImportError:  # the extra is not installed: say how to install it
    raise ImportError(
        "fanflow.otel needs the OpenTelemetry API: pip install 'fanflow[otel]' (and your "
        "application's OpenTelemetry SDK and exporter)"
    ) from None

from ._batchinfo import batch_info
from ._events import INSTALLED, CallEnded, CallStarted, Event, endpoint_of
from ._exceptions import FanflowError, Overloaded, ProviderError, RateLimited
from ._types import Attempt, CallRecord, Request, Status
from ._version import __version__

__all__ = ["CONTENT_ENV", "SEMCONV_VERSION", "Instrumentation", "instrument", "uninstrument"]

#: The version of the OpenTelemetry semantic conventions the spans and metrics follow.
SEMCONV_VERSION = "1.40.0"
#: The conventions' switch for recording prompts and answers ("true" to opt in).
CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

#: A call started and not yet ended: its request, its model handle, when it started.
_Started: TypeAlias = tuple[Request, object, float]
# The calls started in the current pattern run and not yet ended, by _key.
_STARTED: ContextVar[dict[object, _Started] | None] = ContextVar(
    "fanflow_otel_started", default=None
)

_SCHEMA = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
# The conventions' advised bucket boundaries (seconds; tokens).
_DURATION_BUCKETS = [0.01 * 2**i for i in range(14)]
_TOKEN_BUCKETS = [4**i for i in range(14)]
# The batch machinery's words for its calls to the batch endpoints -> span names.
_BATCH_CALLS = {
    "submitting a batch": "submit",
    "polling a batch": "poll",
    "reading batch results": "results",
    "cancelling a batch": "cancel",
    "looking for a batch": "find",
}
# Request fields and the span attributes they go to.
_PARAMS = (
    ("temperature", "gen_ai.request.temperature"),
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("top_p", "gen_ai.request.top_p"),
    ("seed", "gen_ai.request.seed"),
)


def instrument(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    capture_content: bool | None = None,
) -> Instrumentation:
    """Report every pattern's calls from now on (replacing an earlier ``instrument``).

    Args:
        tracer_provider: where spans go (None: the global one, as set by the application;
            until it sets one, nothing is recorded).
        meter_provider: where metrics go (None: the global one).
        capture_content: record prompts and answers on the spans (None: as
            ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` says; off by default).
    """
    if capture_content is None:
        capture_content = os.environ.get(CONTENT_ENV, "").strip().lower() == "true"
    instrumentation = Instrumentation(tracer_provider, meter_provider, capture_content)
    INSTALLED[:] = [instrumentation]
    return instrumentation


def uninstrument() -> None:
    """Stop reporting (patterns started afterwards make no spans or metrics)."""
    INSTALLED.clear()


class Instrumentation:
    """Turns fanflow's events into spans and metrics (made by :func:`instrument`).

    It is a hook: pass it as ``hooks=[...]`` to report one pattern's calls only, without
    installing it for the process (its calls' spans then have no run span; and not
    both ways at once: installed, it already hears every pattern).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        capture_content: bool,
    ) -> None:
        self.capture_content = capture_content
        self._tracer = trace.get_tracer("fanflow", __version__, tracer_provider, _SCHEMA)
        meter = metrics.get_meter("fanflow", __version__, meter_provider, _SCHEMA)
        instruments = (
            ("gen_ai.client.operation.duration", "s", "GenAI operation duration"),
            ("gen_ai.client.token.usage", "{token}", "Number of input and output tokens used"),
            ("fanflow.client.queue_wait", "s", "Time from a call's start to its first send"),
        )
        self._duration, self._tokens, self._queue_wait = (
            meter.create_histogram(
                name,
                unit=unit,
                description=text,
                explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS
                if unit == "{token}"
                else _DURATION_BUCKETS,
            )
            for name, unit, text in instruments
        )
        # Calls in flight by target (its attribute values -> [attributes, count]): counted
        # here, observed when the metrics are collected (cheaper than two adds per call).
        self._active: dict[tuple[Any, ...], list[Any]] = {}
        meter.create_observable_up_down_counter(
            "fanflow.client.in_flight",
            callbacks=[self._observe_in_flight],
            unit="{call}",
            description="Calls started, not ended",
        )
        self._rate_limited = meter.create_counter(
            "fanflow.client.rate_limited",
            unit="{response}",
            description="Attempts answered 429 (rate limited) or 529 (overloaded)",
        )
        self._cost = meter.create_counter(
            "fanflow.client.cost", unit="{USD}", description="What the calls cost, in dollars"
        )
        self._targets: dict[int, tuple[object, dict[str, Any]]] = {}
        self._loose: dict[object, _Started] = {}
        # The submission span of each batch this process created, for its items' links.
        self._batches: dict[str, SpanContext] = {}  # calls started outside any pattern run

    def __repr__(self) -> str:
        return f"fanflow.otel.Instrumentation(capture_content={self.capture_content})"

    # -- the hook ---------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        if type(event) is CallStarted:
            request = event.request
            started = _STARTED.get()
            if started is None:
                started = self._loose
                if len(started) > 100_000:  # calls cancelled outside any pattern run
                    started.clear()
            started[_key(event.index, event.label, request)] = (request, event.llm, event.time)
            self._count(self._target(event.llm, request), 1)
        elif type(event) is CallEnded:
            record = event.record
            ended = record.request
            if ended is None or record.cached:
                return  # a store hit or an item whose request could not be built
            self._ended(record, ended)

    def _ended(self, record: CallRecord[Any], request: Request) -> None:
        started = _STARTED.get()
        key = _key(record.index, record.label, request)
        entry = (self._loose if started is None else started).pop(key, None)
        llm = entry[1] if entry is not None else None
        target = self._target(llm, request)
        if entry is not None:
            self._count(target, -1)
        self._report(record, request, target)

    def _count(self, target: dict[str, Any], change: int) -> None:
        key = tuple(target.values())
        entry = self._active.get(key)
        if entry is None:
            entry = self._active[key] = [target, 0]
        entry[1] += change

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, target) for target, count in list(self._active.values())]

    def _target(self, llm: object, request: Request) -> dict[str, Any]:
        """The attributes naming where a call goes: operation, provider, model, server."""
        known = self._targets.get(id(llm))
        if known is None or known[0] is not llm:
            known = (llm, _target_of(llm))
            if len(self._targets) > 1000:  # handles made and dropped: forget the old ones
                self._targets.clear()
            self._targets[id(llm)] = known
        model = request.model
        if model is None:
            return known[1]
        return {**known[1], "gen_ai.request.model": model}

    # -- spans and metrics of one call ------------------------------------------------

    def _report(self, record: CallRecord[Any], request: Request, target: dict[str, Any]) -> None:
        ns = _clock()
        start = record.start if record.start is not None else 0.0
        end = record.end if record.end is not None else start
        model = request.model
        links = None
        response = record.response
        info = batch_info(response.extra) if response is not None else None
        if info is not None:
            batch = self._batches.get(info.batch_id)
            links = [Link(batch)] if batch is not None else None
        span = self._tracer.start_span(
            f"chat {model}" if model else "chat",
            kind=SpanKind.CLIENT,
            attributes=target,
            links=links,
            start_time=ns(start),
        )
        error = record.error if record.status is not Status.SUCCEEDED else None
        if span.is_recording():
            span.set_attributes(self._call_attributes(record, request))
            attempts = record.attempts
            if len(attempts) > 1:
                parent = trace.set_span_in_context(span)
                for attempt in attempts:
                    self._attempt_span(attempt, parent, ns)
            if error is not None:
                span.set_attribute("error.type", _error_type(error))
                span.set_status(StatusCode.ERROR, _describe(error, self.capture_content))
        span.end(end_time=ns(end))
        self._measure(record, target, error, end - start)

    def _call_attributes(self, record: CallRecord[Any], request: Request) -> dict[str, Any]:
        out: dict[str, Any] = {"fanflow.status": str(record.status)}
        for field, name in _PARAMS:
            value = getattr(request, field)
            if value is not None:
                out[name] = value
        if request.stop:
            out["gen_ai.request.stop_sequences"] = list(request.stop)
        if request.response_format is not None:
            out["gen_ai.output.type"] = "json"
        if record.index is not None:
            out["fanflow.item.index"] = record.index
        if record.label is not None:
            out["fanflow.label"] = record.label
        out["fanflow.attempts"] = len(record.attempts)
        if record.attempts:
            out["fanflow.queue_wait"] = max(0.0, record.attempts[0].start - (record.start or 0.0))
        if record.cost is not None:
            out["fanflow.cost"] = record.cost
        response = record.response
        if response is not None:
            if response.model:
                out["gen_ai.response.model"] = response.model
            if response.finish_reason:
                out["gen_ai.response.finish_reasons"] = [response.finish_reason]
            usage = response.usage
            if usage.total_tokens > 0 and not usage.estimated:
                out["gen_ai.usage.input_tokens"] = usage.input_tokens
                out["gen_ai.usage.output_tokens"] = usage.output_tokens
            out.update(_raw_attributes(response.raw))
            info = batch_info(response.extra)
            if info is not None:
                out["fanflow.batch.id"] = info.batch_id
        if self.capture_content:
            out.update(_content(request, response.text if response is not None else None))
        return out

    def _attempt_span(self, attempt: Attempt, parent: Context, ns: Callable[[float], int]) -> None:
        attributes: dict[str, Any] = {
            "fanflow.attempt.number": attempt.number,
            "fanflow.attempt.status": str(attempt.status),
            "fanflow.attempt.hedge": attempt.hedge,
            "fanflow.attempt.requeued": attempt.requeued,
            "fanflow.attempt.wait_before": attempt.wait_before,
        }
        if attempt.note is not None:
            attributes["fanflow.attempt.note"] = attempt.note
        span = self._tracer.start_span(
            f"attempt {attempt.number}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=ns(attempt.start),
        )
        if attempt.error is not None:
            span.set_attribute("error.type", _error_type(attempt.error))
            span.set_status(StatusCode.ERROR, _describe(attempt.error, self.capture_content))
        span.end(end_time=ns(attempt.end))

    def _measure(
        self,
        record: CallRecord[Any],
        target: dict[str, Any],
        error: BaseException | None,
        duration: float,
    ) -> None:
        attempts = record.attempts
        if not attempts:
            return  # never sent (budget, breaker, deadline): no operation to measure
        response = record.response
        attributes = target
        if error is not None or (response is not None and response.model):
            attributes = dict(target)
            if error is not None:
                attributes["error.type"] = _error_type(error)
            if response is not None and response.model:
                attributes["gen_ai.response.model"] = response.model
        self._duration.record(duration, attributes)
        usage = record.usage
        if usage.total_tokens > 0 and not usage.estimated:
            self._tokens.record(usage.input_tokens, {**attributes, "gen_ai.token.type": "input"})
            self._tokens.record(usage.output_tokens, {**attributes, "gen_ai.token.type": "output"})
        self._queue_wait.record(max(0.0, attempts[0].start - (record.start or 0.0)), target)
        limited = sum(isinstance(a.error, RateLimited | Overloaded) for a in attempts)
        if limited:
            self._rate_limited.add(limited, target)
        if record.cost is not None:
            self._cost.add(record.cost, target)

    # -- pattern runs -----------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, pattern: str, index: int | None) -> Iterator[object]:
        """The span of one pattern run, current while it runs (its calls' parent)."""
        attributes: dict[str, Any] = {"fanflow.pattern": pattern}
        if index is not None:
            attributes["fanflow.item.index"] = index
        started: dict[object, _Started] = {}
        token = _STARTED.set(started)
        try:
            with self._tracer.start_as_current_span(
                f"fanflow.{pattern}", kind=SpanKind.INTERNAL, attributes=attributes
            ) as span:
                try:
                    yield span
                finally:
                    self._end_cancelled(started)
        finally:
            _STARTED.reset(token)

    @contextlib.contextmanager
    def batch(
        self, what: str, provider: str, batch_id: str | None
    ) -> Iterator[Callable[[str], None]]:
        """The span of one call to a provider's batch endpoints (submit, poll, ...)."""
        attributes: dict[str, Any] = {"gen_ai.provider.name": provider}
        if batch_id is not None:
            attributes["fanflow.batch.id"] = batch_id
        with self._tracer.start_as_current_span(
            f"batch {_BATCH_CALLS.get(what, what)}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:

            def created(new_id: str) -> None:
                span.set_attribute("fanflow.batch.id", new_id)
                if len(self._batches) > 10_000:
                    self._batches.clear()
                self._batches[new_id] = span.get_span_context()

            try:
                yield created
            except Exception as exc:
                span.set_attribute("error.type", _error_type(exc))
                span.set_status(StatusCode.ERROR, _describe(exc, self.capture_content))
                raise

    def _end_cancelled(self, started: dict[object, _Started]) -> None:
        """End the spans of calls that were cancelled (the engine reports no end for
        them): started in this run, not ended when it ends."""
        if not started:
            return
        ns = _clock()
        end = ns(asyncio.get_running_loop().time())
        for request, llm, at in started.values():
            target = self._target(llm, request)
            self._count(target, -1)
            model = request.model
            span = self._tracer.start_span(
                f"chat {model}" if model else "chat",
                kind=SpanKind.CLIENT,
                attributes={**target, "fanflow.status": str(Status.CANCELLED)},
                start_time=ns(at),
            )
            span.end(end_time=end)
        started.clear()


def _key(index: int | None, label: str | None, request: Request) -> object:
    """Which call an event is about: its item and label in a pattern (unique there, and
    the same for events that crossed from a Ray worker), else the request object."""
    return id(request) if index is None else (index, label)


def _clock() -> Callable[[float], int]:
    """A function from event-loop time to wall-clock nanoseconds, as of now."""
    now_ns = time.time_ns()
    try:
        now = asyncio.get_running_loop().time()
    except RuntimeError:  # pragma: no cover - hooks run on the loop
        now = time.monotonic()

    def ns(t: float) -> int:
        return now_ns - int((now - t) * 1e9)

    return ns


def _target_of(llm: object) -> dict[str, Any]:
    endpoint = endpoint_of(llm)
    out: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": endpoint.provider,
    }
    if endpoint.base_url is not None:
        try:
            parts = urlsplit(endpoint.base_url)
            port = parts.port
        except ValueError:
            return out
        if parts.hostname:
            out["server.address"] = parts.hostname
            out["server.port"] = port or (443 if parts.scheme == "https" else 80)
    return out


def _raw_attributes(raw: object) -> dict[str, Any]:
    """The response id and cached input tokens from the API's JSON (when it has them)."""
    if not isinstance(raw, Mapping):
        return {}
    out: dict[str, Any] = {}
    ident = raw.get("id")
    if isinstance(ident, str):
        out["gen_ai.response.id"] = ident
    usage = raw.get("usage")
    if isinstance(usage, Mapping):
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        if cached is None:
            cached = usage.get("cache_read_input_tokens")  # Anthropic's name
        if isinstance(cached, int) and not isinstance(cached, bool):
            out["gen_ai.usage.cache_read.input_tokens"] = cached
    return out


def _error_type(error: BaseException) -> str:
    cls = type(error)
    if isinstance(error, FanflowError) or cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(error: BaseException, content: bool) -> str:
    """The span status's description: the error's class, and its message only when
    content is captured (a server's message may quote the prompt; keys never appear in
    fanflow's messages)."""
    status = error.status_code if isinstance(error, ProviderError) else None
    head = _error_type(error) if status is None else f"{_error_type(error)} (HTTP {status})"
    return f"{head}: {error}" if content else head


def _content(request: Request, answer: str | None) -> dict[str, str]:
    """The prompt and the answer, as the conventions' JSON attributes."""

    def parts(text: str) -> list[dict[str, str]]:
        return [{"type": "text", "content": text}]

    system = [m for m in request.messages if m.role == "system"]
    others: Sequence[Any] = [m for m in request.messages if m.role != "system"]
    out = {
        "gen_ai.input.messages": json.dumps(
            [{"role": m.role, "parts": parts(m.content)} for m in others]
        )
    }
    if system:
        out["gen_ai.system_instructions"] = json.dumps(
            [p for m in system for p in parts(m.content)]
        )
    if answer is not None:
        out["gen_ai.output.messages"] = json.dumps([{"role": "assistant", "parts": parts(answer)}])
    return out
