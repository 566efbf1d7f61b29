"""What the command line adds to a run: ``fanflow map`` vs ``fanflow.map`` on one server.

One SimServer (its own process, fixed latency) serves both. The baseline is the library:
``fanflow.map`` with ``fanflow.openai`` over the items, in this process. The CLI runs
``fanflow map FILE -o out.jsonl`` in a subprocess with each display (none, plain log
lines, the live panel in a pseudo-terminal is not measured here: it refreshes at 10 Hz
from the same snapshot as the plain lines). The CLI's makespan is read from its call records
(first call start to last call end, from ``--records``), so interpreter start-up is
reported apart.

    python benchmarks/cli.py [--items 3000] [--concurrency 100] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fanflow


def start_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanflow", "sim", "--port", "0", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())["url"]


async def library(url: str, items: list[str], concurrency: int) -> float:
    async with fanflow.openai("m", base_url=url) as llm:
        start = time.perf_counter()
        result = await fanflow.map(llm, "{input}", items, concurrency=concurrency)
        elapsed = time.perf_counter() - start
    assert result.ok
    return elapsed


def cli(url: str, path: Path, concurrency: int, progress: str) -> tuple[float, float]:
    """(makespan from its call records, wall time of the whole command)."""
    records = path.with_suffix(".records.jsonl")
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable, "-m", "fanflow", "map", str(path), "-p", "{input}",
            "--base-url", url, "--model", "m", "--concurrency", str(concurrency),
            "-o", str(path.with_suffix(".out.jsonl")), "--progress", progress,
            "--progress-interval", "0.5", "--records", str(records),
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    assert "succeeded" in done.stderr or progress == "none"
    calls = [json.loads(line) for line in records.read_text().splitlines()]
    makespan = max(c["end"] for c in calls) - min(c["start"] for c in calls)
    return makespan, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    items = [f"item number {i}" for i in range(args.items)]
    bound = -(-args.items // args.concurrency) * args.latency
    proc, url = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "items.txt"
            path.write_text("".join(i + "\n" for i in items))
            for run in range(3):
                base = asyncio.run(library(url, items, args.concurrency))
                quiet, wall_quiet = cli(url, path, args.concurrency, "none")
                plain, _ = cli(url, path, args.concurrency, "plain")
                print(
                    f"run {run + 1}: lower bound {bound:.2f} s | library {base:.2f} s | "
                    f"cli (no display) {quiet:.2f} s = {quiet / base:.2f}x | "
                    f"cli (plain progress) {plain:.2f} s = {plain / base:.2f}x | "
                    f"cli wall incl. start-up {wall_quiet:.2f} s"
                )
    finally:
        proc.terminate()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


if __name__ == "__main__":
    main()
