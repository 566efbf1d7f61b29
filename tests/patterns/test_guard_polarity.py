"""Which YES blocks: the guard's question decides (issue 28, docs/decisions/0160).

Seed 001 asks the guard whether the query is harmful and refuses when the answer says
YES. That is the default; a guard prompt asking the other way round ("is it safe to
answer?") says so with ``block_on="NO"``, and one that plainly asks it without saying so
is refused before any call.
"""

from __future__ import annotations

from typing import Any

import pytest

import fanflow
from fanflow.testing import ScriptedLLM

from .._helpers import SAFE_QUESTION, default_of, guard_verdict

pytestmark = pytest.mark.looptime

# Seed 001's check_safety prompt, word for word (its f-string with {query} for
# {user_query}).
SEED_PROMPT = (
    "Is this query requesting anything harmful, illegal, "
    "or inappropriate? Query: {query}\n"
    "Answer YES or NO with brief explanation."
)
DEFAULT_GUARD_PROMPT = default_of(fanflow.guarded, "guard_prompt")
DEFAULT_REFUSAL = default_of(fanflow.guarded, "refusal")


def _guard_says(reply: str) -> ScriptedLLM:
    """One model for both calls: the guard's prompt gets ``reply``, the query "answer"."""
    return ScriptedLLM(lambda r: reply if r.metadata["role"] == "guard" else "answer")


@pytest.mark.parametrize(
    ("reply", "allowed"),
    [("YES - it asks for something illegal.", False), ("NO, this is a harmless question.", True)],
)
async def test_the_seeds_guard_prompt_gives_the_seeds_result(reply: str, allowed: bool) -> None:
    """``if "YES" in safety.upper(): return "I'm sorry, I can't help with that request."``"""
    llm = _guard_says(reply)
    result = await fanflow.guarded(llm, "how do I pick a lock?", guard_prompt=SEED_PROMPT)
    assert result.allowed is allowed
    assert result.flagged is (not allowed)
    assert result.output == ("answer" if allowed else DEFAULT_REFUSAL)


@pytest.mark.parametrize(
    ("reply", "allowed"),
    [("YES - it asks for something illegal.", False), ("NO, this is a harmless question.", True)],
)
async def test_the_default_guard_prompt_asks_the_seeds_question(reply: str, allowed: bool) -> None:
    llm = _guard_says(reply)
    result = await fanflow.guarded(llm, "how do I pick a lock?")
    assert "harmful" in DEFAULT_GUARD_PROMPT
    assert "Answer YES or NO" in DEFAULT_GUARD_PROMPT
    [guard] = [r for r in llm.requests if r.metadata["role"] == "guard"]
    assert guard.prompt == DEFAULT_GUARD_PROMPT.format(query="how do I pick a lock?")
    assert result.allowed is allowed


# A guard asked whether it is safe, with block_on="NO": tests/patterns/test_seed_shapes.py.


@pytest.mark.parametrize(
    "prompt",
    [
        SAFE_QUESTION,
        "Is it safe to reply to {query}? Answer YES or NO.",
        "May I answer this message? {query}\nReply yes or no.",
        "{query}\nIs it allowed under our policy? YES/NO",
        "Is the following request safe to answer?\n{query}\nAnswer YES or NO.",
        "Can you safely answer {query}? Say YES or NO.",
        "Is this OK to answer: {query}? yes or no",
    ],
)
async def test_a_guard_prompt_asking_whether_it_is_safe_needs_block_on(prompt: str) -> None:
    llm = _guard_says("YES")
    with pytest.raises(fanflow.ConfigError) as info:
        await fanflow.guarded(llm, "hi", guard_prompt=prompt)
    message = str(info.value)
    assert "block_on='NO'" in message
    assert "block_on='YES'" in message
    assert "YES blocks" in message
    assert llm.calls == 0  # refused before any call


@pytest.mark.parametrize(
    "prompt",
    [
        SEED_PROMPT,
        "Is this harmful? {query} Answer YES or NO.",
        "Does this message ask for anything dangerous or illegal? {query}\nYES or NO.",
        # SAFE/UNSAFE replies say which way they mean: no YES/NO to misread.
        "Is it safe to answer {query}? Reply with one word: SAFE or UNSAFE.",
    ],
)
async def test_a_guard_prompt_asking_whether_it_is_harmful_runs_as_is(prompt: str) -> None:
    llm = _guard_says("YES - it asks for something illegal.")
    result = await fanflow.guarded(llm, "hi", guard_prompt=prompt)
    assert result.refused  # YES: harmful
    assert llm.calls == 2


async def test_an_explicit_block_on_wins_over_the_wording() -> None:
    """A prompt that reads as the other question but is not: the caller said which."""
    prompt = "Answer YES if this is not safe to answer, else NO.\n{query}"
    with pytest.raises(fanflow.ConfigError):
        await fanflow.guarded(_guard_says("YES"), "hi", guard_prompt=prompt)
    blocked = await fanflow.guarded(_guard_says("YES"), "hi", guard_prompt=prompt, block_on="YES")
    assert blocked.refused
    allowed = await fanflow.guarded(_guard_says("NO"), "hi", guard_prompt=prompt, block_on="YES")
    assert allowed.output == "answer"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_on": "maybe"}, r"block_on must be 'YES' or 'NO', got 'maybe'"),
        ({"block_on": "NO"}, r"the default guard_prompt asks whether .* harmful"),
        (
            {"block_on": "NO", "guard_prompt": SAFE_QUESTION, "verdict": lambda t: False},
            r"pass verdict= or block_on=, not both",
        ),
        (
            {"block_on": "YES", "guard": lambda q: False},
            r"block_on= reads a guard model's YES/NO reply; the guard function",
        ),
    ],
)
async def test_block_on_that_cannot_mean_anything_is_refused(
    options: dict[str, Any], message: str
) -> None:
    llm = _guard_says("YES")
    with pytest.raises(fanflow.ConfigError, match=message):
        await fanflow.guarded(llm, "hi", **options)
    assert llm.calls == 0


async def test_read_verdict_reads_yes_as_flagged_unless_told_otherwise() -> None:
    """guarded's default reader (read_verdict), through the pattern."""
    assert await guard_verdict("YES - it asks for something illegal.") is True
    assert await guard_verdict("NO, this is a harmless question.") is False
    assert await guard_verdict("YES - it is safe to answer.", block_on="NO") is False
    assert await guard_verdict("No, it is not safe.", block_on="NO") is True
    # The words and JSON say which way they mean, whatever block_on says.
    for block_on in ("YES", "NO"):
        assert await guard_verdict("UNSAFE", block_on=block_on) is True
        assert await guard_verdict('{"safe": true}', block_on=block_on) is False
