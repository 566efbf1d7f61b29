"""A durable job: results go to a store and a JSONL file; a second run costs nothing.

Runs offline against ScriptedLLM. Kill it halfway (Ctrl-C) and run it again: finished
items are not asked again, and the output file gets each item exactly once.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import fanflow
from fanflow.testing import ScriptedLLM


async def main(folder: Path) -> None:
    llm = ScriptedLLM(latency=0.05, limits=fanflow.Limits(concurrency=20))
    items = [{"id": f"doc-{i}", "text": f"document number {i}"} for i in range(100)]
    with fanflow.Store(folder / "store.db") as store:
        for run in (1, 2):
            result = await fanflow.map(
                llm,
                "Summarize: {text}",
                items,
                store=store,
                job="summaries",
                sink=folder / "summaries.jsonl",
            )
            cached = sum(r.cached for r in result.records)
            print(
                f"run {run}: {result.summary.succeeded} items in {result.makespan:.2f} s, "
                f"{cached} from the store, model calls so far: {llm.calls}"
            )
        print(store.job("summaries"))
    lines = (folder / "summaries.jsonl").read_text().splitlines()
    print(f"{len(lines)} lines in summaries.jsonl; first: {lines[0][:80]}...")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp)))
