"""Best-of-3: three candidate taglines at once, then a judge picks one.

Runs offline against ScriptedLLM (0.3 s per candidate, 0.2 s for the judge).
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM

DRAFTS = ["Fly further.", "Drones, done right.", "The sky is yours."]


async def main() -> None:
    writer = ScriptedLLM(lambda r: DRAFTS[r.sample], latency=0.3)
    judge = ScriptedLLM('{"best": 2, "reason": "memorable and concrete"}', latency=0.2)
    result = await fanflow.best_of_n(
        writer, "Write a tagline for a drone company", n=3, judge=judge, criteria="punch"
    )
    print(f"best: {result.best!r} (candidate {result.index}, chosen by {result.selection})")
    print(f"took {result.makespan:.2f} s; the calls one after another: {result.busy_time:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
