"""Sinks: JSONL lines per item, torn-line repair, resume without duplicates, order, Parquet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fanflow
from fanflow import JsonlSink, ParquetSink, Status, Store
from fanflow.errors import StoreError
from fanflow.store import sink_for
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime

ITEMS = [{"id": f"row-{i}", "text": f"item {i}"} for i in range(10)]


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_index(path: Path) -> dict[int, dict[str, Any]]:
    found = lines(path)
    indices = [row["index"] for row in found]
    assert len(indices) == len(set(indices)), f"duplicate lines: {sorted(indices)}"
    return {row["index"]: row for row in found}


async def test_one_line_per_item_with_its_fields(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    llm = ScriptedLLM(fail_on={"item 4$": fanflow.errors.BadRequest("rejected")})
    await fanflow.map(llm, "{text}", ITEMS, sink=out)
    rows = by_index(out)
    assert sorted(rows) == list(range(10))
    assert rows[0] == {
        "index": 0,
        "id": "row-0",
        "status": "succeeded",
        "output": "echo: item 0",
        "error": None,
        "usage": {"input_tokens": 2, "output_tokens": 3},
        "cost": None,
        "cached": False,
        "key": rows[0]["key"],
    }
    assert len(rows[0]["key"]) == 64
    assert rows[4]["status"] == "failed"
    assert rows[4]["error"] == "BadRequest: rejected"
    assert rows[4]["output"] is None


async def test_a_torn_last_line_is_cut_and_the_rest_resumed(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    await fanflow.map(ScriptedLLM(), "{text}", ITEMS[:4], sink=out)
    whole = out.read_bytes()
    # A crash while writing item 4's line leaves half of it.
    out.write_bytes(whole + b'{"index": 4, "id": "row-4", "sta')
    sink = JsonlSink(out)
    llm = ScriptedLLM()
    await fanflow.map(llm, "{text}", ITEMS, sink=sink)
    assert sink.statistics().torn_bytes_removed == len(b'{"index": 4, "id": "row-4", "sta')
    assert sink.statistics().already_present == 4
    assert sorted(by_index(out)) == list(range(10))
    assert out.read_bytes().startswith(whole)  # finished lines were kept as they were


async def test_resume_replaces_the_lines_of_items_that_failed(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    flaky = ScriptedLLM(fail_on={"item [26]$": fanflow.errors.BadRequest("no")})
    await fanflow.map(flaky, "{text}", ITEMS, sink=out)
    assert [r["status"] for r in lines(out)].count("failed") == 2
    sink = JsonlSink(out)
    fixed = ScriptedLLM()
    await fanflow.map(fixed, "{text}", ITEMS, sink=sink)
    rows = by_index(out)
    assert all(row["status"] == "succeeded" for row in rows.values())
    assert sink.statistics().lines_replaced == 2
    assert sink.statistics().written == 2


async def test_resume_with_a_store_appends_only_missing_items(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with Store(tmp_path / "s.db") as store:
        await fanflow.map(ScriptedLLM(), "{text}", ITEMS[:6], store=store, job="j", sink=out)
        llm = ScriptedLLM()
        await fanflow.map(llm, "{text}", ITEMS, store=store, job="j", sink=out)
    assert llm.calls == 4
    rows = by_index(out)
    assert sorted(rows) == list(range(10))
    assert [rows[i]["cached"] for i in range(10)] == [False] * 10


async def test_a_file_of_another_input_is_not_mixed_in(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    await fanflow.map(ScriptedLLM(), "{text}", ITEMS, sink=out)
    with pytest.raises(StoreError, match="different input") as info:
        await fanflow.map(ScriptedLLM(), "Other prompt {text}", ITEMS, sink=out)
    assert str(out) in str(info.value)
    await fanflow.map(
        ScriptedLLM(), "Other prompt {text}", ITEMS, sink=JsonlSink(out, overwrite=True)
    )
    assert by_index(out)[0]["output"] == "echo: Other prompt item 0"


async def test_ordered_writes_lines_in_input_order(tmp_path: Path) -> None:
    # Later items finish first: item i takes 10 - i seconds (virtual time).
    llm = ScriptedLLM(latency=lambda rng, r: 10.0 - int(r.prompt.split()[-1]))
    fast = tmp_path / "fast.jsonl"
    ordered = tmp_path / "ordered.jsonl"
    await fanflow.map(llm, "{text}", ITEMS, sink=fast)
    await fanflow.map(llm, "{text}", ITEMS, sink=JsonlSink(ordered, ordered=True))
    assert [r["index"] for r in lines(fast)] == list(reversed(range(10)))
    assert [r["index"] for r in lines(ordered)] == list(range(10))


async def test_as_completed_streams_to_a_sink(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    seen = []
    async with fanflow.as_completed(ScriptedLLM(), "{text}", ITEMS, sink=out) as results:
        async for record in results:
            seen.append(record.index)
            # The line is in the file before the record is handed over.
            assert record.index in by_index(out)
    assert sorted(seen) == list(range(10))


async def test_parquet_sink_writes_every_item(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out.parquet"
    llm = ScriptedLLM(fail_on={"item 1$": fanflow.errors.BadRequest("no")})
    sink = ParquetSink(out, row_group_size=3)
    await fanflow.map(llm, "{text}", ITEMS, sink=sink, parse=lambda r: {"text": r.text})
    table = pq.read_table(out)
    assert table.num_rows == 10
    assert pq.ParquetFile(out).metadata.num_row_groups == 4
    rows = {r["index"]: r for r in table.to_pylist()}
    assert json.loads(rows[0]["output"]) == {"text": "echo: item 0"}
    assert rows[1]["status"] == Status.FAILED.value
    assert rows[2]["id"] == "row-2"
    assert not (tmp_path / "out.parquet.partial").exists()
    assert sink.statistics().written == 10


async def test_sink_for_picks_the_format_from_the_path(tmp_path: Path) -> None:
    assert isinstance(sink_for(tmp_path / "a.jsonl"), JsonlSink)
    assert isinstance(sink_for(str(tmp_path / "a.parquet")), ParquetSink)
    sink = JsonlSink(tmp_path / "b.jsonl", ordered=True)
    assert sink_for(sink) is sink
    assert repr(sink).startswith("fanflow.JsonlSink(")
    with pytest.raises(fanflow.ConfigError, match="sink must be a path"):
        sink_for(42)  # type: ignore[arg-type]
