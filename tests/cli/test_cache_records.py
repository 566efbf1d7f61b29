"""The prompt cache in what a run leaves behind: the summary table, the records file and
the report's totals."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import fanflow
from fanflow import Request, Response, Usage
from fanflow._progress import Tracker, render_summary
from fanflow.cli._records import read_records, record_to_json
from fanflow.cli._report import _cache_rows, summarize_rows
from fanflow.testing import ScriptedLLM

from .test_progress import render

pytestmark = pytest.mark.looptime


def _reply(request: Request) -> Response:
    # claude-sonnet-4-5: 3.00 in, 0.30 cached, 3.75 written.
    read = 3000 if request.prompt != "first" else 0
    usage = Usage(3010, 5, cached_input_tokens=read, cache_write_input_tokens=3000 - read)
    return Response("ok", usage=usage, model="claude-sonnet-4-5")


async def test_the_summary_table_says_what_the_cache_saved() -> None:
    tracker = Tracker(3, clock=asyncio.get_running_loop().time)
    await fanflow.map(ScriptedLLM(_reply), "{input}", ["first", "b", "c"], hooks=[tracker])
    tracker.stop()
    stats = tracker.snapshot()
    # One write (0.25 x $3 x 3,000 extra) and two reads (0.9 x $3 x 3,000 saved each).
    assert stats.cache_saved == pytest.approx((2 * 3000 * 2.70 - 3000 * 0.75) / 1e6)
    text = render(render_summary(stats), width=70)
    assert "6,000 input tokens read, saved $0.01" in text
    assert "estimated" not in text


async def test_records_and_the_report_carry_the_cache(tmp_path: Path) -> None:
    result = await fanflow.map(ScriptedLLM(_reply), "{input}", ["first", "b"])
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record_to_json(r)) + "\n" for r in result.records))
    line = json.loads(path.read_text().splitlines()[0])
    assert (line["cached_input_tokens"], line["cache_write_input_tokens"]) == (0, 3000)
    assert line["cache_saved"] == pytest.approx(-3000 * 0.75 / 1e6)
    summary = summarize_rows(list(read_records(str(path))))
    assert summary.cached_input_tokens == 3000
    assert summary.cache_saved == pytest.approx(result.summary.cache_saved)
    (name, text), *_ = _cache_rows(summary)
    assert name == "prompt cache"
    assert text.startswith("3,000 input tokens read, saved $0.0")


def test_the_cli_primes_by_default_and_takes_no_prime(run: Any, tmp_path: Path) -> None:
    from fanflow.testing import SimServer

    system = " ".join(f"rule{i}" for i in range(2000))
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(20)))
    args = ["map", "in.txt", "-p", "{input}", "--model", "m", "--system", system, "-q"]
    with SimServer(latency=0.05, prompt_cache=True) as server:
        done = run(*args, "--base-url", server.url, "--records", "primed.jsonl")
        assert done.returncode == 0, done.stderr
        primed = server.stats()
        server.reset()
        # Real time here (a server thread): how many --no-prime misses depends on timing.
        done = run(*args, "--base-url", server.url, "--no-prime")
        assert done.returncode == 0, done.stderr
    assert (primed.cache_misses, primed.cache_hits) == (1, 19)
    lines = [json.loads(x) for x in (tmp_path / "primed.jsonl").read_text().splitlines()]
    assert sum(line["cached_input_tokens"] > 0 for line in lines) == 19


def test_the_dry_run_gives_the_batch_cost_with_the_cache(run: Any, tmp_path: Path) -> None:
    system = "Follow these rules. " * 400  # ~2,000 tokens
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(20)))
    done = run(
        "map", "in.txt", "-p", "{input}", "--provider", "anthropic",
        "--base-url", "http://127.0.0.1:9", "--model", "claude-sonnet-4-5",
        "--system", system, "--max-tokens", "10", "--dry-run",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    batch = [line for line in done.stdout.splitlines() if "the first line writes" in line]
    assert len(batch) == 1
    assert batch[0].startswith("  with the cache about $")
