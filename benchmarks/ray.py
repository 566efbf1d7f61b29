"""The Ray backend vs the local one, on one 2-core machine where the server's rate binds.

Scenario A (the limit binds): SimServer in its own process answers after ``--latency``
seconds and refuses (429) more than ``--capacity`` requests in flight, so its rate is
capacity / latency; the handle's limit is ``Limits(concurrency=capacity)``. The same map
of ``--items`` items runs on the local backend, then on Ray with 1, 2 and 4 workers.
Bound: ceil(N / capacity) x latency. Printed: the start-up (a first batch of 2 items,
which starts the workers; they then serve later batches), makespan, makespan / bound
(1.00 is perfect), 429s counted at the server (must be 0: one limit for all workers).

Scenario A2 (a rate limit binds): the server allows ``--rate`` requests per second (a
token bucket of that size, as the hosted APIs), the handle ``Limits(rpm=rate,
period=1.0)``. Bound: (N - rate) / rate seconds (the first ``rate`` go at once).

Scenario B (overhead): a server with no latency and no limit, 64 calls in flight: the
wall time per item on Ray minus the local one is what Ray adds per item (shipping items
and records between processes, the limit broker); a batch of 2 items shows the fixed
cost of starting the workers.

    python benchmarks/ray.py                      # 2,000 items, 16 in flight, 50 ms
    python benchmarks/ray.py --items 500 --quick  # a smaller run
"""

from __future__ import annotations

import os
import sys

# This file is named ray.py: drop its folder from the path so "import ray" finds Ray.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

import fanflow  # noqa: E402
from fanflow import Limits  # noqa: E402
from fanflow.backends import RayBackend  # noqa: E402


def start_server(port: int, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fanflow.testing.sim", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            stats(port)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("SimServer did not start")


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as reply:
        data: dict[str, Any] = json.load(reply)
    return data


def reset(port: int) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/stats/reset", method="POST")
    with urllib.request.urlopen(request, timeout=5):
        pass


def refused(port: int) -> int:
    return int(stats(port)["responses"].get("429", 0))


async def run(
    port: int, items: list[str], limits: Limits | None, backend: Any, concurrency: int | None
) -> tuple[float, fanflow.MapResult[Any]]:
    llm = fanflow.openai(
        "sim", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-bench", limits=limits
    )
    async with llm:
        start = time.perf_counter()
        result = await fanflow.map(
            llm, "Say {input}", items, concurrency=concurrency, backend=backend
        )
        wall = time.perf_counter() - start
    assert result.ok, list(result.errors.items())[:3]
    return wall, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--overhead-items", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=200, help="A2: requests per second")
    parser.add_argument("--rate-items", type=int, default=1200)
    parser.add_argument("--quick", action="store_true", help="workers 1 and 2 only")
    args = parser.parse_args()
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init (local instance, once per process): {time.perf_counter() - t0:.2f} s")
    worker_counts = [1, 2] if args.quick else [1, 2, 4]

    items = [f"item {i}" for i in range(args.items)]
    bound = math.ceil(args.items / args.capacity) * args.latency
    port = 18931
    server = start_server(
        port, "--latency", str(args.latency), "--max-in-flight", str(args.capacity)
    )
    limits = Limits(concurrency=args.capacity)
    print(
        f"\nA. {args.items} items, server: {args.capacity} in flight x {args.latency * 1000:.0f}"
        f" ms (bound {bound:.2f} s), handle Limits(concurrency={args.capacity})"
    )
    print(
        "| backend | start-up s (first 2-item batch) | makespan s | makespan / bound "
        "| 429s at the server |"
    )
    print("|---|---|---|---|---|")
    try:
        local_outputs = None
        for name, backend in [("local", "local")] + [
            (f"ray, {w} worker{'s' * (w > 1)}", RayBackend(workers=w)) for w in worker_counts
        ]:
            # Workers stay up between batches: a first small batch starts them.
            startup, _ = asyncio.run(run(port, items[:2], limits, backend, None))
            reset(port)
            wall, result = asyncio.run(run(port, items, limits, backend, None))
            if local_outputs is None:
                local_outputs = result.outputs
            assert result.outputs == local_outputs
            print(f"| {name} | {startup:.2f} | {wall:.2f} | {wall / bound:.3f} | {refused(port)} |")
    finally:
        server.kill()
        server.wait()

    port += 1
    rate = args.rate
    n_rate = args.rate_items
    server = start_server(port, "--latency", str(args.latency), "--rpm", str(rate), "--period", "1")
    # The server's bucket starts full (a burst of ``rate``), then refills at rate/s.
    bound_r = (n_rate - rate) / rate
    limits_r = Limits(rpm=rate, period=1.0)
    print(
        f"\nA2. {n_rate} items, server: {rate} requests per second (a token bucket of "
        f"{rate}), handle Limits(rpm={rate}, period=1.0); bound (N - burst) / rate = "
        f"{bound_r:.2f} s"
    )
    print("| backend | makespan s | makespan / bound | 429s at the server |")
    print("|---|---|---|---|")
    try:
        for name, backend in [("local", "local")] + [
            (f"ray, {w} worker{'s' * (w > 1)}", RayBackend(workers=w)) for w in worker_counts
        ]:
            time.sleep(1.5)  # let the server's bucket fill up again
            reset(port)
            wall, result = asyncio.run(run(port, items[:n_rate], limits_r, backend, None))
            print(f"| {name} | {wall:.2f} | {wall / bound_r:.3f} | {refused(port)} |")
    finally:
        server.kill()
        server.wait()

    port += 1
    server = start_server(port)
    n = args.overhead_items
    many = [f"item {i}" for i in range(n)]
    print(f"\nB. overhead: {n} items, server with no latency and no limit, 64 in flight")
    print("| backend | wall s | 2-item batch s | per item ms (wall - 2-item) / N | added |")
    print("|---|---|---|---|---|")
    try:
        base = None
        for name, backend in [("local", "local")] + [
            (f"ray, {w} worker{'s' * (w > 1)}", RayBackend(workers=w)) for w in worker_counts
        ]:
            wall, _ = asyncio.run(run(port, many, None, backend, 64))
            small, _ = asyncio.run(run(port, many[:2], None, backend, 64))
            per = (wall - small) / (n - 2) * 1000
            if base is None:
                base = per
            print(f"| {name} | {wall:.2f} | {small:.2f} | {per:.3f} | {per - base:+.3f} |")
    finally:
        server.kill()
        server.wait()
    ray.shutdown()


if __name__ == "__main__":
    main()
