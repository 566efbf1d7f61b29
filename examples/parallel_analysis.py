"""Parallel analysis: sentiment, entities and topics of one text, all at once.

Runs offline against ScriptedLLM (0.3 s per call); swap in a real handle to use a model.
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM

TEXT = "ACME's new drone impressed reviewers in Berlin, though battery life disappoints."


def analyst(request: fanflow.Request) -> str:
    if "Sentiment" in request.prompt:
        return "mixed (positive on design, negative on battery)"
    if "entities" in request.prompt:
        return "ACME (ORG), Berlin (LOC)"
    return "consumer drones, battery technology"


async def main() -> None:
    llm = ScriptedLLM(analyst, latency=0.3)
    result = await fanflow.sections(
        llm,
        {
            "sentiment": "Sentiment of: {input}",
            "entities": "List the named entities in: {input}",
            "topics": "Main topics of: {input}",
        },
        input=TEXT,
        synthesize=False,  # the sections alone; by default the model also combines them
    )
    for name, output in result.sections.items():
        print(f"{name:>9}: {output}")
    print(f"took {result.makespan:.2f} s; the calls one after another: {result.busy_time:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
