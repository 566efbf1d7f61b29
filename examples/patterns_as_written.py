"""The patterns in the shapes their descriptions use, with a fake model (no API key).

Run: python examples/patterns_as_written.py
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM


def reply(request: fanflow.Request) -> str:
    prompt = request.prompt
    if prompt.startswith("Is this request safe"):
        return "YES - a harmless question."
    if prompt.startswith("Combine"):
        return "One report over every section."
    if prompt.startswith("Summarize"):
        return prompt.split(".")[0].removeprefix("Summarize: ") + "."
    return "Paris"


# README: patterns as written
async def main() -> None:
    llm = ScriptedLLM(reply, latency=0.2)
    opts: fanflow.Options = {"concurrency": 8, "timeout": 30.0, "deadline": 60.0}

    winner, confidence = await fanflow.vote(llm, "Capital of France?", n=5, **opts)
    print(f"vote: {winner} ({confidence:.0%})")

    result = await fanflow.guarded(
        llm,
        "What is the capital of France?",
        guard_prompt="Is this request safe to answer?\n{query}\n"
        "Answer YES or NO with brief explanation.",
        block_on="NO",  # asked "is it safe?": NO withholds the answer
        **opts,
    )
    print("guarded:", result.output)

    crew = await fanflow.fan_out(
        llm, "Plan a launch.", workers=3, worker_timeout=[5.0, 5.0, 10.0], **opts
    )
    print(
        "fan_out:",
        len(crew.succeeded),
        "succeeded,",
        len(crew.failed),
        "failed,",
        len(crew.timed_out),
        "timed out",
    )

    text = "\n\n".join(f"Part {i}. Some long text about part {i}." for i in range(4))
    calls = fanflow.ParallelCalls(llm, max_workers=4)
    summary = await calls.arun(
        text=text, split="paragraphs", branch_prompt="Summarize: {input}", aggregate="concatenate"
    )
    print("ParallelCalls:", summary.aggregated.replace("\n\n", " "))

    report = await fanflow.sections(llm, {"market": "Market of ACME", "risks": "Risks of ACME"})
    print("sections:", report.output)

    pool = fanflow.Pool(
        lambda city: city.upper(), [{"city": "oslo"}, {"city": "rome"}], max_flows=2
    )
    await pool.arun()
    print("pool:", pool.status["completed"], "completed,", pool.status["failed"], "failed")


# README: end
if __name__ == "__main__":
    asyncio.run(main())
