from __future__ import annotations

from collections.abc import Sequence

import pytest

import fanflow
from fanflow import AllFailed, Request
from fanflow.errors import BadRequest, ParseError
from fanflow.patterns._vote import beta_confidence, default_wave, normalize_answer
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime


def by_sample(replies: Sequence[str | Exception]) -> ScriptedLLM:
    def reply(request: Request) -> str:
        got = replies[request.sample]
        if isinstance(got, Exception):
            raise got
        return got

    return ScriptedLLM(reply, latency=1.0)


async def test_majority_over_normalized_answers(looptime: float) -> None:
    llm = by_sample(["Paris", " paris.", "London", "PARIS", "london"])
    result = await fanflow.vote(llm, "Capital of France?", n=5)
    assert result.winner == "paris"
    assert (result.count, result.n_counted) == (3, 5)
    assert result.confidence == 3 / 5
    assert result.distribution == {"paris": 3, "london": 2}
    assert result.tied == ("paris",)
    assert not result.tie
    assert result.samples_used == 5
    assert not result.stopped_early
    assert looptime == 1.0  # all five at once
    assert [r.temperature for r in llm.requests] == [0.7] * 5
    assert len({r.key for r in llm.requests}) == 5  # one key per sample


async def test_tie_goes_to_the_answer_seen_first() -> None:
    result = await fanflow.vote(by_sample(["b", "a", "a", "b"]), "?", n=4)
    assert result.tie
    assert result.tied == ("b", "a")
    assert result.winner == "b"
    assert result.confidence == 0.5


async def test_failures_are_excluded_and_reported() -> None:
    result = await fanflow.vote(by_sample(["x", "y", BadRequest("refused"), "x", "x"]), "?", n=5)
    assert (result.winner, result.count, result.n_counted) == ("x", 3, 4)
    assert result.confidence == 3 / 4
    assert list(result.failures) == [2]
    assert isinstance(result.failures[2], BadRequest)


async def test_custom_normalize_and_a_normalizer_that_raises() -> None:
    def final_answer(text: str) -> str:
        if "Answer:" not in text:
            raise ValueError("no final answer")
        return text.rsplit("Answer:", 1)[1].strip()

    llm = by_sample(["so... Answer: 42", "hmm", "Answer: 41", "x Answer: 42"])
    result = await fanflow.vote(llm, "?", n=4, normalize=final_answer)
    assert result.winner == "42"
    assert result.distribution == {"42": 2, "41": 1}
    assert isinstance(result.failures[1], ParseError)
    exact = await fanflow.vote(by_sample(["A", "a", "a"]), "?", n=3, normalize=None)
    assert exact.distribution == {"a": 2, "A": 1}


async def test_early_stop_when_the_leader_cannot_be_overtaken(looptime: float) -> None:
    llm = by_sample(["yes"] * 5)
    result = await fanflow.vote(llm, "?", n=5, early_stop=True)
    assert default_wave(5) == 3
    assert result.samples_used == 3
    assert result.stopped_early
    assert result.stop_reason == "unbeatable"
    assert llm.calls == 3
    assert looptime == 1.0


async def test_early_stop_by_the_beta_rule(looptime: float) -> None:
    llm = by_sample(["yes"] * 20)
    result = await fanflow.vote(llm, "?", n=20, early_stop=True, wave=5)
    # 5 of 5 agree: 5 > 0 + 15 is false, but P(p > 0.5 | Beta(6, 1)) = 31/32 > 0.95.
    assert (result.samples_used, result.stop_reason) == (5, "beta")
    assert result.confidence == 1.0
    assert looptime == 1.0


async def test_early_stop_keeps_sampling_while_unsettled(looptime: float) -> None:
    llm = by_sample(["a", "b", "a", "b", "b"])
    result = await fanflow.vote(llm, "?", n=5, early_stop=True)
    assert result.samples_used == 5
    assert not result.stopped_early
    assert result.winner == "b"  # 3 of 5
    assert looptime == 2.0  # waves of 3 then 2


async def test_all_samples_failing_raises_all_failed() -> None:
    with pytest.raises(AllFailed, match="all 2 samples failed"):
        await fanflow.vote(by_sample([BadRequest("x"), BadRequest("y")]), "?", n=2)


def test_beta_confidence_is_exact() -> None:
    assert beta_confidence(0, 0) == 0.5
    assert beta_confidence(3, 0) == 15 / 16
    assert beta_confidence(4, 0) == 31 / 32
    assert beta_confidence(2, 1) == 11 / 16
    assert beta_confidence(1, 2) == 5 / 16


def test_normalize_answer() -> None:
    assert normalize_answer("  The   Answer. ") == "the answer"
    assert default_wave(1) == 1
    assert default_wave(40) == 5


async def test_bad_options_are_refused() -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.ConfigError, match="n must be >= 1"):
        await fanflow.vote(llm, "?", n=0)
    with pytest.raises(fanflow.ConfigError, match="wave must be >= 1"):
        await fanflow.vote(llm, "?", early_stop=True, wave=0)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        # Both temperatures: the spread would silently win over the one given.
        ({"temperature": 0.2, "temperatures": (0.0, 1.0)}, ("temperature=", "temperatures=")),
        # Even when the one given is the default's value.
        ({"temperature": 0.7, "temperatures": (0.0, 1.0)}, ("temperature=", "temperatures=")),
        # A wave size without early_stop: nothing is sampled in waves.
        ({"wave": 2}, ("wave=", "early_stop=True")),
        # More models or prompts than samples: the last ones would never be asked.
        ({"n": 2, "models": 3}, ("3 models", "n=2")),
        ({"n": 2, "task": ["a", "b", "c"]}, ("3 prompts", "n=2")),
    ],
)
async def test_contradictory_options_are_refused_naming_both(
    kwargs: dict[str, object], names: tuple[str, ...]
) -> None:
    llm = ScriptedLLM()
    models = kwargs.pop("models", None)
    task = kwargs.pop("task", "?")
    target = [ScriptedLLM() for _ in range(models)] if isinstance(models, int) else llm
    with pytest.raises(fanflow.ConfigError) as info:
        await fanflow.vote(target, task, **kwargs)  # type: ignore[arg-type]
    for name in names:
        assert name in str(info.value)
    assert llm.calls == 0


async def test_the_default_temperature_leaves_temperatures_alone() -> None:
    seen: list[float | None] = []

    def reply(request: Request) -> str:
        seen.append(request.temperature)
        return "a"

    await fanflow.vote(ScriptedLLM(reply), "?", n=3, temperatures=(0.0, 1.0))
    assert sorted(t for t in seen if t is not None) == [0.0, 0.5, 1.0]
    seen.clear()
    await fanflow.vote(ScriptedLLM(reply), "?", n=2)
    assert seen == [0.7, 0.7]
