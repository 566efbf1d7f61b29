"""What reading the call options costs (issue 14 step 2), as ratios measured in this run.

    python benchmarks/options.py [--quick]

Each pattern call now reads its options through one resolver (``patterns/_options.py``)
and checks its model. This measures the CPU per pattern call of small patterns, where
that fixed cost weighs most, against ``fanflow.map`` over the same number of items (the
per-item engine path, which the resolver does not touch), both on a zero-latency async
function, best of 3:

1. ``fanflow.gather`` of N ``fanflow.call`` objects (one resolve per call, plus the
   gather's own) vs ``fanflow.map`` over N items.
2. N ``fanflow.vote(n=3)`` runs vs ``fanflow.map`` over 3N items.

Run it against another checkout's source with ``PYTHONPATH=<checkout>/src`` to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import fanflow


async def _zero(request: fanflow.Request) -> str:
    return "ok"


async def via_map(n: int) -> float:
    llm = fanflow.function(_zero)
    start = time.process_time()
    result = await fanflow.map(llm, "{input}", range(n), concurrency=100)
    assert result.ok
    return time.process_time() - start


async def via_gather(n: int) -> float:
    llm = fanflow.function(_zero)
    start = time.process_time()
    records = await fanflow.gather(*(fanflow.call(llm, str(i)) for i in range(n)), settled=True)
    assert len(records) == n
    return time.process_time() - start


async def via_vote(runs: int) -> float:
    llm = fanflow.function(_zero)
    start = time.process_time()
    for _ in range(runs):
        result = await fanflow.vote(llm, "q", n=3)
        assert result.winner == "ok"
    return time.process_time() - start


def best(fn: object, *args: int) -> float:
    times = [asyncio.run(fn(*args)) for _ in range(3)]  # type: ignore[operator]
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    n = 2_000 if parser.parse_args().quick else 20_000
    runs = n // 10
    base = best(via_map, n)
    gathered = best(via_gather, n)
    base_vote = best(via_map, 3 * runs)
    voted = best(via_vote, runs)
    print(f"map, {n:,} items:            {base / n * 1e6:6.1f} us per call")
    print(
        f"gather of {n:,} calls:       {gathered / n * 1e6:6.1f} us per call "
        f"({gathered / base:.2f}x map)"
    )
    print(f"map, {3 * runs:,} items:            {base_vote / (3 * runs) * 1e6:6.1f} us per call")
    print(
        f"{runs:,} votes of 3 samples:  {voted / (3 * runs) * 1e6:6.1f} us per call "
        f"({voted / base_vote:.2f}x map)"
    )


if __name__ == "__main__":
    main()
