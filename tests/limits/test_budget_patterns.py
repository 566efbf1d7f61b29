"""``budget=`` on every pattern: all of a pattern's calls draw on one cap, never overshoot
it together, and what the cap cannot cover ends ``skipped`` while finished work is kept.

Every call here reserves $20 (``max_tokens=20`` at $1 per output token; input is free,
so the estimate does not depend on the prompt) and spends $15 (15 output tokens), one
virtual second after it starts. With $50, two calls reserve at once and a third waits;
when they settle ($30 spent) it fits exactly; after it ($45 spent) nothing fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

import fanflow
from fanflow import Budget, BudgetExceeded, Price, Request, Response, Status, Usage
from fanflow.testing import ScriptedLLM

from .._helpers import default_of

pytestmark = pytest.mark.looptime

PRICES = {"meter": Price(input=0.0, output=1_000_000.0)}  # $1 per output token
RESERVE, SPEND = 20.0, 15.0


def _meter(text: str = "blue", *, latency: Any = 1.0, **kwargs: Any) -> ScriptedLLM:
    def reply(request: Request) -> Response:
        return Response(text, usage=Usage(5, 15), model=request.model)

    return ScriptedLLM(reply, latency=latency, model="meter", defaults={"max_tokens": 20}, **kwargs)


def _check(budget: Budget, records: Sequence[fanflow.CallRecord[Any]]) -> None:
    """The budget held, its accounting matches the records, and skips say why."""
    stats = budget.statistics()
    assert stats.reserved == 0
    assert budget.spent <= budget.limit
    assert sum(r.cost or 0.0 for r in records) == budget.spent
    for r in records:
        if r.status is Status.SKIPPED:
            assert isinstance(r.error, BudgetExceeded)
            assert "raise budget=" in str(r.error)
            assert r.cost is None
            assert not r.attempts


async def test_call_gather_and_race_share_one_budget(looptime: float) -> None:
    llm = _meter()
    budget = Budget(usd=50, prices=PRICES)
    calls = [fanflow.call(llm, f"q{i}", budget=budget) for i in range(4)]
    records = await fanflow.gather(*calls, settled=True)
    assert [r.status for r in records] == [Status.SUCCEEDED] * 3 + [Status.SKIPPED]
    assert [r.value.text for r in records[:3]] == ["blue"] * 3
    assert budget.spent == 45
    assert llm.calls == 3
    _check(budget, records)
    # Awaited directly, a call the budget cannot cover raises the reason.
    with pytest.raises(BudgetExceeded, match="raise budget="):
        await fanflow.call(llm, "one more", budget=budget)
    with pytest.raises(fanflow.AllFailed):
        await fanflow.race(fanflow.call(llm, "r", budget=budget))
    # A number is dollars; prices= prices the model for it.
    reply = await fanflow.call(llm, "cheap", budget=20.0, prices=PRICES)
    assert reply.text == "blue"
    assert looptime == 3.0


async def test_fan_out_skips_workers_and_the_aggregator_then_concats(looptime: float) -> None:
    llm = _meter()
    result = await fanflow.fan_out(llm, "Name a colour", workers=4, budget=50.0, prices=PRICES)
    # Three workers fit ($45); the fourth and the aggregator ($20 each) do not.
    assert [w.status for w in result.workers] == [Status.SUCCEEDED] * 3 + [Status.SKIPPED]
    assert result.aggregation == "concat"
    assert isinstance(result.aggregation_error, BudgetExceeded)
    assert result.aggregator is not None
    assert result.aggregator.status is Status.SKIPPED
    assert result.answer == "\n\n---\n\n".join(["blue"] * 3)
    # The reason names what was skipped.
    assert str(result.workers[3].error).startswith("item 3 (worker 3) was skipped: it needs")
    assert sum(r.cost or 0.0 for r in result.records) == 45
    assert llm.calls == 3
    assert looptime == 2.0


async def test_fan_out_aggregator_counts_against_the_workers_budget() -> None:
    llm = _meter()
    budget = Budget(usd=79, prices=PRICES)
    result = await fanflow.fan_out(llm, "Name a colour", workers=4, budget=budget)
    assert all(w.ok for w in result.workers)
    assert result.aggregation == "concat"  # $60 spent: $20 more would pass $79
    _check(budget, result.records)
    budget = Budget(usd=60 + RESERVE, prices=PRICES)
    result = await fanflow.fan_out(llm, "Name a colour", workers=4, budget=budget)
    assert result.aggregation == "llm"
    assert budget.spent == 5 * SPEND
    _check(budget, result.records)


async def test_vote_counts_only_the_samples_that_ran(looptime: float) -> None:
    llm = _meter()
    budget = Budget(usd=50, prices=PRICES)
    result = await fanflow.vote(llm, "colour?", n=5, budget=budget)
    assert result.winner == "blue"
    assert result.n_counted == 3
    assert result.samples_used == 3
    assert sorted(result.failures) == [3, 4]
    _check(budget, result.records)
    assert budget.spent == 45


async def test_vote_stops_drawing_waves_once_the_budget_is_spent() -> None:
    llm = ScriptedLLM(
        lambda r: Response(f"a{r.sample}", usage=Usage(5, 15), model=r.model),
        latency=1.0,
        model="meter",
        defaults={"max_tokens": 20},
    )
    budget = Budget(usd=50, prices=PRICES)
    result = await fanflow.vote(llm, "q", n=9, early_stop=True, wave=2, budget=budget)
    # Waves of 2: the first runs ($30); of the second, one fits ($45), one is skipped,
    # and no third wave is drawn.
    assert len(result.records) == 4
    assert [r.status for r in result.records] == [Status.SUCCEEDED] * 3 + [Status.SKIPPED]
    assert result.samples_used == 3
    _check(budget, result.records)


async def test_best_of_n_falls_back_when_the_judge_is_skipped() -> None:
    llm = _meter()
    budget = Budget(usd=60, prices=PRICES)
    result = await fanflow.best_of_n(llm, "write", n=3, budget=budget)
    assert result.selection == "fallback"
    assert result.fallback_reason is not None
    assert "BudgetExceeded" in result.fallback_reason
    assert result.best == "blue"
    assert result.judge is not None
    assert result.judge.status is Status.SKIPPED
    assert [c.status for c in result.candidates] == [Status.SUCCEEDED] * 3
    _check(budget, result.records)


async def test_guarded_with_a_skipped_guard_lets_fail_closed_decide(looptime: float) -> None:
    # $30: the answer reserves $20 first; the guard waits for it, then cannot fit.
    llm = _meter()
    budget = Budget(usd=30, prices=PRICES)
    result = await fanflow.guarded(llm, "hi", fail_closed=False, budget=budget)
    assert result.allowed
    assert result.output == "blue"
    assert isinstance(result.guard_error, BudgetExceeded)
    assert str(result.guard_error).startswith("the 'guard' call was skipped")
    _check(budget, result.records)
    closed = await fanflow.guarded(llm, "hi", budget=Budget(usd=30, prices=PRICES))
    assert closed.refused
    assert closed.output == default_of(fanflow.guarded, "refusal")
    assert closed.answer.ok  # the answer was already paid for: its record is kept
    assert looptime == 2.0


async def test_evaluate_scores_the_criteria_it_could_pay_for() -> None:
    llm = _meter("7")
    budget = Budget(usd=50, prices=PRICES)
    result = await fanflow.evaluate(llm, "text", ["a", "b", "c", "d"], budget=budget)
    assert result.scores == {"a": 7.0, "b": 7.0, "c": 7.0, "d": None}
    assert isinstance(result["d"].error, BudgetExceeded)
    _check(budget, result.records)


async def test_sections_without_the_synthesis_join_the_sections() -> None:
    llm = _meter()
    budget = Budget(usd=60, prices=PRICES)
    result = await fanflow.sections(
        llm, {"x": "one", "y": "two", "z": "three"}, synthesize=llm, budget=budget
    )
    assert result.sections == {"x": "blue", "y": "blue", "z": "blue"}
    assert result.synthesis is None
    assert result.synthesis_record is not None
    assert result.synthesis_record.status is Status.SKIPPED
    assert result.output == "## x\nblue\n\n## y\nblue\n\n## z\nblue"
    _check(budget, result.records)


async def test_parallel_calls_cap_branches_and_aggregate_together() -> None:
    llm = _meter()
    pc = fanflow.ParallelCalls(llm, max_workers=4, budget=50.0, prices=PRICES)
    result = await pc.arun(["a", "b", "c", "d"], aggregate_prompt="merge {input}")
    assert result.outputs == ["blue", "blue", "blue", None]
    assert isinstance(result.errors[3], BudgetExceeded)
    assert result.aggregated is None
    assert result.aggregate_record is not None
    assert result.aggregate_record.status is Status.SKIPPED
    assert result.summary.cost == 45
    # A number is a new cap for each run.
    again = await pc.arun(["a", "b"], aggregate_prompt="merge {input}")
    assert again.aggregated == "blue"
    assert again.summary.cost == 45


async def test_skill_validation_retries_count_and_stop_at_the_budget() -> None:
    def reply(request: Request) -> Response:
        text = "seven" if len(request.messages) == 1 else "7"
        return Response(text, usage=Usage(5, 15), model=request.model)

    llm = ScriptedLLM(reply, model="meter", defaults={"max_tokens": 20})
    budget = Budget(usd=30, prices=PRICES)
    skill = fanflow.Skill(llm, "count {x}", output=int, budget=budget)
    result = await skill.arun(x="sheep")
    # The first reply fails validation ($15 spent); the retry's $20 does not fit.
    assert result.status is Status.SKIPPED
    assert isinstance(result.error, BudgetExceeded)
    assert [c.status for c in result.calls] == [Status.FAILED, Status.SKIPPED]
    _check(budget, result.calls)
    assert (
        await fanflow.Skill(llm, "count {x}", output=int, budget=40.0, prices=PRICES)(x="sheep")
        == 7
    )


async def test_chain_skips_the_step_it_cannot_pay_for_and_keeps_the_rest() -> None:
    llm = _meter()
    a = fanflow.Skill(llm, "first {x}", name="a")
    b = fanflow.Skill(llm, "second {a}", name="b")
    chain = fanflow.Chain(
        [fanflow.Step(a, output="a"), fanflow.Step(b, output="b")], budget=30.0, prices=PRICES
    )
    for _ in range(2):  # a number is a new cap for each run
        run = await chain.arun(x="go")
        assert run.status is Status.SKIPPED
        assert run.failed_step == "b"
        assert isinstance(run.error, BudgetExceeded)
        assert run.context["a"] == "blue"
        assert run.step["a"].ok
        assert run.summary.cost == 15
    assert llm.calls == 2


async def test_flow_budget_covers_parallel_steps_and_skips_their_dependent() -> None:
    llm = _meter()
    budget = Budget(usd=40)
    flow = fanflow.Flow(
        [
            fanflow.Step(fanflow.Skill(llm, "c {a} {b}", name="c"), output="c"),
            fanflow.Step(fanflow.Skill(llm, "a {x}", name="a"), output="a"),
            fanflow.Step(fanflow.Skill(llm, "b {x}", name="b"), output="b"),
        ],
        budget=budget,
        prices=PRICES,
    )
    run = await flow.arun(x="go")
    # c is declared first but runs last: it is the step the budget skipped.
    assert run.status is Status.SKIPPED
    assert run.failed_step == "c"
    assert run.context["a"] == run.context["b"] == "blue"
    _check(budget, run.records)
    assert budget.spent == 30


async def test_one_budget_over_a_pool_of_20_items_never_overshoots(looptime: float) -> None:
    llm = _meter(latency=(0.5, 1.5), seed=7)
    budget = Budget(usd=250)
    first = fanflow.Skill(llm, "summarize {text}", name="summarize")
    second = fanflow.Skill(llm, "title {summarize}", name="title")
    chain = fanflow.Chain([fanflow.Step(first, "summarize"), fanflow.Step(second, "title")])
    inputs = [{"text": f"doc {i}"} for i in range(20)]
    pool = fanflow.Pool(chain, inputs, max_flows=8, budget=budget, prices=PRICES)
    result = await pool.arun()
    assert llm.max_in_flight == 8
    _check(budget, result.records)
    # A skip happens only with nothing reserved and under $20 left: $230 < spent <= $250.
    assert budget.spent == 240
    assert llm.calls == 16
    states = [r.status for r in result.items]
    assert set(states) == {Status.SUCCEEDED, Status.SKIPPED}
    done = [r for r in result.items if r.ok]
    assert all(r.output == "blue" and len(r.records) == 2 for r in done)
    for r in result.items:
        if not r.ok:
            assert isinstance(r.error, BudgetExceeded)
            assert r.failed_step in ("summarize", "title")
            assert f"item {r.index} ({r.failed_step}) was skipped" in str(r.error)
            # A first step that ran keeps its value even though the item was skipped.
            assert (r.failed_step == "title") == ("summarize" in r.context)
    status = pool.status
    assert status.succeeded == len(done)
    assert status.failed == 20 - len(done)
    assert {it.state for it in status.items if it.state != "succeeded"} == {"skipped"}


async def test_a_pool_budget_overrides_the_skills_own() -> None:
    llm = _meter()
    skill = fanflow.Skill(llm, "x {text}", budget=1000.0, prices=PRICES)
    pool = fanflow.Pool(skill, [{"text": str(i)} for i in range(5)], max_flows=5, budget=50.0)
    result = await pool.arun()
    assert [r.status for r in result.items].count(Status.SUCCEEDED) == 3
    assert result.summary.cost == 45


@pytest.mark.parametrize(
    "make",
    [
        lambda llm: fanflow.Skill(llm, "p", budget="lots"),
        lambda llm: fanflow.Pool(lambda: 1, [{}], budget="lots"),
        lambda llm: fanflow.Chain([fanflow.Step(lambda: 1, "a")], budget="lots"),
        lambda llm: fanflow.ParallelCalls(llm, budget="lots"),
        lambda llm: fanflow.call(llm, "p", budget="lots"),
    ],
)
def test_a_bad_budget_fails_at_construction(make: Any) -> None:
    with pytest.raises(fanflow.ConfigError, match="budget= must be dollars"):
        make(ScriptedLLM())


async def test_patterns_reject_a_bad_budget_before_calling() -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.ConfigError, match="budget= must be dollars"):
        await fanflow.vote(llm, "q", budget="lots")  # type: ignore[arg-type]
    assert llm.calls == 0
