"""Classification by vote: sample the label 7 times, take the majority; early stop.

Runs offline against ScriptedLLM (0.2 s per sample, a noisy classifier).
"""

from __future__ import annotations

import asyncio

import fanflow
from fanflow.testing import ScriptedLLM

LABELS = ["Billing", "billing.", "BILLING", "billing", "Shipping", "Billing", "shipping"]


async def main() -> None:
    llm = ScriptedLLM(lambda r: LABELS[r.sample], latency=0.2)
    task = "Label this ticket as billing, shipping or other: 'I was charged twice.'"
    result = await fanflow.vote(llm, task, n=7)
    winner, confidence = result
    print(f"winner {winner!r} with confidence {confidence:.2f}")
    print("distribution:", result.distribution)
    print(f"took {result.makespan:.2f} s; the calls one after another: {result.busy_time:.2f} s")
    early = await fanflow.vote(llm, task, n=7, early_stop=True)
    print(
        f"early stop: {early.winner!r} after {early.samples_used} of 7 samples "
        f"({early.stop_reason}); took {early.makespan:.2f} s, calls {early.busy_time:.2f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
