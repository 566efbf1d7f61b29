"""Reprs people read in a REPL or notebook: whole fields, rounded numbers, no loop times."""

from __future__ import annotations

import io

import pytest

import fanflow
from fanflow import CallRecord, Status, Usage
from fanflow.results import Summary
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime

LONG = "The answer is " + "word " * 120


async def test_call_record_repr_is_short_and_has_no_loop_timestamps() -> None:
    llm = ScriptedLLM(lambda prompt: LONG, latency=0.25, model="gpt-4o")
    result = await fanflow.map(llm, "{q}", [{"q": "x"}])
    record = result.records[0]
    text = repr(record)
    assert text.startswith("fanflow.CallRecord(index=0, status=succeeded, value='The answer is")
    assert f"({len(LONG):,} chars)" in text
    assert "attempts=1, latency=0.250, tokens=1+123, cost=0.0012325)" in text
    assert len(text) < 200
    assert "start=" not in text  # an event-loop time means nothing to a reader
    assert "end=" not in text


def test_failed_record_shows_its_error_whole() -> None:
    error = fanflow.errors.ServerError("openai answered HTTP 500: " + "x" * 200)
    text = repr(CallRecord(status=Status.FAILED, error=error, index=4, start=1e6, end=1e6 + 2))
    assert text.startswith("fanflow.CallRecord(index=4, status=failed, error=ServerError('openai")
    assert text.endswith("(226 chars)), attempts=0, latency=2.000)")


def test_summary_rounds_its_money_and_times() -> None:
    summary = Summary(
        items=3, succeeded=3, failed=0, timed_out=0, cancelled=0, skipped=0, calls=4,
        retries=1, usage=Usage(40, 60), cost=0.00035999999999999964, makespan=1.2041234,
        busy_time=2.5,
    )  # fmt: skip
    assert repr(summary) == (
        "fanflow.results.Summary(items=3, succeeded=3, failed=0, calls=4, retries=1, tokens=40+60, "
        "cost=0.00036, makespan=1.204, busy_time=2.500)"
    )


async def test_fan_out_result_repr_is_whole() -> None:
    llm = ScriptedLLM(lambda prompt: LONG)
    result = await fanflow.fan_out(llm, "Plan a trip", workers=3)
    text = repr(result)
    assert text.startswith("fanflow.results.FanOutResult(answer='The answer is")
    assert "workers=[succeeded, succeeded, succeeded], required=2, calls=4, makespan=" in text
    assert text.endswith(")")
    assert text.count("(") == text.count(")")  # nothing cut mid-field
    assert "aggregation_error" not in text  # unset optional fields are left out


async def test_rich_shows_the_same_fields() -> None:
    console_module = pytest.importorskip("rich.console")
    llm = ScriptedLLM(lambda prompt: "ok")
    result = await fanflow.map(llm, "{q}", [{"q": "x"}])
    out = io.StringIO()
    console = console_module.Console(file=out, width=80, color_system=None)
    console.print(result.records[0])
    console.print(result.summary)
    printed = out.getvalue()
    assert "CallRecord(" in printed
    assert "status=succeeded" in printed
    assert "value='ok'" in printed
    assert "Summary(" in printed
    assert "start=" not in printed
