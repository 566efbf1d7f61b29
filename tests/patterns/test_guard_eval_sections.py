from __future__ import annotations

import asyncio

import pytest

import fanflow
from fanflow import Request, Status
from fanflow.errors import BadRequest, ParseError
from fanflow.testing import Fault, ScriptedLLM

from .._helpers import default_of, guard_verdict

pytestmark = pytest.mark.looptime


# ------------------------------------------------------------------------- guarded


async def test_flagged_query_cancels_the_running_answer(looptime: float) -> None:
    answer = ScriptedLLM("the answer", latency=5.0)
    guard = ScriptedLLM("UNSAFE", latency=1.0)
    result = await fanflow.guarded(answer, "how to x", guard=guard, refusal="No.")
    assert (result.output, result.allowed, result.flagged) == ("No.", False, True)
    assert result.refused
    assert result.answer.status is Status.CANCELLED
    assert result.first_finished == "guard"
    assert looptime == 1.0  # no waiting for the answer
    assert answer.in_flight == 0
    assert result.time_saved == 0.0


async def test_safe_query_returns_the_answer_and_the_time_saved(looptime: float) -> None:
    answer = ScriptedLLM("the answer", latency=3.0)
    guard = ScriptedLLM("SAFE", latency=1.0)
    result = await fanflow.guarded(answer, "hello", guard=guard)
    assert (result.output, result.allowed, result.flagged) == ("the answer", True, False)
    assert result.first_finished == "guard"
    assert looptime == 3.0
    assert result.time_saved == 1.0  # guard then answer would take 4 s
    assert "hello" in guard.requests[0].prompt


async def test_answer_finishing_first_waits_for_the_guard(looptime: float) -> None:
    answer = ScriptedLLM("the answer", latency=1.0)
    guard = ScriptedLLM("Verdict: safe", latency=2.0)
    result = await fanflow.guarded(answer, "hello", guard=guard)
    assert result.first_finished == "answer"
    assert result.output == "the answer"
    assert looptime == 2.0
    assert result.time_saved == 1.0
    flagged = await fanflow.guarded(answer, "x", guard=ScriptedLLM("UNSAFE", latency=2.0))
    assert flagged.output == default_of(fanflow.guarded, "refusal")
    assert flagged.answer.status is Status.SUCCEEDED  # done already, but withheld


@pytest.mark.parametrize(("fail_closed", "allowed"), [(True, False), (False, True)])
async def test_guard_failure_is_decided_by_fail_closed(fail_closed: bool, allowed: bool) -> None:
    answer = ScriptedLLM("the answer", latency=1.0)
    for guard in (ScriptedLLM(failures={0: BadRequest("down")}), ScriptedLLM("maybe?")):
        result = await fanflow.guarded(answer, "q", guard=guard, fail_closed=fail_closed)
        assert result.flagged is None
        assert result.allowed is allowed
        assert result.output == (
            "the answer" if allowed else "Sorry, I can't help with that request."
        )
        assert result.guard_error is not None
    assert isinstance(result.guard_error, ParseError)


async def test_function_guard(looptime: float) -> None:
    answer = ScriptedLLM("ok", latency=2.0)

    async def guard(query: str) -> bool:
        await asyncio.sleep(0.5)
        return "bomb" in query

    assert (await fanflow.guarded(answer, "cake", guard=guard)).output == "ok"
    assert looptime == 2.0
    result = await fanflow.guarded(answer, "bomb", guard=guard)
    assert result.refused
    assert looptime == 2.5
    bad = await fanflow.guarded(answer, "cake", guard=lambda q: "yes")
    assert bad.refused
    assert isinstance(bad.guard_error, TypeError)


async def test_read_verdict() -> None:
    """guarded's default reader (read_verdict), through the pattern."""
    assert await guard_verdict("UNSAFE") is True
    assert await guard_verdict("This is safe.") is False
    assert await guard_verdict("This is not safe.") is True
    assert await guard_verdict('{"flagged": true}') is True
    assert await guard_verdict('{"safe": true}') is False
    with pytest.raises(ParseError, match=r"neither SAFE/UNSAFE nor YES/NO: 'dunno'"):
        await guard_verdict("dunno")


# ------------------------------------------------------------------------- evaluate


async def test_evaluate_scores_each_criterion_at_once(looptime: float) -> None:
    replies = {
        "accuracy": '{"score": 9, "explanation": "All facts check out."}',
        "clarity": "Score: 7/10. Mostly clear.",
        "completeness": "It is fine.",
        "tone": "15",
    }

    def grade(request: Request) -> str:
        return replies[request.metadata["criterion"]]

    result = await fanflow.evaluate(ScriptedLLM(grade, latency=1.0), "some text")
    assert looptime == 1.0
    assert result.scores == {"accuracy": 9, "clarity": 7, "completeness": None, "tone": None}
    assert result["accuracy"].explanation == "All facts check out."
    assert result["clarity"].explanation == "Score: 7/10. Mostly clear."
    assert result["completeness"].status is Status.FAILED
    assert isinstance(result["completeness"].error, ParseError)
    assert "score 15 is outside 1..10" in str(result["tone"].error)
    assert "no score in the reply" in str(result["completeness"].error)
    assert result.mean == 8.0
    assert [s.criterion for s in result.criteria] == list(replies)


async def test_evaluate_failure_is_data() -> None:
    llm = ScriptedLLM('{"score": 5}', fail_on={"for tone": Fault.raises(BadRequest("no"))})
    result = await fanflow.evaluate(llm, "x", ["accuracy", "tone"], scale=(0, 5))
    assert result.scores == {"accuracy": 5, "tone": None}
    assert isinstance(result["tone"].error, BadRequest)


# ------------------------------------------------------------------------- sections


async def test_sections_then_synthesis(looptime: float) -> None:
    llm = ScriptedLLM(lambda r: f"[{r.prompt}]", latency=1.0)
    synth = ScriptedLLM("report", latency=2.0)
    result = await fanflow.sections(
        llm,
        {"market": "Market of {input}", "risks": "Risks of {input}"},
        input="ACME",
        synthesize=synth,
    )
    assert result.sections == {"market": "[Market of ACME]", "risks": "[Risks of ACME]"}
    assert result.synthesis == result.output == "report"
    assert "## market\n[Market of ACME]" in synth.requests[0].prompt
    assert looptime == 3.0
    assert result.busy_time == 4.0


async def test_failed_section_is_data_and_not_synthesized() -> None:
    llm = ScriptedLLM(lambda r: r.prompt, fail_on={"^b$": Fault.raises(BadRequest("x"))})
    synth = ScriptedLLM(lambda r: r.prompt)
    result = await fanflow.sections(llm, ["a", "b", "c"], synthesize=synth)
    assert result.sections == {"section 0": "a", "section 1": None, "section 2": "c"}
    assert list(result.errors) == ["section 1"]
    assert "## section 1" not in synth.requests[0].prompt
    plain = await fanflow.sections(llm, ["a", "c"], synthesize=False)
    assert plain.synthesis is None
    assert plain.output == "## section 0\na\n\n## section 1\nc"


# ------------------------------------------------------------------------- ParallelCalls


async def test_parallel_calls_outputs_in_order_then_aggregate(looptime: float) -> None:
    def reply(request: Request) -> str:
        if request.prompt.startswith("Rank"):
            return "ranked"
        return request.prompt.upper()

    llm = ScriptedLLM(
        reply,
        latency=lambda rng, r: 1.0 if r.prompt.startswith("Rank") else float(len(r.prompt) % 3 + 1),
        fail_on={"bob": Fault.raises(BadRequest("no"))},
    )
    pc = fanflow.ParallelCalls(llm=llm, max_workers=2)
    result = await pc.arun(
        chunks=["ann", "bob", "cy", "dee"],
        branch_prompt="Score: {input}",
        aggregate_prompt="Rank these:\n{input}",
    )
    assert result.outputs == ["SCORE: ANN", None, "SCORE: CY", "SCORE: DEE"]
    assert list(result.errors) == [1]
    assert result.aggregated == "ranked"
    assert "[0]\nSCORE: ANN\n\n[2]\nSCORE: CY\n\n[3]\nSCORE: DEE" in llm.requests[-1].prompt
    assert llm.max_in_flight == 2
    assert repr(pc).startswith("fanflow.ParallelCalls(")


def test_parallel_calls_run_from_sync_code() -> None:
    result = fanflow.ParallelCalls(ScriptedLLM(lambda r: r.prompt[::-1])).run(["ab", "cd"])
    assert result.outputs == ["ba", "dc"]
    assert result.aggregated is None


async def test_parallel_calls_run_inside_async_code_says_to_await() -> None:
    # In a notebook it runs (tests/test_sync.py); in other async code it would block
    # the running loop, so it refuses with the fix.
    with pytest.raises(fanflow.ConfigError, match=r"await skill\.arun\(\)"):
        fanflow.ParallelCalls(ScriptedLLM(lambda r: r.prompt[::-1])).run(["ab"])
