"""fanflow.otel over the wire: the SDK's OTLP/HTTP exporters post protobuf to a loopback
aiohttp receiver, which decodes it with opentelemetry-proto.

Real time (no looptime): the SDK's exporters run in their own threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import fanflow
import fanflow.otel
from fanflow.testing import SimServer

KEY = "sk-otel-wire-3b7d9f1a5c2e4068"


class Receiver:
    """An OTLP/HTTP collector stand-in: keeps each decoded export request."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.bodies: list[bytes] = []
        self.content_types: set[str] = set()

    async def on_traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        self.content_types.add(request.content_type)
        self.traces.append(ExportTraceServiceRequest.FromString(body))
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def on_metrics(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        self.metrics.append(ExportMetricsServiceRequest.FromString(body))
        reply = ExportMetricsServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def spans(self) -> list[Span]:
        return [
            span
            for request in self.traces
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def metric_names(self) -> set[str]:
        return {
            metric.name
            for request in self.metrics
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    got = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", got.on_traces)
    app.router.add_post("/v1/metrics", got.on_metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield got, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


async def test_spans_and_metrics_arrive_over_otlp_http(receiver: tuple[Receiver, str]) -> None:
    got, url = receiver
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{url}/v1/traces"))
    )
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{url}/v1/metrics"), export_interval_millis=3_600_000
    )
    meter_provider = MeterProvider(metric_readers=[reader])
    fanflow.otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        async with (
            SimServer(api_key=KEY) as server,
            fanflow.openai("m", base_url=server.url, api_key=KEY) as llm,
        ):
            result = await fanflow.map(llm, "{input}", ["a", "b", "c"])
        # The exporters post from their own threads; this loop serves the receiver.
        assert await asyncio.to_thread(tracer_provider.force_flush, 10_000)
        assert await asyncio.to_thread(meter_provider.force_flush, 10_000)
    finally:
        fanflow.otel.uninstrument()
        await asyncio.to_thread(tracer_provider.shutdown)
        await asyncio.to_thread(meter_provider.shutdown)
    assert result.outputs == ["echo: a", "echo: b", "echo: c"]
    assert got.content_types == {"application/x-protobuf"}
    spans = got.spans()
    chats = [s for s in spans if s.name == "chat m"]
    [run] = [s for s in spans if s.name == "fanflow.map"]
    assert len(chats) == 3
    assert all(s.kind == Span.SpanKind.SPAN_KIND_CLIENT for s in chats)
    assert all(s.parent_span_id == run.span_id and s.trace_id == run.trace_id for s in chats)
    attributes = {a.key: _value(a.value) for a in chats[0].attributes}
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "m"
    assert attributes["server.port"] == server.port
    assert int(str(attributes["gen_ai.usage.output_tokens"])) > 0
    names = got.metric_names()
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= names
    assert "fanflow.client.in_flight" in names
    assert not any(KEY.encode() in body or KEY[-8:].encode() in body for body in got.bodies)
