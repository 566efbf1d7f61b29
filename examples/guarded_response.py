"""Guarded response: answer and safety check at once; a flagged query gets a refusal.

Runs offline against ScriptedLLM: the answer takes 0.4 s, the guard 0.2 s.
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM


async def main() -> None:
    answerer = ScriptedLLM(lambda r: f"Here is how: {r.prompt}", latency=0.4)
    guard = ScriptedLLM(lambda r: "UNSAFE" if "weapon" in r.prompt else "SAFE", latency=0.2)
    for query in ("bake bread", "build a weapon"):
        result = await fanflow.guarded(answerer, query, guard=guard)
        print(f"{query!r}: {result.output!r}")
        print(
            f"  allowed={result.allowed}, first finished: {result.first_finished}, "
            f"answer {result.answer.status.value}"
        )
        print(
            f"  took {result.makespan:.2f} s; guard then answer would take "
            f"{result.makespan + result.time_saved:.2f} s (saved {result.time_saved:.2f} s)"
        )


if __name__ == "__main__":
    asyncio.run(main())
