"""``progress=True`` on fanflow.run and the patterns: the CLI's display, from the library.

Plain lines when the output is not a terminal (here: pytest's capture), rich's live panel
on a terminal (a pseudo-terminal, driven with pexpect in a subprocess).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import fanflow
from fanflow.testing import ScriptedLLM

LINE = re.compile(r"fanflow: (\d+)(?:/(\d+))? done, (\d+) failed")


def finals(err: str) -> list[tuple[str, str | None, str]]:
    return [m.groups() for m in LINE.finditer(err)]


@pytest.mark.looptime
async def test_map_progress_prints_plain_lines_with_total(
    capsys: pytest.CaptureFixture[str],
) -> None:
    llm = ScriptedLLM(lambda prompt: "ok", latency=4.0)
    items = [{"q": str(i)} for i in range(5)]
    result = await fanflow.map(llm, "{q}", items, concurrency=1, progress=True)
    assert result.outputs == ["ok"] * 5
    err = capsys.readouterr().err
    # 20 s of virtual time: a line at 10 s and at 20 s while running, one at the end.
    lines = finals(err)
    assert lines[0] == ("2", "5", "0")
    assert lines[-1] == ("5", "5", "0")
    assert "ETA" in err


@pytest.mark.looptime
async def test_without_progress_nothing_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    llm = ScriptedLLM(lambda prompt: "ok", latency=4.0)
    await fanflow.map(llm, "{q}", [{"q": "a"}] * 5, concurrency=1)
    assert capsys.readouterr().err == ""


@pytest.mark.looptime
@pytest.mark.parametrize(
    "pattern",
    [
        lambda llm: fanflow.fan_out(llm, "plan", workers=3, progress=True),
        lambda llm: fanflow.vote(llm, "2+2?", n=3, progress=True),
        lambda llm: fanflow.best_of_n(llm, "haiku", n=2, progress=True),
        lambda llm: fanflow.gather(fanflow.call(llm, "a"), fanflow.call(llm, "b"), progress=True),
        lambda llm: fanflow.race(fanflow.call(llm, "a"), fanflow.call(llm, "b"), progress=True),
        lambda llm: fanflow.guarded(llm, "answer", progress=True),
        lambda llm: fanflow.sections(llm, ["intro", "end"], progress=True),
        lambda llm: fanflow.evaluate(llm, "text", criteria=["clear"], progress=True),
        lambda llm: fanflow.ParallelCalls(llm).arun(["a", "b"], progress=True),
        lambda llm: fanflow.call(llm, "a", progress=True),
        lambda llm: fanflow.Skill(llm, "say {x}").arun(x="a", progress=True),
        lambda llm: fanflow.Chain([fanflow.Step(fanflow.Skill(llm, "say {x}"), "y")]).arun(
            {"x": "a"}, progress=True
        ),
        lambda llm: fanflow.Flow([fanflow.Step(fanflow.Skill(llm, "say {x}"), "y")]).arun(
            x="a", progress=True
        ),
    ],
)
async def test_every_pattern_takes_progress(pattern, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    llm = ScriptedLLM(lambda prompt: "1", latency=1.0)
    await pattern(llm)
    done = finals(capsys.readouterr().err)
    assert done, "no progress line"
    assert int(done[-1][0]) >= 1


def test_run_progress_counts_every_call_inside(capsys: pytest.CaptureFixture[str]) -> None:
    llm = ScriptedLLM(lambda prompt: "ok")

    async def job() -> None:
        await fanflow.map(llm, "{q}", [{"q": "a"}, {"q": "b"}])
        await fanflow.vote(llm, "x", n=3, progress=True)  # inside: shown once, by run

    fanflow.run(job, progress=True)
    assert finals(capsys.readouterr().err) == [("5", None, "0")]


def test_sync_run_of_skill_chain_and_flow_takes_progress(
    capsys: pytest.CaptureFixture[str],
) -> None:
    llm = ScriptedLLM(lambda prompt: "ok")
    skill = fanflow.Skill(llm, "say {x}")
    assert skill.run(x="a", progress=True).value == "ok"
    assert finals(capsys.readouterr().err) == [("1", None, "0")]
    for graph in (fanflow.Chain, fanflow.Flow):
        result = graph([fanflow.Step(skill, "y")]).run({"x": "a"}, progress=True)
        assert result.context["y"] == "ok"
        assert finals(capsys.readouterr().err) == [("1", None, "0")]


@pytest.mark.looptime
async def test_as_completed_shows_progress_for_the_streams_lifetime(
    capsys: pytest.CaptureFixture[str],
) -> None:
    llm = ScriptedLLM(lambda prompt: "ok", latency=4.0)
    items = [{"q": str(i)} for i in range(5)]
    seen = 0
    async with fanflow.as_completed(llm, "{q}", items, concurrency=1, progress=True) as results:
        async for record in results:
            seen += 1
            assert record.value == "ok"
            # The caller's own calls between records are not the stream's.
            await fanflow.call(llm, "not counted")
    assert seen == 5
    lines = finals(capsys.readouterr().err)
    assert lines, "no progress line"
    assert lines[-1] == ("5", "5", "0")  # its total, every item, and nothing else


def test_pool_run_progress(capsys: pytest.CaptureFixture[str]) -> None:
    llm = ScriptedLLM(lambda prompt: "ok")
    chain = fanflow.Chain([fanflow.Step(fanflow.Skill(llm, "{text}"), "out")])
    result = fanflow.Pool(chain, [{"text": "a"}, {"text": "b"}], 2).run(progress=True)
    assert [r.output for r in result.items] == ["ok", "ok"]
    assert finals(capsys.readouterr().err)[-1][0] == "2"


def test_live_panel_on_a_terminal(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    pytest.importorskip("rich")
    script = tmp_path / "job.py"
    script.write_text(
        "import fanflow\n"
        "from fanflow.testing import ScriptedLLM\n"
        "llm = ScriptedLLM(lambda p: 'ok', latency=0.05)\n"
        "r = fanflow.run(fanflow.map(llm, '{q}', [{'q': str(i)} for i in range(40)],"
        " concurrency=4, progress=True))\n"
        "print('outputs', len(r.outputs))\n"
    )
    child = pexpect.spawn(
        sys.executable, [str(script)], encoding="utf-8", timeout=60,
        dimensions=(24, 100), env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    child.expect(pexpect.EOF)
    out = child.before
    assert "outputs 40" in out
    assert "40/40 100%" in out  # rich's panel: the bar's count and percentage
    assert "━" in out  # the bar itself
    assert "fanflow: 40/40 done" not in out  # not the plain lines
