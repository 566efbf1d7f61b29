"""Resume screening with ParallelCalls: score each resume at once, then rank them.

Synchronous code: ``ParallelCalls.run`` needs no event loop of yours. Runs offline
against ScriptedLLM (0.3 s per call).
"""

from __future__ import annotations

import fanflow
from fanflow.testing import ScriptedLLM

RESUMES = [
    "Ann: 8 years Python, led a team of 5",
    "Bo: 2 years Java",
    "Cy: 5 years Python, ML pipelines",
    "Di: 10 years Go and Python, staff engineer",
]


def screener(request: fanflow.Request) -> str:
    if request.prompt.startswith("Rank"):
        return "Di, Ann, Cy, Bo"
    years = int(request.prompt.split(": ")[2].split()[0])
    return f"score {min(10, years + 1)}/10"


def main() -> None:
    llm = ScriptedLLM(screener, latency=0.3)
    calls = fanflow.ParallelCalls(llm=llm, max_workers=4)
    result = calls.run(
        chunks=RESUMES,
        branch_prompt="Score this resume for a senior Python role: {input}",
        aggregate_prompt="Rank the candidates from these scores:\n{input}",
    )
    for resume, score in zip(RESUMES, result.outputs, strict=True):
        print(f"{resume.split(':')[0]:>3}: {score}")
    print("ranking:", result.aggregated)
    print(f"took {result.makespan:.2f} s; the calls one after another: {result.busy_time:.2f} s")


if __name__ == "__main__":
    main()
