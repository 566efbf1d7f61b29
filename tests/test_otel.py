"""fanflow.otel: GenAI spans and metrics, checked with the real OpenTelemetry SDK.

SimServer answers over loopback HTTP on looptime's virtual clock; the SDK's in-memory
span exporter and metric reader hold what fanflow reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import fanflow
import fanflow.otel
from fanflow import RetryPolicy
from fanflow.testing import SimBatches, SimServer

pytestmark = pytest.mark.looptime

KEY = "sk-otel-test-9d2c4e6a8b1f3057"
WRONG = "sk-wrong-otel-key-7e5d3c1b9a2f4068"
PROMPT = "a very private prompt about item 7"


class Telemetry:
    """An SDK tracer and meter provider that keep everything in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = self.exporter.get_finished_spans()
        return [s for s in spans if name is None or s.name == name]

    def metrics(self) -> dict[str, list[Any]]:
        """Metric name -> its data points."""
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out

    def dump(self) -> str:
        """Every span and metric as text, to search for what must not be there."""
        spans = "\n".join(s.to_json() for s in self.spans())
        data = self.reader.get_metrics_data()
        return spans + (data.to_json() if data is not None else "")


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    fanflow.otel.instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    try:
        yield t
    finally:
        fanflow.otel.uninstrument()


def _openai(server: SimServer, **kwargs: Any) -> fanflow.BaseLLM:
    return fanflow.openai("m", base_url=server.url, api_key=KEY, **kwargs)


async def test_a_map_gives_one_chat_span_per_item_under_its_span_under_the_apps(
    telemetry: Telemetry,
) -> None:
    app = telemetry.tracer_provider.get_tracer("app")
    async with SimServer(api_key=KEY) as server, _openai(server) as llm:
        with app.start_as_current_span("job") as job:
            result = await fanflow.map(
                llm, "{input}", ["a", "b", "c", "d"], temperature=0.25, max_tokens=50
            )
    assert list(result.status.values()) == [fanflow.Status.SUCCEEDED] * 4
    [run] = telemetry.spans("fanflow.map")
    assert run.parent is not None
    assert run.parent.span_id == job.get_span_context().span_id
    chats = telemetry.spans("chat m")
    assert len(chats) == 4
    assert {s.context.trace_id for s in chats} == {job.get_span_context().trace_id}
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id for s in chats)
    assert sorted(s.attributes["fanflow.item.index"] for s in chats) == [0, 1, 2, 3]
    for span in chats:
        a = span.attributes
        assert span.kind is SpanKind.CLIENT
        assert span.status.status_code is StatusCode.UNSET
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "openai"
        assert "gen_ai.system" not in a
        assert a["gen_ai.request.model"] == "m"
        assert a["gen_ai.request.temperature"] == 0.25
        assert a["gen_ai.request.max_tokens"] == 50
        assert a["server.address"] == "127.0.0.1"
        assert a["server.port"] == server.port
        assert a["gen_ai.response.model"] == "m"
        assert str(a["gen_ai.response.id"]).startswith("chatcmpl-")
        assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
        assert a["gen_ai.usage.input_tokens"] > 0
        assert a["gen_ai.usage.output_tokens"] > 0
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= span.end_time
        assert not [e for e in span.events if e.name == "exception"]
    # Nothing of the prompt or the answer by default.
    assert "echo: " not in telemetry.dump()
    assert '"a"' not in json.dumps([dict(s.attributes or {}) for s in chats])


async def test_a_failing_call_has_error_type_and_an_error_status(telemetry: Telemetry) -> None:
    async with (
        SimServer(api_key=KEY, fault_on={"bad": "500"}) as server,
        _openai(server, retry=RetryPolicy(attempts=2)) as llm,
    ):
        result = await fanflow.map(llm, "{input}", ["fine", "bad"])
    assert list(result.status.values()) == [fanflow.Status.SUCCEEDED, fanflow.Status.FAILED]
    [bad] = [s for s in telemetry.spans("chat m") if s.attributes["fanflow.item.index"] == 1]
    assert bad.attributes["error.type"] == "ServerError"
    assert bad.attributes["fanflow.status"] == "failed"
    assert bad.status.status_code is StatusCode.ERROR
    assert bad.status.description == "ServerError (HTTP 500)"
    [ok] = [s for s in telemetry.spans("chat m") if s.attributes["fanflow.item.index"] == 0]
    assert "error.type" not in ok.attributes
    [failed] = [
        p
        for p in telemetry.metrics()["gen_ai.client.operation.duration"]
        if "error.type" in p.attributes
    ]
    assert failed.attributes["error.type"] == "ServerError"
    assert failed.count == 1


async def test_a_retried_call_shows_each_attempt_as_a_child_span(telemetry: Telemetry) -> None:
    async with (
        SimServer(api_key=KEY, fault_on={"flaky": ["500", "429"]}) as server,
        _openai(server, retry=RetryPolicy(attempts=4), limits=fanflow.Limits()) as llm,
    ):
        response = await fanflow.call(llm, "flaky item")
    assert response.text == "echo: flaky item"
    [chat] = telemetry.spans("chat m")
    assert chat.attributes["fanflow.attempts"] == 3
    attempts = sorted(
        (s for s in telemetry.spans() if s.name.startswith("attempt ")),
        key=lambda s: s.attributes["fanflow.attempt.number"],
    )
    assert [s.name for s in attempts] == ["attempt 1", "attempt 2", "attempt 3"]
    assert all(s.parent is not None and s.parent.span_id == chat.context.span_id for s in attempts)
    assert [s.attributes.get("error.type") for s in attempts] == [
        "ServerError",
        "RateLimited",
        None,
    ]
    assert [s.attributes["fanflow.attempt.status"] for s in attempts] == [
        "failed",
        "failed",
        "succeeded",
    ]
    # The second and third waited (a backoff, then the Retry-After) before they went.
    assert attempts[1].attributes["fanflow.attempt.wait_before"] > 0
    assert attempts[2].attributes["fanflow.attempt.wait_before"] > 0
    metrics = telemetry.metrics()
    assert sum(p.value for p in metrics["fanflow.client.rate_limited"]) == 1
    # A single-attempt call has no attempt spans (its chat span is the attempt).
    assert chat.status.status_code is StatusCode.UNSET


async def test_no_key_and_no_prompt_even_when_the_server_echoes_the_key(
    telemetry: Telemetry,
) -> None:
    async with (
        SimServer(api_key=KEY, echo_key="text") as server,
        fanflow.openai("m", base_url=server.url, api_key=WRONG) as llm,
    ):
        result = await fanflow.map(llm, "{q}", [{"q": PROMPT}])
    assert list(result.status.values()) == [fanflow.Status.FAILED]
    [chat] = telemetry.spans("chat m")
    assert chat.attributes["error.type"] == "AuthenticationError"
    text = telemetry.dump()
    for secret in (WRONG, WRONG[-8:], WRONG[:12], KEY, KEY[-8:]):
        assert secret not in text
    assert "private prompt" not in text
    assert "Authorization" not in text
    assert "Bearer" not in text


async def test_prompts_and_answers_only_when_the_application_opts_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = Telemetry()
    monkeypatch.setenv(fanflow.otel.CONTENT_ENV, "true")
    fanflow.otel.instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    try:
        async with SimServer(api_key=KEY) as server, _openai(server) as llm:
            await fanflow.map(llm, "{q}", [{"q": PROMPT}], system="be brief")
    finally:
        fanflow.otel.uninstrument()
    [chat] = t.spans("chat m")
    assert json.loads(str(chat.attributes["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}
    ]
    assert json.loads(str(chat.attributes["gen_ai.system_instructions"])) == [
        {"type": "text", "content": "be brief"}
    ]
    output = json.loads(str(chat.attributes["gen_ai.output.messages"]))
    assert output[0]["role"] == "assistant"
    assert output[0]["parts"][0]["content"].endswith(PROMPT)
    # capture_content=False wins over the environment.
    t2 = Telemetry()
    fanflow.otel.instrument(tracer_provider=t2.tracer_provider, capture_content=False)
    try:
        shout = fanflow.function(lambda request: request.prompt.upper())
        result = await fanflow.map(shout, "{q}", [{"q": PROMPT}])
    finally:
        fanflow.otel.uninstrument()
    assert result.outputs == [PROMPT.upper()]
    assert len(t2.spans("chat")) == 1
    assert PROMPT not in t2.dump()
    assert PROMPT.upper() not in t2.dump()


async def test_metrics_duration_tokens_in_flight_queue_wait_and_cost(
    telemetry: Telemetry,
) -> None:
    async with (
        SimServer(api_key=KEY) as server,
        fanflow.openai("gpt-4o-mini", base_url=server.url, api_key=KEY) as llm,
    ):
        result = await fanflow.map(llm, "{input}", ["a", "b", "c"], concurrency=1)
    metrics = telemetry.metrics()
    [duration] = metrics["gen_ai.client.operation.duration"]
    assert duration.count == 3
    assert duration.attributes["gen_ai.provider.name"] == "openai"
    assert duration.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    tokens = {p.attributes["gen_ai.token.type"]: p for p in metrics["gen_ai.client.token.usage"]}
    assert tokens["input"].sum == result.summary.usage.input_tokens
    assert tokens["output"].sum == result.summary.usage.output_tokens
    assert tokens["input"].count == 3
    [in_flight] = metrics["fanflow.client.in_flight"]
    assert in_flight.value == 0  # three started, three ended
    [queue] = metrics["fanflow.client.queue_wait"]
    assert queue.count == 3
    [cost] = metrics["fanflow.client.cost"]
    assert cost.value == pytest.approx(result.summary.cost)
    assert cost.value > 0


async def test_vote_fan_out_a_flow_best_of_n_and_gather_each_get_a_run_span(
    telemetry: Telemetry,
) -> None:
    llm = fanflow.function(lambda prompt: "yes")
    await fanflow.vote(llm, "agree?", n=3)
    await fanflow.fan_out(llm, "think", workers=2)
    flow = fanflow.Flow([fanflow.Step(fanflow.Skill(llm, "say {x}", name="s"), output="y")])
    await flow.arun({"x": "hi"})
    await fanflow.best_of_n(llm, "pick", n=2)
    await fanflow.gather(fanflow.call(llm, "one"), fanflow.call(llm, "two"))
    patterns = (("vote", 3), ("fan_out", 3), ("flow", 1), ("best_of_n", 3), ("gather", 2))
    for pattern, calls in patterns:
        [run] = telemetry.spans(f"fanflow.{pattern}")
        children = [
            s
            for s in telemetry.spans()
            if s.parent is not None and s.parent.span_id == run.context.span_id
        ]
        assert len(children) == calls, pattern
        assert all(s.name == "chat" and s.kind is SpanKind.CLIENT for s in children)
        assert all(s.attributes["gen_ai.provider.name"] == "fanflow.function" for s in children)


async def test_with_the_api_and_no_sdk_nothing_is_recorded_and_calls_work() -> None:
    fanflow.otel.instrument()  # the global providers: none set by this test
    try:
        result = await fanflow.map(fanflow.function(lambda prompt: "ok"), "{input}", ["x", "y"])
    finally:
        fanflow.otel.uninstrument()
    assert result.outputs == ["ok", "ok"]
    assert not trace.get_current_span().is_recording()


def test_without_instrument_fanflow_never_imports_opentelemetry() -> None:
    code = (
        "import asyncio, sys, fanflow\n"
        "llm = fanflow.function(lambda prompt: 'ok')\n"
        "r = asyncio.run(fanflow.map(llm, '{input}', ['a', 'b']))\n"
        "assert r.outputs == ['ok', 'ok']\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


async def test_calls_cancelled_by_fail_fast_end_their_spans_and_leave_none_in_flight(
    telemetry: Telemetry,
) -> None:
    async with (
        SimServer(api_key=KEY, fault_on={"bad": "quota", "slow": "hang"}) as server,
        _openai(server) as llm,
    ):
        with pytest.raises(fanflow.FanflowError):
            await fanflow.map(llm, "{input}", ["slow 1", "slow 2", "bad"], fail_fast=True)
    chats = {s.attributes["fanflow.status"]: s for s in telemetry.spans("chat m")}
    assert sorted(s.attributes["fanflow.status"] for s in telemetry.spans("chat m")) == [
        "cancelled",
        "cancelled",
        "failed",
    ]
    [run] = telemetry.spans("fanflow.map")
    assert chats["cancelled"].parent is not None
    assert chats["cancelled"].parent.span_id == run.context.span_id
    assert run.status.status_code is StatusCode.ERROR  # the run raised
    [in_flight] = telemetry.metrics()["fanflow.client.in_flight"]
    assert in_flight.value == 0


async def test_batch_mode_submission_and_polls_are_spans_and_items_link_to_their_batch(
    telemetry: Telemetry,
) -> None:
    async with SimServer(api_key=KEY, batches=SimBatches(time=30.0)) as server:
        llm = _openai(server)
        result = await fanflow.map(llm, "{input}", ["a", "b", "c"], mode="batch")
        await llm.aclose()
    assert result.outputs == ["echo: a", "echo: b", "echo: c"]
    batch_id = result.records[0].batch_id
    assert batch_id is not None
    [submit] = telemetry.spans("batch submit")
    assert submit.kind is SpanKind.CLIENT
    assert submit.attributes["fanflow.batch.id"] == batch_id
    assert submit.attributes["gen_ai.provider.name"] == "openai"
    polls = telemetry.spans("batch poll")
    assert polls
    assert {p.attributes["fanflow.batch.id"] for p in polls} == {batch_id}
    assert len(telemetry.spans("batch results")) == 1
    chats = telemetry.spans("chat m")
    assert len(chats) == 3
    for chat in chats:
        assert chat.attributes["fanflow.batch.id"] == batch_id
        assert [link.context.span_id for link in chat.links] == [submit.context.span_id]
    [run] = telemetry.spans("fanflow.map")
    assert submit.context.trace_id == run.context.trace_id


def test_without_the_extra_the_import_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "try:\n    import fanflow.otel\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'fanflow[otel]'" in out.stdout


async def test_cached_input_tokens_from_the_prompt_cache_are_on_the_chat_spans(
    telemetry: Telemetry,
) -> None:
    rules = "Label the review as positive or negative. " * 200  # well over 1,024 tokens
    items = [f"review {i}" for i in range(12)]  # primed: the first call goes alone
    async with (
        SimServer(api_key=KEY, latency=1.0, prompt_cache=True) as server,
        _openai(server) as llm,
    ):
        result = await fanflow.map(llm, "{input}", items, system=rules)
    assert result.ok
    chats = telemetry.spans("chat m")
    cached = [s.attributes.get("gen_ai.usage.cache_read.input_tokens", 0) for s in chats]
    read = [r.usage.cached_input_tokens for r in result.records]
    assert sorted(cached) == sorted(read)
    assert sum(1 for n in cached if n > 0) >= len(items) - 1  # all but the one that wrote it
