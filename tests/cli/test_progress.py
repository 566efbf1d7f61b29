"""The progress display and summary, fed by the real engine's events in virtual time and
rendered into a fixed-width console (as rich's own tests/test_progress.py does)."""

from __future__ import annotations

import asyncio
import io

import pytest
from rich.console import Console

import fanflow
from fanflow._progress import Tracker, format_duration, plain_line, render_live, render_summary
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


def render(renderable: object, width: int = 60) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in out.splitlines())


async def test_snapshots_follow_the_engine_in_virtual_time() -> None:
    loop = asyncio.get_running_loop()
    # 10 items, 1 s each, 4 at once; item 0's first attempt is a 429 asking for 2 s.
    llm = ScriptedLLM(
        latency=1.0,
        failures={0: Fault.rate_limited(retry_after=2.0)},
        limits=fanflow.Limits(concurrency=4),
    )
    tracker = Tracker(10, clock=loop.time)
    seen = {}

    async def watch() -> None:
        for t in (0.5, 3.5, 7.0):
            await asyncio.sleep(t - loop.time())
            seen[t] = tracker.snapshot()

    watcher = asyncio.create_task(watch())
    result = await fanflow.map(llm, "{input}", [f"x{i}" for i in range(10)], hooks=[tracker])
    tracker.stop()
    await watcher
    at = seen[0.5]
    # Item 0's first attempt got a 429 at t=0: its worker waits to retry, and the 429
    # paused the whole lane until t=2, so the other workers' items (2 workers per slot:
    # 8 for the handle's 4) wait for admission meanwhile.
    assert (at.in_flight, at.retrying, at.done, at.queued) == (0, 1, 0, 7)
    assert (at.rate_limited, at.retries, at.requests) == (1, 1, 1)
    at = seen[3.5]
    # After the pause the lane resumes at half its limit (2 at t=2, then 4 at t=3);
    # item 0's retry queued behind the others.
    assert (at.done, at.in_flight, at.retrying, at.queued) == (2, 4, 1, 3)
    assert at.eta == pytest.approx((10 - 2) * 3.5 / 2)
    final = tracker.snapshot()
    assert seen[7.0] == final  # stopped: the elapsed time stays at the makespan
    assert result.ok
    assert (final.done, final.succeeded, final.failed) == (10, 10, 0)
    assert final.requests == 11
    # Calls started at t=2 (2), 3 (4) and 4 (4, the last ending at t=5).
    assert final.elapsed == pytest.approx(5.0) == result.makespan
    assert final.speedup == pytest.approx(result.summary.busy_time / 5.0)
    assert final.tokens == result.summary.usage.total_tokens


async def test_failures_by_reason() -> None:
    loop = asyncio.get_running_loop()
    llm = ScriptedLLM(latency=1.0, fail_on={"bad": Fault.server_error()})
    tracker = Tracker(3, clock=loop.time)
    await fanflow.map(
        llm,
        "{text}",
        [{"text": "ok"}, {"text": "bad"}, {"body": "?"}],
        hooks=[tracker],
        retry=fanflow.RetryPolicy(attempts=2, jitter=False, initial=1.0),
    )
    tracker.stop()
    s = tracker.snapshot()
    assert s.failures == {"ServerError": 1, "TemplateError": 1}
    assert (s.done, s.succeeded, s.failed, s.retries) == (3, 1, 2, 1)
    assert s.elapsed == pytest.approx(1.0)  # the failing call: 0 s, wait 1 s, 0 s


async def test_live_panel_rendering_with_a_fake_clock() -> None:
    loop = asyncio.get_running_loop()
    llm = ScriptedLLM(reply="a b c", latency=1.0, limits=fanflow.Limits(concurrency=5))
    tracker = Tracker(20, clock=loop.time)
    task = asyncio.create_task(fanflow.map(llm, "{input}", ["p q"] * 20, hooks=[tracker]))
    await asyncio.sleep(2.5)
    text = render(render_live(tracker.snapshot()), width=70)
    await task
    lines = text.splitlines()
    assert lines[0].endswith("10/20 50%  ETA 2.5s")
    # 10 workers for the handle's 5 slots: 5 in flight, 5 waiting for a slot.
    assert lines[1] == "done 10  failed 0  retrying 0  in flight 5  queued 5"
    # 15 requests in 2.5 s; 10 calls x (2 + 3) tokens.
    assert lines[2] == "6.0 req/s  20 tok/s  cost n/a  elapsed 2.5s"


async def test_summary_table_rendering() -> None:
    loop = asyncio.get_running_loop()
    llm = ScriptedLLM(
        reply="x y",
        latency=2.0,
        failures={1: Fault.rate_limited(retry_after=1.0)},
        fail_on={"boom": fanflow.errors.BadRequest("no", status_code=400)},
    )
    tracker = Tracker(4, clock=loop.time)
    await fanflow.map(llm, "{input}", ["a", "b", "boom", "c"], hooks=[tracker])
    tracker.stop()
    tracker.bad_lines = 2
    text = render(render_summary(tracker.snapshot()), width=50)
    expected = [
        "fanflow summary",
        "",
        "  items                               4",
        "  succeeded                           3",
        "  failed                              1",
        "    BadRequest                        1",
        "  input lines skipped                 2",
        "  requests                            5",
        "  retries                             1",
        "  429s                                1",
        "  tokens                9 (3 in, 6 out)",
        "  cost                              n/a",
        # b's 429 at t=0 set the handle's in-flight limit to 2 (0.9 x the 2 calls still
        # in flight, rounded up): b's retry, due at t=1, goes at t=2 and ends at 4.
        "  makespan                         4.0s",
        # 6 s of attempts (a 2, b 0 + 2, boom 0, c 2) in 4 s: waits are not work.
        "  speed-up                         1.5x",
    ]
    assert text.splitlines()[: len(expected)] == expected


def test_plain_line_and_durations() -> None:
    tracker = Tracker(None, clock=lambda: 0.0)
    assert plain_line(tracker.snapshot()) == (
        "fanflow: 0 done, 0 failed, 0 retrying, 0 in flight | 0.0 req/s, 0 tok/s, "
        "cost n/a | elapsed 0.0s, ETA ?"
    )
    assert [format_duration(x) for x in (None, 4.25, 65, 3600 + 61)] == [
        "?",
        "4.2s",
        "1m05s",
        "1h01m",
    ]
