"""Rate limits, a budget and a dry run, offline (ScriptedLLM stands in for a model).

Run: python examples/limits_and_budget.py
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM


async def main() -> None:
    # 1,200 requests per minute = 20 per second: at most 20 at once, then evenly.
    llm = ScriptedLLM(
        "positive", latency=0.05, model="gpt-4o-mini", limits=fanflow.Limits(rpm=1200)
    )
    prompt = "Classify the sentiment: {input}"
    items = [f"review {i}: the product was fine" for i in range(30)]

    # What would it cost? (an upper bound: every reply at max_tokens)
    print(fanflow.estimate(llm, prompt, items, max_tokens=5))

    result = await fanflow.map(llm, prompt, items, max_tokens=5)
    # 20 go at once, the other 10 one every 50 ms.
    print(f"all {len(result)} done in {result.summary.makespan:.2f} s")

    # A budget of $0.00005: items it cannot cover end as skipped, with the reason.
    result = await fanflow.map(llm, prompt, items, max_tokens=5, budget=0.00005)
    summary = result.summary
    print(
        f"succeeded {summary.succeeded}, skipped {summary.skipped}, "
        f"cost ${summary.cost:.6f} (budget $0.000050)"
    )
    skipped = [r for r in result.records if r.status is fanflow.Status.SKIPPED]
    if skipped:
        print("first skip:", skipped[0].error)

    # One Budget caps every call of a pattern (here 5 workers and the aggregator) and can
    # be shared by several patterns; what it cannot cover is skipped, the rest is kept.
    short = ScriptedLLM("blue", latency=0.05, defaults={"max_tokens": 5})
    budget = fanflow.Budget(tokens=60)
    fanned = await fanflow.fan_out(short, "Name a colour", workers=5, budget=budget)
    ran = sum(w.ok for w in fanned.workers)
    print(
        f"fan_out: {ran} of 5 workers ran, merged by {fanned.aggregation} "
        f"({budget.spent:.0f} of 60 tokens spent)"
    )


if __name__ == "__main__":
    asyncio.run(main())
