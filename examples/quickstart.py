"""Quickstart: classify 200 reviews at once instead of one after another.

Runs offline against ScriptedLLM (a fake model with 0.2 s of latency per call), so it
needs no API key. Swap in a real handle to use a real model.
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM


def classify(request: fanflow.Request) -> str:
    text = request.prompt.lower()
    return "negative" if ("bad" in text or "broken" in text) else "positive"


async def main() -> None:
    llm = ScriptedLLM(classify, latency=0.2, limits=fanflow.Limits(concurrency=50))
    reviews = [
        {"id": i, "text": "Arrived broken, bad support." if i % 3 == 0 else "Works great!"}
        for i in range(200)
    ]
    result = await fanflow.map(llm, "Sentiment of this review: {text}", reviews)
    s = result.summary
    print(f"{s.succeeded}/{s.items} items succeeded in {s.makespan:.2f} s")
    if s.busy_time is not None and s.speedup is not None:  # None: the model did not say
        print(f"one after another would take {s.busy_time:.1f} s: {s.speedup:.0f}x faster")
    print("first five:", result.outputs[:5])


if __name__ == "__main__":
    asyncio.run(main())
