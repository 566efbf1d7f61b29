"""Evaluation of one answer over accuracy, clarity, completeness and tone, at once.

Runs offline against ScriptedLLM (0.3 s per criterion).
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM

GRADES = {"accuracy": 9, "clarity": 7, "completeness": 6, "tone": 8}


def grader(request: fanflow.Request) -> str:
    criterion = request.metadata["criterion"]
    return f'{{"score": {GRADES[criterion]}, "explanation": "{criterion} looks fine."}}'


async def main() -> None:
    llm = ScriptedLLM(grader, latency=0.3)
    answer = "Paris is the capital of France; it has about two million inhabitants."
    result = await fanflow.evaluate(llm, answer, ["accuracy", "clarity", "completeness", "tone"])
    for score in result.criteria:
        print(f"{score.criterion:>12}: {score.score:g}/10  {score.explanation}")
    print(f"mean {result.mean:.2f}")
    print(f"took {result.makespan:.2f} s; the calls one after another: {result.busy_time:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
