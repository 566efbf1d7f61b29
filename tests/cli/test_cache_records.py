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
from fanflow.cli._report import _cache_rows, render_html, summarize_rows
from fanflow.testing import ScriptedLLM

from .test_progress import render

pytestmark = pytest.mark.looptime


def _reply(request: Request) -> Response:
    # claude-sonnet-4-5: 3.00 in, 0.30 cached, 3.75 written.
    read = 3000 if request.prompt != "first" else 0
    usage = Usage(3010, 5, cached_input_tokens=read, cache_write_input_tokens=3000 - read)
    return Response("ok", usage=usage, model="claude-sonnet-4-5")


def _rows(text: str) -> dict[str, str]:
    """The summary table's cache rows, by name, as printed."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition("  ")
        if name.startswith("cache "):
            out[name] = value.strip()
    return out


def _hour(request: Request) -> Response:
    # claude-sonnet-4-5 at 1-hour writes (6.00): the first call writes 3,000 tokens for
    # an hour and 1,000 for five minutes, the others read 4,000.
    first = request.prompt == "first"
    usage = Usage(
        4010, 5, cached_input_tokens=0 if first else 4000,
        cache_write_input_tokens=4000 if first else 0,
        cache_write_1h_input_tokens=3000 if first else 0,
    )  # fmt: skip
    return Response("ok", usage=usage, model="claude-sonnet-4-5")


async def test_the_summary_table_shows_reads_writes_and_what_the_cache_saved() -> None:
    tracker = Tracker(3, clock=asyncio.get_running_loop().time)
    result = await fanflow.map(ScriptedLLM(_reply), "{input}", ["first", "b", "c"], hooks=[tracker])
    tracker.stop()
    stats = tracker.snapshot()
    # One write (0.25 x $3 x 3,000 extra) and two reads (0.9 x $3 x 3,000 saved each).
    saved = (2 * 3000 * 2.70 - 3000 * 0.75) / 1e6
    assert stats.cache_saved == pytest.approx(saved) == result.summary.cache_saved
    rows = _rows(render(render_summary(stats), width=90))
    assert rows == {
        "cache reads": "6,000 input tokens",
        "cache writes": "3,000 input tokens, for 5 minutes",
        "cache saved": f"${result.summary.cache_saved:,.4f}",
    }
    # The same counts as the batch's own summary.
    usage = result.summary.usage
    assert (usage.cached_input_tokens, usage.cache_write_input_tokens) == (6000, 3000)


async def test_the_summary_table_splits_hour_writes_and_says_when_the_cache_cost_more() -> None:
    tracker = Tracker(2, clock=asyncio.get_running_loop().time)
    result = await fanflow.map(ScriptedLLM(_hour), "{input}", ["first", "b"], hooks=[tracker])
    tracker.stop()
    # The write: 1,000 x 0.75 + 3,000 x 3.00 extra; the read: 4,000 x 2.70 saved.
    saved = (4000 * 2.70 - 1000 * 0.75 - 3000 * 3.00) / 1e6
    assert result.summary.cache_saved == pytest.approx(saved)
    rows = _rows(render(render_summary(tracker.snapshot()), width=100))
    assert rows["cache writes"] == "4,000 input tokens (1,000 for 5 minutes, 3,000 for 1 hour)"
    assert saved > 0
    # Only the write, no read: the cache cost more than it saved.
    tracker = Tracker(1, clock=asyncio.get_running_loop().time)
    result = await fanflow.map(ScriptedLLM(_hour), "{input}", ["first"], hooks=[tracker])
    rows = _rows(render(render_summary(tracker.snapshot()), width=100))
    lost = (1000 * 0.75 + 3000 * 3.00) / 1e6
    assert result.summary.cache_saved == pytest.approx(-lost)
    # Under a cent, six decimals (as the cost row shows small costs).
    assert rows["cache saved"] == "-$0.009750 (writes cost more than reads saved)"
    assert rows["cache writes"] == "4,000 input tokens (1,000 for 5 minutes, 3,000 for 1 hour)"


async def test_no_cache_rows_when_no_call_used_the_cache() -> None:
    tracker = Tracker(1, clock=asyncio.get_running_loop().time)
    await fanflow.map(ScriptedLLM(lambda r: "ok"), "{input}", ["a"], hooks=[tracker])
    assert _rows(render(render_summary(tracker.snapshot()), width=90)) == {}


async def test_records_and_the_report_carry_the_cache(tmp_path: Path) -> None:
    result = await fanflow.map(ScriptedLLM(_hour), "{input}", ["first", "b", "c"])
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record_to_json(r)) + "\n" for r in result.records))
    line = json.loads(path.read_text().splitlines()[0])
    assert (line["cached_input_tokens"], line["cache_write_input_tokens"]) == (0, 4000)
    assert line["cache_write_1h_input_tokens"] == 3000
    summary = summarize_rows(list(read_records(str(path))))
    assert summary.cached_input_tokens == 8000
    assert (summary.cache_write_input_tokens, summary.cache_write_1h_input_tokens) == (4000, 3000)
    assert summary.cache_saved == pytest.approx(result.summary.cache_saved)
    assert dict(_cache_rows(summary)) == {
        "cache reads": "8,000 input tokens",
        "cache writes": "4,000 input tokens (1,000 for 5 minutes, 3,000 for 1 hour)",
        "cache saved": f"${result.summary.cache_saved:,.4f}",
    }


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


async def test_a_model_without_a_cache_price_is_marked_estimated_in_both_tables(
    tmp_path: Path,
) -> None:
    # gemini-2.5-flash has no cache price: its cached tokens are charged as plain input
    # (an upper bound), never as zero, and both tables say the cost is estimated.
    def reply(request: Request) -> Response:
        usage = Usage(3010, 5, cached_input_tokens=3000)
        return Response("ok", usage=usage, model="gemini-2.5-flash")

    tracker = Tracker(2, clock=asyncio.get_running_loop().time)
    result = await fanflow.map(ScriptedLLM(reply), "{input}", ["a", "b"], hooks=[tracker])
    assert result.summary.cost_estimated
    assert result.summary.cost == pytest.approx(2 * (3010 * 0.30 + 5 * 2.50) / 1e6)
    text = render(render_summary(tracker.snapshot()), width=120)
    assert "(estimated: a cache price is unknown)" in text
    # What the cache saved is unknown too: counted as nothing, and said so.
    assert _rows(text)["cache saved"] == "$0.0000 (estimated: a cache price is unknown)"
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record_to_json(r)) + "\n" for r in result.records))
    summary = summarize_rows(list(read_records(str(path))))
    assert summary.cost_estimated
    assert dict(_cache_rows(summary))["cache saved"].endswith(
        "(estimated: a cache price is unknown)"
    )
    page = render_html(list(read_records(str(path))), title="t")
    assert "(estimated: a cache price is unknown)" in page
