"""A Flow (DAG): extract -> (sentiment | entities | summary) -> combine -> (report | email | slack).

Independent steps run at once; each step starts as soon as what it reads is ready.
Runs offline against ScriptedLLM (0.2 s per call).
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow import Flow, Skill, Step
from fanflow.testing import ScriptedLLM


async def main() -> None:
    llm = ScriptedLLM(lambda r: f"[{r.prompt.split(':')[0]}]", latency=0.2)

    def skill(template: str) -> Skill:
        return Skill(llm, template)

    flow = Flow(
        [
            Step(skill("Extract facts: {document}"), output="facts"),
            Step(skill("Sentiment: {facts}"), output="sentiment"),
            Step(skill("Entities: {facts}"), output="entities"),
            Step(skill("Summary: {facts}"), output="summary"),
            Step(skill("Combine: {sentiment} {entities} {summary}"), output="combined"),
            Step(skill("Report: {combined}"), output="report"),
            Step(skill("Email: {combined}"), output="email"),
            Step(skill("Slack: {combined}"), output="slack"),
        ]
    )
    result = await flow.arun(document="Quarterly results: revenue up 12%...")
    for step in result.steps:
        print(f"{step.name:>10}: {step.start - result.steps[0].start:.1f}s -> {step.value}")
    print(f"took {result.makespan:.2f} s; the calls one after another: {result.busy_time:.2f} s")
    assert isinstance(result.output, dict)
    print(fanflow.__name__, "flow outputs:", sorted(result.output))


if __name__ == "__main__":
    asyncio.run(main())
