"""Is the reported speed-up true? (issue 28.4, decision 0170)

    python benchmarks/speedup.py [--max-tokens N] [--rounds N]

Runs the reviews of examples/data/reviews.jsonl on ``fanflow.local()`` (its default
instances) one after another, then as one ``fanflow.map``, in the same run, and prints
the measured ratio (one after another over the map's makespan) beside the speed-up the
summary reports and the ratio the attempts' round trips would claim (the measure before
decision 0170). Twice: with the handle's own limit (one call per instance) and with no
limit in the engine (every call waits in the worker pool, as ``fanflow map`` did).
At temperature 0 with a fixed seed, so both ways generate the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import fanflow

DATA = Path(__file__).parent.parent / "examples" / "data" / "reviews.jsonl"
PROMPT = "Is this review positive or negative? {text}"


async def one_config(
    limits: fanflow.Limits | None, reviews: list[dict[str, str]], max_tokens: int
) -> None:
    options = {"temperature": 0.0, "seed": 0, "max_tokens": max_tokens}
    async with fanflow.local(limits=limits) as llm:
        await llm.load()
        began = time.perf_counter()
        for review in reviews:
            await llm.complete(fanflow.Request.of(PROMPT.format(**review), **options))  # type: ignore[arg-type]
        one_by_one = time.perf_counter() - began
        result = await fanflow.map(llm, PROMPT, reviews, **options)  # type: ignore[arg-type]
    s = result.summary
    trips = sum(a.duration for r in result.records for a in r.attempts)
    reported = "n/a" if s.speedup is None else f"{s.speedup:.2f}x"
    print(
        f"{'own limit' if limits is None else 'no limit':9}  instances={llm.instances}  "
        f"one by one {one_by_one:6.2f} s  map {s.makespan:6.2f} s  "
        f"measured {one_by_one / s.makespan:5.2f}x  reported {reported}  "
        f"round trips {trips / s.makespan:5.2f}x"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    reviews = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    for _ in range(args.rounds):
        for limits in (None, fanflow.Limits()):
            await one_config(limits, reviews, args.max_tokens)


if __name__ == "__main__":
    asyncio.run(main())
