"""Company analysis by sections (market, finances, risks), then one synthesis call.

Runs offline against ScriptedLLM (0.3 s per section, 0.2 s for the synthesis).
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM


def analyst(request: fanflow.Request) -> str:
    return f"({request.prompt.split(' for ')[0].lower()} of {request.prompt.split()[-1]})"


async def main() -> None:
    llm = ScriptedLLM(analyst, latency=0.3)
    writer = ScriptedLLM(lambda r: f"Report over {r.prompt.count('## ')} sections.", latency=0.2)
    result = await fanflow.sections(
        llm,
        {
            "market": "Market position for {company}",
            "finances": "Financial health for {company}",
            "risks": "Key risks for {company}",
        },
        input={"company": "ACME"},
        synthesize=writer,
    )
    print(result.sections)
    print("synthesis:", result.synthesis)
    print(f"took {result.makespan:.2f} s; the calls one after another: {result.busy_time:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
