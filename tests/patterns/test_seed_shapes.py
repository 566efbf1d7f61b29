"""The patterns exactly as their users write them (issue 16).

Each test uses the call shape that descriptions of the pattern use, quoted in its
docstring.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest

import fanflow
from fanflow import Limits
from fanflow.errors import BadRequest
from fanflow.testing import Fault, ScriptedLLM

from .._helpers import default_of

pytestmark = pytest.mark.looptime


# ------------------------------------------------------------------------- Pool


def test_pool_status_is_a_dictionary_of_counts_and_names_the_items() -> None:
    """ "query the built-in status dictionary to identify exactly which items succeeded
    and which encountered errors": ``pool.status["completed"]``."""

    def process(text: str) -> str:
        if text == "bad":
            raise ValueError("unreadable")
        return text.upper()

    pool = fanflow.Pool(process, [{"text": "a"}, {"text": "bad"}, {"text": "c"}], max_flows=2)
    before = pool.status
    assert before["pending"] == 3
    assert before["completed"] == 0
    pool.run()
    status = pool.status
    assert status["completed"] == 2
    assert status["failed"] == 1
    assert status["total"] == 3
    assert status.which("completed") == (0, 2)
    assert status.which("failed") == (1,)
    assert isinstance(status.errors[1], ValueError)
    assert dict(status)["succeeded"] == 2
    assert "completed" in status
    # The attributes stay.
    assert (status.completed, status.succeeded, status.failed) == (2, 2, 1)
    assert status.items[1].state == "failed"
    with pytest.raises(KeyError, match="use one of total, completed"):
        status["done"]


# ------------------------------------------------------------------------- vote


async def test_vote_unpacks_to_winner_and_confidence() -> None:
    """``winner, confidence = vote(...)``."""
    answers = iter(["Paris", "paris", "Lyon", "Paris.", "Nice"])
    llm = ScriptedLLM(lambda r: next(answers))
    winner, confidence = await fanflow.vote(llm, "Capital of France?", n=5)
    assert winner == "paris"
    assert confidence == 3 / 5


async def test_vote_confidence_has_two_plain_definitions() -> None:
    """2 failed samples of 5 and 3 agreeing: 1.0 of those counted, 0.6 of all drawn."""
    llm = ScriptedLLM(lambda r: "yes", failures={1: BadRequest("no"), 3: BadRequest("no")})
    result = await fanflow.vote(llm, "q", n=5)
    winner, confidence = result
    assert winner == "yes"
    assert confidence == result.share_of_counted == 1.0
    assert result.share_of_samples == 0.6


async def test_vote_over_several_models_prompts_and_a_temperature_range() -> None:
    """Voting "often with different temperatures, prompts, or models"."""
    models = [ScriptedLLM(lambda r: "A", model=f"m{i}") for i in range(3)]
    prompts = ["Answer briefly: {q}", "Think, then answer: {q}"]
    winner, confidence = await fanflow.vote(
        models, [p.format(q="2+2?") for p in prompts], n=6, temperatures=(0.0, 1.0)
    )
    assert (winner, confidence) == ("a", 1.0)
    sent = [(i, r.prompt, r.temperature) for i, m in enumerate(models) for r in m.requests]
    assert sorted(t for _, _, t in sent) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert [len(m.requests) for m in models] == [2, 2, 2]  # sample i -> model i % 3
    assert {p for _, p, _ in sent} == {"Answer briefly: 2+2?", "Think, then answer: 2+2?"}
    # Sample 4 went to model 1, with prompt 0 and temperature 0.8.
    assert (1, "Answer briefly: 2+2?", 0.8) in sent


# ------------------------------------------------------------------------- guards

YES_NO_GUARD = (
    "Is the following request safe to answer?\n{query}\nAnswer YES or NO with brief explanation."
)


def _guard_says(reply: str) -> ScriptedLLM:
    return ScriptedLLM(lambda r: reply if r.prompt.startswith("Is the following") else "answer")


@pytest.mark.parametrize(
    ("reply", "allowed"),
    [
        ("YES - it is a harmless question.", True),
        ("NO. It asks how to hurt someone.", False),
        ("No - it is not safe to answer.", False),
        ("**Yes**, this is safe.", True),
    ],
)
async def test_a_guard_answering_yes_or_no_is_read(reply: str, allowed: bool) -> None:
    """A guard prompt "Answer YES or NO with brief explanation.", asked whether the
    request is safe: ``block_on="NO"`` says so (tests/patterns/test_guard_polarity.py has
    the seed's own question, where YES blocks)."""
    llm = _guard_says(reply)
    result = await fanflow.guarded(
        llm, "hi", guard_prompt=YES_NO_GUARD, fail_closed=True, block_on="NO"
    )
    assert result.allowed is allowed
    assert result.output == ("answer" if allowed else default_of(fanflow.guarded, "refusal"))


async def test_a_guard_reply_that_cannot_be_read_is_quoted_in_the_error() -> None:
    llm = _guard_says("Maybe, it depends.")
    result = await fanflow.guarded(llm, "hi", guard_prompt=YES_NO_GUARD, block_on="NO")
    assert result.refused  # fail_closed
    assert "Maybe, it depends." in str(result.guard_error)
    assert "verdict=" in str(result.guard_error)


async def test_the_caller_may_pass_the_verdict_parser() -> None:
    """A reader of the caller's own: here, YES flags (as ``block_on="YES"`` would)."""
    llm = ScriptedLLM(lambda r: "YES" if r.prompt.startswith("Is this harmful") else "answer")
    result = await fanflow.guarded(
        llm,
        "hi",
        guard_prompt="Is this harmful? {query} Answer YES or NO.",
        verdict=lambda text: text.strip().upper().startswith("YES"),
    )
    assert result.flagged is True
    assert result.refused


# ------------------------------------------------------------------------- fan-out


async def test_fan_out_timeouts_per_worker_and_three_disjoint_groups(looptime: float) -> None:
    """Timeouts "configurable per worker"; "which workers succeeded, failed, or timed
    out"."""
    llm = ScriptedLLM(
        lambda r: "ok",
        latency=2.0,
        fail_on={"Focus on: legal": Fault.raises(BadRequest("refused"))},
    )
    result = await fanflow.fan_out(
        llm,
        "Review the plan.",
        focus=["cost", "legal", "risk", "speed"],
        worker_timeout=[5.0, 5.0, 1.0, None],
        aggregate="concat",
    )
    assert [w.index for w in result.succeeded] == [0, 3]
    assert [w.index for w in result.failed] == [1]
    assert [w.index for w in result.timed_out] == [2]
    assert [w.index for w in result.unsuccessful] == [1, 2]
    assert result.workers[2].record.end == 1.0  # its own limit, not the others'
    assert looptime == 2.0


async def test_worker_timeout_is_not_the_deadline(looptime: float) -> None:
    llm = ScriptedLLM(latency=3.0)
    with pytest.raises(fanflow.QuorumNotMet):
        await fanflow.fan_out(llm, "t", workers=2, worker_timeout=10.0, deadline=1.0)
    assert looptime == 1.0  # the deadline is sooner than the workers' own limit
    with pytest.raises(fanflow.ConfigError, match="worker_timeout has 1 values for 2 workers"):
        await fanflow.fan_out(llm, "t", workers=2, worker_timeout=[1.0])


# ------------------------------------------------------------------------- ParallelCalls

LONG_TEXT = "\n\n".join(f"Paragraph {i}. " + "word " * 20 for i in range(6))


async def test_parallel_calls_split_a_text_and_concatenate_by_code() -> None:
    """``ParallelCalls(...).run(text=..., split=...)``, aggregation "code-based
    (concatenate, merge, vote)"."""
    llm = ScriptedLLM(lambda r: r.prompt.split(".")[0].removeprefix("Summarize: "))
    calls = fanflow.ParallelCalls(llm, max_workers=4)
    result = await calls.arun(
        text=LONG_TEXT, split=300, branch_prompt="Summarize: {input}", aggregate="concatenate"
    )
    assert all(len(chunk) <= 300 for chunk in result.chunks)
    assert len(result.chunks) == 3  # two ~125-character paragraphs per chunk
    assert result.aggregated == "Paragraph 0\n\nParagraph 2\n\nParagraph 4"
    assert llm.calls == 3  # no model call to aggregate
    by_paragraph = await calls.arun(text=LONG_TEXT, split="paragraphs", aggregate=len)
    assert by_paragraph.aggregated == 6


async def test_parallel_calls_merge_and_vote_and_a_function() -> None:
    replies = {"a": '{"names": ["Ann"], "city": "Oslo"}', "b": '{"names": ["Bo", "Ann"]}'}
    llm = ScriptedLLM(lambda r: replies[r.prompt])
    merged = await fanflow.ParallelCalls(llm).arun(["a", "b"], aggregate="merge")
    assert merged.aggregated == {"names": ["Ann", "Bo"], "city": "Oslo"}
    voter = ScriptedLLM(lambda r: {"1": "Yes", "2": "no", "3": "yes."}[r.prompt])
    voted = await fanflow.ParallelCalls(voter).arun(["1", "2", "3"], aggregate="vote")
    assert voted.aggregated == "Yes"

    async def longest(outputs: Sequence[str]) -> str:
        return max(outputs, key=len)

    picked = await fanflow.ParallelCalls(voter).arun(["1", "2", "3"], aggregate=longest)
    assert picked.aggregated == "yes."
    with pytest.raises(fanflow.ConfigError, match="unknown aggregate 'sum'"):
        await fanflow.ParallelCalls(voter).arun(["1"], aggregate="sum")  # type: ignore[arg-type]


async def test_parallel_calls_say_what_to_pass() -> None:
    calls = fanflow.ParallelCalls(ScriptedLLM())
    with pytest.raises(fanflow.ConfigError, match=r"pass either chunks or text=.*not neither"):
        await calls.arun()
    with pytest.raises(fanflow.ConfigError, match="not both"):
        await calls.arun(["a"], text="a")


def test_split_text_alone() -> None:
    assert fanflow.split_text("a\n\nb\n\n\nc") == ["a", "b", "c"]
    assert fanflow.split_text("one two three four", 9) == ["one two", "three", "four"]


# ------------------------------------------------------------------------- sections


async def test_sections_synthesize_by_default_with_the_same_model() -> None:
    """Descriptions of sectioning always aggregate."""
    llm = ScriptedLLM(lambda r: "report" if r.prompt.startswith("Combine") else r.prompt)
    result = await fanflow.sections(llm, {"pros": "Pros of X", "cons": "Cons of X"})
    assert result.synthesis == result.output == "report"
    assert llm.calls == 3
    plain = await fanflow.sections(llm, {"pros": "Pros of X"}, synthesize=False)
    assert plain.synthesis is None
    with pytest.warns(DeprecationWarning, match="use synthesize=False"):
        old = await fanflow.sections(llm, {"pros": "Pros of X"}, synthesize=None)
    assert old.synthesis is None


# ------------------------------------------------------------------------- models


class AgenerateModel:
    """The model shape of many examples of these patterns."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float | None]] = []

    async def agenerate(self, prompt: str, temperature: float | None = None) -> str:
        self.seen.append((prompt, temperature))
        return "Paris"


class ChatModel:
    """A LangChain-style chat model: ``ainvoke(messages)`` returns a message."""

    class Message:
        def __init__(self, content: str) -> None:
            self.content = content

    def __init__(self, temperature: float = 0.0) -> None:
        self.temperature = temperature
        self.seen: list[tuple[Any, float]] = []

    def bind(self, **kwargs: Any) -> ChatModel:
        bound = ChatModel(kwargs.get("temperature", self.temperature))
        bound.seen = self.seen
        return bound

    async def ainvoke(self, messages: Any) -> ChatModel.Message:
        self.seen.append((messages, self.temperature))
        return ChatModel.Message("Paris")


async def _fn(prompt: str) -> str:
    return prompt


@pytest.mark.parametrize(
    ("model", "fix"),
    [
        (AgenerateModel(), "with agenerate(), not a fanflow model; wrap it once: "),
        (ChatModel(), "LangChain-style chat model (ChatModel, with ainvoke())"),
        (_fn, "is a function, not a fanflow model; wrap it once: llm = fanflow.function(fn)"),
        (object(), "must be a fanflow model"),
    ],
)
async def test_foreign_models_are_rejected_at_once_with_the_fix(model: Any, fix: str) -> None:
    with pytest.raises(fanflow.ConfigError, match=fix.replace("(", r"\(").replace(")", r"\)")):
        await fanflow.vote(model, "Capital of France?", n=3)
    if isinstance(model, AgenerateModel | ChatModel):
        assert model.seen == []  # nothing was sent, and nothing failed per item


async def test_a_foreign_model_as_aggregator_or_guard_is_rejected_too() -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.ConfigError, match="aggregate is a AgenerateModel object"):
        await fanflow.fan_out(llm, "t", aggregate=AgenerateModel())  # type: ignore[arg-type]
    with pytest.raises(fanflow.ConfigError, match=r"guard is a LangChain-style chat model"):
        await fanflow.guarded(llm, "q", guard=ChatModel())  # type: ignore[arg-type]
    assert llm.calls == 0


async def test_function_adapts_an_agenerate_model_and_a_chat_model() -> None:
    """The one-line fix works: ``llm = fanflow.function(model)``."""
    model = AgenerateModel()
    winner, _ = await fanflow.vote(fanflow.function(model), "Capital?", n=2, temperature=0.5)
    assert winner == "paris"
    assert model.seen == [("Capital?", 0.5), ("Capital?", 0.5)]
    chat = ChatModel()
    result = await fanflow.map(fanflow.function(chat), "Capital of {input}?", ["France"])
    assert result.outputs == ["Paris"]
    [(messages, temperature)] = chat.seen
    assert temperature == 0.0  # the model's own: map set none
    assert messages == [("user", "Capital of France?")]
    best = await fanflow.best_of_n(fanflow.function(chat), "Capital?", n=1, temperature=0.9)
    assert best.best == "Paris"
    assert chat.seen[-1][1] == 0.9  # bound for the call


# ------------------------------------------------------------------------- throttling


async def test_a_token_bucket_of_10_refilling_2_per_second_is_rpm_120_burst_5(
    looptime: float,
) -> None:
    """ "capacity 10, refill 2 per second": ``Limits(rpm=120, burst=5.0)``."""
    llm = ScriptedLLM(limits=Limits(rpm=120, burst=5.0))
    await fanflow.map(llm, "{input}", range(16))
    starts = sorted(llm.started_at)
    # The bucket's promise: by any time t, at most 10 + 2t sends.
    for k, t in enumerate(starts, 1):
        assert k <= 10 + 2 * t + 1e-9
    assert starts.count(0.0) >= 9  # (nearly) the full bucket goes at once
    # Then 2 a second: the last of the 6 others at 3.0 s (within a few % of margin).
    assert 3.0 <= starts[-1] <= 3.0 / 0.95


async def test_a_delay_based_throttle_doubles_on_429_and_shrinks_on_success(
    looptime: float,
) -> None:
    """ "delay x2 on a rate-limit error, x0.9 on success, bounded": ``Limits.paced()``."""
    limits = Limits.paced(initial=1.0, min=0.5, max=3.0, backoff=2.0, recover=0.9)
    llm = ScriptedLLM(limits=limits, failures={1: Fault.rate_limited(), 2: Fault.rate_limited()})
    retry = fanflow.RetryPolicy(attempts=5, initial=0.0, jitter=False)
    result = await fanflow.map(llm, "{input}", ["a", "b", "c"], concurrency=1, retry=retry)
    assert result.ok
    lane = llm.statistics()
    starts = llm.started_at
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    # 1.0, then 0.9 after the success, 1.8 and 3.0 (bounded) after the two 429s, then x0.9.
    assert gaps == [1.0, 0.9, 1.8, 3.0]
    assert lane.delay == pytest.approx(3.0 * 0.9 * 0.9)


def test_pacing_settings_are_checked() -> None:
    with pytest.raises(fanflow.ConfigError, match="0 < min <= initial <= max"):
        Limits.paced(initial=0.0)
    with pytest.raises(fanflow.ConfigError, match="backoff must be > 1"):
        Limits.paced(backoff=0.5)
