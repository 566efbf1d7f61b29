"""URL -> markdown -> summary, as a Chain run over many URLs with a Pool.

Each URL moves through its chain on its own (no waiting for all URLs at each step).
Runs offline: fetching is simulated (0.1-0.3 s) and ScriptedLLM answers in 0.2 s.
"""

from __future__ import annotations

import asyncio
import re

from fanflow import Chain, Pool, Request, Skill, Step
from fanflow.testing import ScriptedLLM


async def fetch(url: str) -> str:
    await asyncio.sleep(0.1 + 0.1 * (len(url) % 3))  # stand-in for an HTTP GET
    return f"<html><h1>{url}</h1><p>Content of {url}.</p></html>"


def fake_model(request: Request) -> str:
    """A stand-in for a real model: turns the tags into markdown, or keeps one sentence."""
    instruction, _, text = request.prompt.partition(":")
    text = text.strip()
    if instruction.startswith("Convert"):
        text = re.sub(r"<h1>(.*?)</h1>", r"# \1\n\n", text)
        return re.sub(r"<[^>]+>", "", text).strip()
    body = text.splitlines()[-1]
    return f"One page: {body}"


async def main() -> None:
    llm = ScriptedLLM(fake_model, latency=0.2)
    chain = Chain(
        [
            Step(fetch, output="html", inputs={"url": "url"}),
            Step(Skill(llm, "Convert to markdown: {html}"), output="markdown"),
            Step(Skill(llm, "Summarize: {text}"), output="summary", inputs={"text": "markdown"}),
        ]
    )
    urls = [f"https://example.com/page/{i}" for i in range(20)]
    pool = Pool(chain, inputs=[{"url": u} for u in urls], max_flows=10)
    result = await pool.arun()
    status = pool.status
    print(f"{status['completed']} of {status['total']} URLs done, {status['failed']} failed")
    if status["failed"]:
        print("failed:", [urls[i] for i in status.which("failed")])
    print("first summary:", result.outputs[0])
    steps = sum((s.latency or 0.0) for item in result.items for s in item.steps)
    print(f"took {result.makespan:.2f} s; the steps one after another: {steps:.2f} s")
    print(f"(model calls alone: {result.busy_time:.2f} s)")


if __name__ == "__main__":
    asyncio.run(main())
