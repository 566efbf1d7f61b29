"""Batch APIs vs real time (issue 18): cost and makespan of 10,000 items.

    python benchmarks/batch.py [--items 10000] [--batch-time 600]

SimServer runs on the benchmark's own event loop, a virtual-time loop (looptime), so a
10-minute batch and minutes of rate-limited real-time traffic take seconds of CPU; the
makespans printed are the loop's (virtual) seconds, exact and free of machine load. The
real-time limits R are the handle's and the server's: 6,000 requests per minute,
100 in flight, 1 s per call. A batch takes T seconds (its requests are processed evenly
over T). Five runs, each against a fresh server:

- real time only (the baseline every ratio is against);
- batch only (``mode="batch"``);
- auto with a deadline above T (everything fits in the batch);
- auto with a deadline below T (the batch answers what it can, the rest goes in real
  time before the deadline);
- auto with a deadline too short for any batch (real time alone needs most of it):
  everything goes in real time from the start.

Cost is the records' own (gpt-4o-mini list prices; batch at half), summed by the
result's summary, so the ratios check the pricing end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import looptime

import fanflow
from fanflow.testing import SimBatches, SimServer

RPM = 6000
CONCURRENCY = 100
LATENCY = 1.0


async def run(mode: str, items: list[str], batch_time: float, deadline: float | None) -> Any:
    loop = asyncio.get_running_loop()
    server = SimServer(
        latency=LATENCY,
        rpm=RPM,
        max_in_flight=CONCURRENCY,
        keep_requests=False,
        batches=SimBatches(time=batch_time, cancel_time=1.0),
    )
    async with server:
        llm = fanflow.openai(
            "gpt-4o-mini",
            base_url=server.url,
            api_key="sk-bench",
            limits=fanflow.Limits(rpm=RPM, concurrency=CONCURRENCY),
            max_tokens=50,
        )
        options = fanflow.backends.BatchOptions(realtime_latency=LATENCY)
        t0 = loop.time()
        kwargs: dict[str, Any] = {"mode": mode, "batch": options}
        if deadline is not None:
            kwargs["deadline"] = deadline
        result = await fanflow.map(llm, "{input}", items, **kwargs)
        makespan = loop.time() - t0
        await llm.aclose()
        stats = server.stats()
    s = result.summary
    assert s.succeeded == len(items), (mode, deadline, s)
    return {
        "makespan": makespan,
        "cost": s.cost,
        "batched": s.batched,
        "realtime": s.realtime,
        "saved": s.saved or 0.0,
        "batches": stats.batches,
        "submitted": stats.batch_requests,
        "http": stats.requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--batch-time", type=float, default=600.0, help="T, seconds")
    args = parser.parse_args()
    n, t = args.items, args.batch_time
    items = [f"label this item number {i} please" for i in range(n)]
    realtime_alone = max(n / RPM * 60, n / CONCURRENCY * LATENCY)
    cases = [
        ("real time only", "realtime", None),
        ("batch only", "batch", None),
        (f"auto, deadline {1.5 * t:.0f} s (> T)", "auto", 1.5 * t),
        (f"auto, deadline {0.5 * t:.0f} s (< T)", "auto", 0.5 * t),
        (f"auto, deadline {1.2 * realtime_alone:.0f} s (no time for a batch)", "auto", None),
    ]
    print(f"{n:,} items; batch time T = {t:g} s; real time: {RPM} rpm, {CONCURRENCY} in flight")
    print(f"{'case':<44} {'makespan':>10} {'vs RT':>6} {'cost $':>8} {'vs RT':>6} "
          f"{'batched':>8} {'real time':>9} {'sent in batches':>15} {'HTTP calls':>10} "
          f"{'CPU s':>6}")  # fmt: skip
    base: dict[str, Any] | None = None
    for label, mode, deadline in cases:
        if mode == "auto" and deadline is None:
            deadline = 1.2 * realtime_alone
        loop = looptime.new_event_loop(start=0.0)
        cpu = time.process_time()
        try:
            out = loop.run_until_complete(run(mode, items, t, deadline))
        finally:
            loop.close()
        cpu = time.process_time() - cpu
        if base is None:
            base = out
        print(
            f"{label:<44} {out['makespan']:>9.1f}s {out['makespan'] / base['makespan']:>6.2f} "
            f"{out['cost']:>8.4f} {out['cost'] / base['cost']:>6.3f} {out['batched']:>8} "
            f"{out['realtime']:>9} {out['submitted']:>15} {out['http']:>10} {cpu:>6.1f}"
        )


if __name__ == "__main__":
    main()
