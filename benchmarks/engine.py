"""Engine benchmarks (issue 2), printed as ratios against baselines measured in this run.

    python benchmarks/engine.py [--quick]

1. CPU per call: fanflow.map over a zero-latency async function vs a bare
   asyncio.Semaphore + gather loop over the same function (target: <= 3x).
2. 10,000 calls in flight with 1 s latency: makespan / 1 s (target: <= 1.10).
3. 1,000,000 items through as_completed from a generator: resident memory after 10% of
   the items vs at the end (target: flat, ratio ~1.0).
4. With ``--lanes``: CPU per call of fanflow.map with no limits and with the handle's
   ``Limits(concurrency=100, rpm=...)`` (an rpm that never binds: the bucket work only),
   against the bare loop, best of 5 interleaved rounds; and the lane alone (``acquire``
   + ``finish`` in a loop, no engine) with each.
5. With ``--otel`` (needs the SDK: the dev extra): CPU per call of fanflow.map with
   tracing off, with fanflow.otel.instrument() and only the API (no SDK: nothing
   recorded), and with the SDK keeping spans and metrics in memory (decision 0185).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from collections.abc import Iterator

import fanflow
import fanflow.limits


async def _zero(request: fanflow.Request) -> str:
    return "ok"


async def _bare_zero(item: int) -> str:
    return "ok"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def bare_loop(n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with sem:
            return await _bare_zero(i)

    start = time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.process_time() - start


async def fanflow_map(
    n: int, concurrency: int | None, limits: fanflow.Limits | None = None
) -> float:
    llm = fanflow.function(_zero, limits=limits)
    start = time.process_time()
    result = await fanflow.map(llm, "{input}", range(n), concurrency=concurrency)
    elapsed = time.process_time() - start
    assert result.summary.succeeded == n
    return elapsed


async def in_flight(n: int, latency: float) -> float:
    async def slow(request: fanflow.Request) -> str:
        await asyncio.sleep(latency)
        return "ok"

    llm = fanflow.function(slow)
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await fanflow.map(llm, "{input}", range(n), concurrency=n)
    assert result.ok
    return loop.time() - start


async def bare_in_flight(n: int, latency: float) -> float:
    async def one(i: int) -> str:
        await asyncio.sleep(latency)
        return "ok"

    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(one(i) for i in range(n)))
    return loop.time() - start


async def streamed_memory(n: int) -> tuple[float, float, int]:
    def items() -> Iterator[int]:
        yield from range(n)

    llm = fanflow.function(_zero)
    early = 0.0
    count = 0
    async with fanflow.as_completed(llm, "{input}", items(), concurrency=100) as results:
        async for _record in results:
            count += 1
            if count == n // 10:
                gc.collect()
                early = rss_mib()
    gc.collect()
    return early, rss_mib(), count


def otel_cpu(n: int, rounds: int = 3) -> None:
    """CPU per call with tracing off, API only, and the SDK in memory (best of rounds)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import fanflow.otel

    def measure(mode: str) -> float:
        exporter = InMemorySpanExporter()
        if mode == "api":
            fanflow.otel.instrument()  # no SDK: the API's no-op providers
        elif mode == "sdk":
            tracer_provider = TracerProvider()
            tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
            meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
            fanflow.otel.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
        try:
            return asyncio.run(fanflow_map(n, 100))
        finally:
            fanflow.otel.uninstrument()
            assert mode != "sdk" or len(exporter.get_finished_spans()) == n + 1
            exporter.clear()

    best = {"bare": float("inf"), "off": float("inf"), "api": float("inf"), "sdk": float("inf")}
    for _ in range(rounds):  # interleaved: load on a shared machine drifts
        best["bare"] = min(best["bare"], asyncio.run(bare_loop(n, 100)))
        for mode in ("off", "api", "sdk"):
            best[mode] = min(best[mode], measure(mode))
    off = best["off"]
    print(f"fanflow.otel, {n} calls, best of {rounds}:")
    for mode, label in (
        ("bare", "bare semaphore+gather"),
        ("off", "tracing off"),
        ("api", "instrument(), API only"),
        ("sdk", "instrument(), SDK in memory"),
    ):
        us = best[mode] / n * 1e6
        print(f"  cpu/call {label:28s} {us:8.1f} us  ({best[mode] / off:5.2f}x off)")


async def lane_loop(limits: fanflow.Limits, n: int) -> float:
    """CPU of ``n`` admissions and finishes on a handle's lane alone (no engine)."""
    from fanflow._limits import Lane

    lane = Lane(limits)
    response = fanflow.Response("ok", usage=fanflow.Usage(1, 1))
    start = time.process_time()
    for _ in range(n):
        permit = await lane.acquire((10, 10))
        lane.finish(permit, 0.0, response)
    return time.process_time() - start


def lanes_cpu(n: int, rounds: int = 5) -> None:
    """CPU per call with no limits and with a handle's concurrency and rpm (best of rounds)."""
    limited = fanflow.Limits(concurrency=100, rpm=1e9)
    runs = {
        "bare": lambda: bare_loop(n, 100),
        "none": lambda: fanflow_map(n, 100),
        "limited": lambda: fanflow_map(n, None, limited),
        "lane": lambda: lane_loop(fanflow.limits.DEFAULT_LIMITS, n),
        "lane limited": lambda: lane_loop(limited, n),
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):  # interleaved: load on a shared machine drifts
        for name, run in runs.items():
            best[name] = min(best[name], asyncio.run(run()))
    print(f"fanflow lanes, {n} calls, best of {rounds}:")
    for name, label in (
        ("bare", "bare semaphore+gather"),
        ("none", "map concurrency=100, no limits"),
        ("limited", "Limits(concurrency=100, rpm=1e9)"),
        ("lane", "the lane alone, default limits"),
        ("lane limited", "the lane alone, the limits above"),
    ):
        us = best[name] / n * 1e6
        print(f"  cpu/call {label:34s} {us:8.1f} us  ({best[name] / best['bare']:5.2f}x bare)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument(
        "--otel", action="store_true", help="only the tracing cost (section 4; needs the SDK)"
    )
    parser.add_argument(
        "--lanes", action="store_true", help="only CPU per call with and without limits"
    )
    args = parser.parse_args()
    if args.lanes:
        lanes_cpu(5_000 if args.quick else 20_000)
        return
    if args.otel:
        otel_cpu(5_000 if args.quick else 20_000)
        return
    n_cpu = 5_000 if args.quick else 50_000
    n_flight = 1_000 if args.quick else 10_000
    n_stream = 20_000 if args.quick else 1_000_000

    print(f"# fanflow engine benchmark (cores: {os.cpu_count()})")
    # Warm up, then take the best of three runs of each (noise on a shared machine).
    asyncio.run(bare_loop(1000, 100))
    asyncio.run(fanflow_map(1000, 100))
    bare = min(asyncio.run(bare_loop(n_cpu, 100)) for _ in range(3))
    ours = min(asyncio.run(fanflow_map(n_cpu, 100)) for _ in range(3))
    print(f"cpu/call bare semaphore+gather: {bare / n_cpu * 1e6:8.1f} us")
    print(f"cpu/call fanflow.map:           {ours / n_cpu * 1e6:8.1f} us")
    print(f"ratio fanflow/bare:             {ours / bare:8.2f}  (target <= 3.0)")

    bare_makespan = asyncio.run(bare_in_flight(n_flight, 1.0))
    makespan = asyncio.run(in_flight(n_flight, 1.0))
    print(f"{n_flight} in flight, 1 s latency: bare gather {bare_makespan:.3f} s")
    print(f"{n_flight} in flight, 1 s latency: fanflow.map {makespan:.3f} s")
    print(f"ratio makespan/1 s:             {makespan / 1.0:8.3f}  (target <= 1.10)")

    early, late, count = asyncio.run(streamed_memory(n_stream))
    print(f"as_completed over {count} generated items:")
    print(f"  RSS {early:.1f} MiB at 10% of the items, {late:.1f} MiB at the end")
    print(f"ratio RSS end/10%:              {late / early:8.3f}  (target ~1.0: flat)")


if __name__ == "__main__":
    main()
