from __future__ import annotations

import pytest

import fanflow
from fanflow import AllFailed, Request, Status
from fanflow.errors import BadRequest
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime


def candidates(request: Request) -> str:
    return f"draft {request.sample}"


@pytest.mark.parametrize(
    ("reply", "count", "expected"),
    [
        ("Candidate 2 is clearly the best.", 3, 2),
        ('{"best": 3, "reason": "complete"}', 3, 3),
        ('```json\n{"choice": "2"}\n```', 3, 2),
        ("I pick #1 because it is short; 7 reasons.", 3, 1),
        ("2", 3, 2),
        ("garbage with no digits", 3, None),
        ("Candidate 9", 3, None),
        ("Candidate 0", 3, None),
        ("2.5", 3, None),
        ("-1", 3, None),
        ("", 3, None),
        ('{"best": null}', 3, None),
    ],
)
async def test_parse_choice(reply: str, count: int, expected: int | None) -> None:
    """How best_of_n reads its judge's reply: candidate ``expected`` (1-based), or None
    (it named none of 1..count: the first candidate, as a fallback)."""
    judge = ScriptedLLM(reply)
    result = await fanflow.best_of_n(ScriptedLLM(candidates), "write", n=count, judge=judge)
    assert judge.calls == 1
    if expected is None:
        assert (result.index, result.selection) == (0, "fallback")
        assert result.fallback_reason is not None
        assert f"named no candidate in 1..{count}" in result.fallback_reason
    else:
        assert (result.index, result.selection) == (expected - 1, "judge")
        assert result.best == f"draft {expected - 1}"


async def test_judge_picks_a_candidate(looptime: float) -> None:
    llm = ScriptedLLM(candidates, latency=1.0)
    judge = ScriptedLLM("After review, Candidate 2 is best.", latency=1.0)
    result = await fanflow.best_of_n(llm, "write", n=3, judge=judge, criteria="wit")
    assert (result.best, result.index, result.selection) == ("draft 1", 1, "judge")
    assert result.fallback_reason is None
    assert looptime == 2.0  # three candidates at once, then the judge
    prompt = judge.requests[0].prompt
    assert "wit" in prompt
    assert all(f"Candidate {k}:\ndraft {k - 1}" in prompt for k in (1, 2, 3))
    assert result.judge_reply == "After review, Candidate 2 is best."
    assert len(result.records) == 4


@pytest.mark.parametrize("reply", ["I cannot decide.", "Candidate 7", "{oops"])
async def test_unusable_judge_reply_falls_back_to_the_first(reply: str) -> None:
    llm = ScriptedLLM(candidates)
    result = await fanflow.best_of_n(llm, "write", n=3, judge=ScriptedLLM(reply))
    assert (result.best, result.index, result.selection) == ("draft 0", 0, "fallback")
    assert result.fallback_reason is not None
    assert "named no candidate in 1..3" in result.fallback_reason


async def test_failed_judge_falls_back_and_says_why() -> None:
    llm = ScriptedLLM(candidates)
    judge = ScriptedLLM(failures={0: BadRequest("judge down")})
    result = await fanflow.best_of_n(llm, "write", n=2, judge=judge)
    assert result.selection == "fallback"
    assert result.fallback_reason == "the judge failed: BadRequest: judge down"
    assert result.judge is not None
    assert result.judge.status is Status.FAILED


async def test_candidates_failing_are_skipped_in_numbering() -> None:
    llm = ScriptedLLM(candidates, failures={0: BadRequest("x")})
    result = await fanflow.best_of_n(llm, "w", n=3, judge=ScriptedLLM("Candidate 2"))
    # Candidate 2 of the two that succeeded is sample 2.
    assert (result.best, result.index) == ("draft 2", 2)


async def test_one_success_needs_no_judge_and_none_raises() -> None:
    llm = ScriptedLLM(candidates, failures={0: BadRequest("x"), 1: BadRequest("y")})
    judge = ScriptedLLM("1")
    result = await fanflow.best_of_n(llm, "w", n=3, judge=judge)
    assert (result.best, result.selection) == ("draft 2", "only")
    assert judge.calls == 0
    failing = ScriptedLLM(failures={0: BadRequest("x"), 1: BadRequest("y")})
    with pytest.raises(AllFailed, match="all 2 candidates failed"):
        await fanflow.best_of_n(failing, "w", n=2)
