"""Budgets: reserved before each attempt, settled after, never overshot; skips explained."""

from __future__ import annotations

import asyncio

import pytest

import fanflow
from fanflow import Budget, Price, Request, Response, RetryPolicy, Status, Usage
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


def _usage(input_tokens: int, output_tokens: int) -> object:
    def reply(request: Request) -> Response:
        return Response("ok", usage=Usage(input_tokens, output_tokens), model=request.model)

    return reply


async def test_a_token_budget_is_never_overshot_under_concurrency(looptime: float) -> None:
    # Each item reserves 7 in (1 char + overhead) + 20 out = 27 and uses 5 + 20 = 25.
    llm = ScriptedLLM(_usage(5, 20), latency=1.0)
    budget = Budget(tokens=500)
    items = [str(i % 10) for i in range(100)]
    result = await fanflow.map(llm, "{input}", items, max_tokens=20, budget=budget)
    done = [r for r in result.records if r.ok]
    skipped = [r for r in result.records if r.status is Status.SKIPPED]
    assert len(done) + len(skipped) == 100
    assert budget.spent == 25 * len(done) <= 500
    # 19 x 25 = 475; the 25 tokens left cannot cover another 27-token reservation.
    assert len(done) == 19
    assert all(isinstance(r.error, fanflow.BudgetExceeded) for r in skipped)
    assert "raise budget=" in str(skipped[0].error)
    assert llm.calls == 19
    assert result.summary.skipped == 81


async def test_every_attempt_counts_failed_retries_included(looptime: float) -> None:
    llm = ScriptedLLM(
        _usage(5, 20),
        failures={0: Fault.server_error(), 1: Fault.server_error()},
        retry=RetryPolicy(attempts=3, jitter=False, initial=1.0),
    )
    budget = Budget(tokens=1000)
    result = await fanflow.map(llm, "{input}", ["a"], max_tokens=20, budget=budget)
    assert result.ok
    # Two failed attempts are charged their estimated prompt (7), the success its usage.
    assert budget.spent == 7 + 7 + 25


async def test_a_dollar_budget_uses_prices_and_skips_the_rest(looptime: float) -> None:
    prices = {"house-model": Price(input=1_000_000.0, output=0.0)}  # $1 per input token
    llm = ScriptedLLM(_usage(5, 0), model="house-model")
    result = await fanflow.map(
        llm, "{input}", ["a", "b", "c"], max_tokens=1, budget=12.0, prices=prices
    )
    # Each reserves $7 (7 estimated input tokens): the first fits, spends $5, and the
    # second ($7 more would make $12) fits too; the third cannot.
    assert [r.status for r in result.records] == [
        Status.SUCCEEDED,
        Status.SUCCEEDED,
        Status.SKIPPED,
    ]
    assert result.summary.cost == 10.0
    assert result.records[0].cost == 5.0


async def test_a_dollar_budget_on_an_unpriced_model_skips_with_the_reason() -> None:
    llm = ScriptedLLM(model="mystery")
    result = await fanflow.map(llm, "{input}", ["a"], budget=1.0)
    record = result.records[0]
    assert record.status is Status.SKIPPED
    assert "price of model 'mystery' is unknown" in str(record.error)
    assert llm.calls == 0


async def test_waiting_for_pending_reservations_beats_skipping(looptime: float) -> None:
    # Reservations (7 + 100) are far above usage (5 + 1): with a budget of 200 only one
    # fits at a time, but as each settles, the next one fits; all five run.
    llm = ScriptedLLM(_usage(5, 1), latency=1.0)
    budget = Budget(tokens=200)
    result = await fanflow.map(llm, "{input}", list("abcde"), max_tokens=100, budget=budget)
    assert result.ok
    assert budget.spent == 30
    assert llm.started_at == [0.0, 1.0, 2.0, 3.0, 4.0]


async def test_one_budget_caps_two_patterns_together(looptime: float) -> None:
    llm = ScriptedLLM(_usage(5, 5), latency=1.0)
    budget = Budget(tokens=100)
    a = await fanflow.map(llm, "{input}", list("abcdef"), max_tokens=5, budget=budget)
    b = await fanflow.map(llm, "{input}", list("ghijkl"), max_tokens=5, budget=budget)
    # Each reserves 12 and spends 10: 9 fit; the last 10 tokens cannot cover 12.
    assert a.summary.succeeded == 6
    assert b.summary.succeeded == 3
    assert b.summary.skipped == 3
    assert budget.spent == 90
    assert budget.statistics().remaining == 10


async def test_as_completed_takes_a_budget(looptime: float) -> None:
    llm = ScriptedLLM(_usage(5, 5))
    statuses = []
    async with fanflow.as_completed(
        llm, "{input}", list("abcd"), max_tokens=5, budget=Budget(tokens=25)
    ) as stream:
        async for record in stream:
            statuses.append(record.status)
    assert sorted(statuses) == [Status.SKIPPED, Status.SKIPPED, Status.SUCCEEDED, Status.SUCCEEDED]


def test_budget_validates() -> None:
    with pytest.raises(fanflow.ConfigError, match="exactly one unit"):
        Budget()
    with pytest.raises(fanflow.ConfigError, match="exactly one unit"):
        Budget(1.0, tokens=5)
    with pytest.raises(fanflow.ConfigError, match=">= 0"):
        Budget(tokens=-1)
    assert repr(Budget(tokens=10)) == "fanflow.Budget(tokens=10, spent=0, reserved=0)"


async def test_budget_rejects_a_bad_value() -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.ConfigError, match="budget= must be dollars"):
        await fanflow.map(llm, "{input}", ["a"], budget="lots")  # type: ignore[arg-type]


async def test_a_cancelled_call_keeps_its_reservation_charged(looptime: float) -> None:
    llm = ScriptedLLM(_usage(5, 5), latency=10.0)
    budget = Budget(tokens=1000)
    task = asyncio.ensure_future(fanflow.map(llm, "{input}", ["a"], max_tokens=5, budget=budget))
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Sent and cut off: the server may have answered, so the whole estimate counts.
    assert budget.spent == 12
    assert budget.statistics().reserved == 0


async def test_a_call_waiting_for_budget_can_be_cancelled(looptime: float) -> None:
    llm = ScriptedLLM(_usage(5, 5), latency=10.0)
    budget = Budget(tokens=20)  # room for one reservation (12) at a time
    task = asyncio.ensure_future(
        fanflow.map(llm, "{input}", ["a", "b"], max_tokens=5, budget=budget)
    )
    await asyncio.sleep(1.0)
    assert llm.calls == 1  # "b" waits for "a" to settle
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.statistics().reserved == 0
    assert budget.spent == 12
