"""A fanflow job in the application's OpenTelemetry traces (offline, SimServer).

    python examples/otel_traces.py

Needs the OpenTelemetry SDK (``pip install 'fanflow[otel]' opentelemetry-sdk``; the dev
extra has it). The application sets up its tracer provider as usual (here one that keeps
spans in memory; in production an OTLP exporter to Jaeger, Tempo, Honeycomb, Langfuse...),
then ``fanflow.otel.instrument()``: every pattern reports through it. One item hits a
429 and is retried: its chat span has one child span per attempt.
"""

from __future__ import annotations

import asyncio

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import fanflow
import fanflow.otel
from fanflow.testing import SimServer


def show(spans: tuple[ReadableSpan, ...]) -> None:
    """Print the spans as a tree, each with a few of its attributes."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            a = span.attributes or {}
            keys = ("fanflow.item.index", "gen_ai.usage.output_tokens", "error.type")
            shown = ", ".join(f"{k}={a[k]}" for k in keys if k in a)
            print(f"{'  ' * depth}{span.name}  {shown}")
            walk(span.context.span_id, depth + 1)

    walk(None, 0)


async def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the application's own setup
    fanflow.otel.instrument()  # fanflow reports through the global providers

    tracer = trace.get_tracer("my-app")
    async with SimServer(fault_on={"sky": ["429"]}) as server:
        llm = fanflow.openai("gpt-4o-mini", base_url=server.url, api_key="sk-offline")
        async with llm:
            with tracer.start_as_current_span("nightly job"):
                await fanflow.map(llm, "One word for: {input}", ["sea", "sky", "sun"])
    show(exporter.get_finished_spans())


if __name__ == "__main__":
    asyncio.run(main())
