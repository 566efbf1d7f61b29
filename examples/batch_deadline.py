"""Half-price batch APIs, mixed with real time to meet a deadline (offline, SimServer).

    python examples/batch_deadline.py

SimServer speaks OpenAI's Batch API; here a batch takes 120 s and the job must end in
60 s. ``mode="batch"`` alone would finish at half the price in about 120 s;
``mode="auto", deadline=60`` puts the items into a batch, and as the deadline nears
cancels it and sends what it had not answered in real time, within the handle's limits.
The run is on a virtual-time loop (looptime, in fanflow's dev extra), so it takes a
second; without looptime it runs in real time (about four minutes).
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import SimBatches, SimServer

ITEMS = [{"text": f"review number {i}: works fine"} for i in range(200)]
PRICES = {"sim-mini": fanflow.Price(input=0.15, output=0.60)}  # batch=0.5 by default


async def run(mode: str, deadline: float | None) -> fanflow.MapResult[str]:
    async with SimServer(latency=0.5, rpm=600, batches=SimBatches(time=120.0)) as server:
        llm = fanflow.openai(
            "sim-mini",
            base_url=server.url,
            api_key="sk-offline",
            limits=fanflow.Limits(rpm=600, concurrency=20),
        )
        result = await fanflow.map(
            llm,
            "Label the sentiment of: {text}",
            ITEMS,
            mode=mode,  # type: ignore[arg-type]
            deadline=deadline,
            batch=fanflow.backends.BatchOptions(realtime_latency=0.5),
            prices=PRICES,
        )
        await llm.aclose()
        return result


def _virtual_loop() -> asyncio.AbstractEventLoop:
    try:
        import looptime
    except ImportError:  # real time, then
        return asyncio.new_event_loop()
    return looptime.new_event_loop(start=0.0)


def main() -> None:
    for mode, deadline in (("realtime", None), ("batch", None), ("auto", 60.0)):
        loop = _virtual_loop()
        try:
            result = loop.run_until_complete(run(mode, deadline))
        finally:
            loop.close()
        s = result.summary
        saved = f"${s.saved:.5f}" if s.saved else "$0"
        print(
            f"{mode:>8}: {s.succeeded}/{s.items} succeeded in {s.makespan:5.1f} s, "
            f"cost ${s.cost:.5f} (saved {saved}); {s.batched} batched, {s.realtime} real time"
        )
        assert result.ok, result.errors
        if mode == "auto":
            assert s.makespan < 60.0
            assert s.batched + s.realtime == len(ITEMS)


if __name__ == "__main__":
    main()
