"""Test a pipeline against SimServer: a local OpenAI-compatible server with faults.

No network, no API key: SimServer answers on 127.0.0.1 with 50 ms of latency, a 60,000
requests-per-minute limit, and a 5% chance of a 503 that fanflow retries.
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import SimServer


async def main() -> None:
    async with SimServer(latency=0.05, rpm=60_000, faults={"503": 0.05}, seed=1) as server:
        llm = fanflow.openai("sim-model", base_url=server.url, api_key="sk-local")
        async with llm:
            result = await fanflow.map(
                llm, "Label: {text}", [{"text": f"item {i}"} for i in range(100)], concurrency=20
            )
        stats = server.stats()
    s = result.summary
    print(f"{s.succeeded}/{s.items} succeeded in {s.makespan:.2f} s with {s.retries} retries")
    print(f"server saw {stats.requests} requests: {dict(stats.responses)}")
    print("first output:", result.outputs[0])


if __name__ == "__main__":
    asyncio.run(main())
