"""The call options are resolved once into one frozen value; a run adds its gate,
deadline and budget cap when it starts (issue 22, item 3).

``fanflow.backends.CallOptions`` is what every pattern's keyword options become and
what a backend receives (``MapSpec.options``); ``CallOptions.start()`` makes the
frozen ``Run`` the engine reads. The batch's tail is asked of the batch's item source,
not written into the options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import fanflow
from fanflow import Budget, Limits, RetryPolicy
from fanflow.backends import CallOptions, LocalBackend, MapSpec
from fanflow.testing import ScriptedLLM

from ._helpers import gate_of

pytestmark = pytest.mark.looptime

CONCURRENCY_ZERO = "concurrency must be >= 1, got 0; use None for no limit"


def _spec(items: list[Any], options: CallOptions) -> MapSpec:
    return MapSpec(
        llm=ScriptedLLM(),
        build=lambda item, index: fanflow.Request.of(str(item)),
        items=items,
        parse=lambda response: response.text,
        options=options,
    )


async def test_the_concurrency_check_says_one_thing_wherever_it_is_given() -> None:
    llm = ScriptedLLM()
    makers = [
        lambda: Limits(concurrency=0),
        lambda: type(gate_of(1))(0),
        lambda: gate_of(2).set_limit(0),
        lambda: CallOptions(concurrency=0),
        lambda: fanflow.Skill(llm, "{x}", concurrency=0),
    ]
    for make in makers:
        with pytest.raises(fanflow.ConfigError) as caught:
            make()
        assert CONCURRENCY_ZERO in str(caught.value)
    with pytest.raises(fanflow.ConfigError, match=CONCURRENCY_ZERO):
        await fanflow.map(llm, "{input}", ["a"], concurrency=0)
    with pytest.raises(fanflow.ConfigError, match=r"concurrency must be >= 1, got 2\.5"):
        Limits(concurrency=2.5)  # type: ignore[arg-type]
    assert llm.calls == 0


def test_the_options_a_pattern_is_given_become_one_frozen_value() -> None:
    retry = RetryPolicy(attempts=2)
    skill = fanflow.Skill(ScriptedLLM(), "{x}", timeout=3.0, retry=retry, concurrency=4)
    call = skill.options.call
    assert call == CallOptions(concurrency=4, timeout=3.0, retry=retry)
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.timeout = 5.0  # type: ignore[misc]
    assert repr(CallOptions(timeout=2.0, concurrency=3)) == (
        "fanflow.backends.CallOptions(concurrency=3, timeout=2.0)"  # what was given only
    )


async def test_a_run_adds_its_gate_deadline_and_budget_when_it_starts(looptime: float) -> None:
    options = CallOptions(concurrency=2, deadline=10.0, budget=1.5)
    first, second = options.start(), options.start()
    assert first.timeout is None
    assert CallOptions(timeout=4.0).start().timeout == 4.0
    assert first.gate is not None
    assert first.gate.limit == 2
    assert first.gate is not second.gate  # each run has its own gate
    assert first.deadline == looptime + 10.0
    assert first.budget is not None
    assert first.budget is not second.budget
    assert first.budget.limit == 1.5
    shared = Budget(usd=3.0)
    assert CallOptions(budget=shared).start().budget is shared  # a Budget: shared as given
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.deadline = 0.0  # type: ignore[misc]


async def test_a_run_inside_another_takes_what_it_did_not_set(looptime: float) -> None:
    outer = CallOptions(concurrency=3, timeout=2.0, deadline=5.0, hedge_after=1.0).start()
    own = CallOptions(timeout=9.0, deadline=20.0, hooks=(print,))
    inner = own.start().within(outer, frozenset({"timeout", "deadline", "hooks"}))
    assert inner.timeout == 9.0  # its own
    assert inner.hedge_after == 1.0  # the enclosing run's
    assert inner.deadline == looptime + 5.0  # the sooner of the two
    assert inner.gate is outer.gate  # one gate for both: it set no concurrency
    assert print in inner.hooks
    assert own.start().within(None, frozenset()) is not None
    alone = type(outer)()  # a Run made with nothing set
    assert alone.within(outer, frozenset()).gate is outer.gate


async def test_a_batch_tells_its_calls_when_its_last_item_is_handed_out() -> None:
    seen: list[bool] = []
    crew = LocalBackend().map_run(_spec([1, 2, 3], CallOptions(concurrency=1)), seen.append)
    run = crew.opts
    assert run.drained is not None
    assert run.drained() is False
    await crew.run()
    assert len(seen) == 3
    assert run.drained() is True
    assert CallOptions().start().drained is None  # not a batch: never a tail


def test_a_pools_option_attributes_can_still_be_set() -> None:
    pool = fanflow.Pool(lambda x: x, [{"x": 1}], hooks=[print])
    assert pool.hooks == (print,)  # type: ignore[attr-defined]
    pool.hooks = (repr,)  # type: ignore[attr-defined]
    assert pool.options.call.hooks == (repr,)
    assert "hooks" in pool.options.given
