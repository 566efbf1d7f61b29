"""One set of call options, the same names everywhere (issue 14, step 2).

Every public pattern takes ``**options: Unpack[fanflow.Options]``; each option is
accepted by each pattern and does what it says; unknown names and old spellings are
caught with the fix.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import fanflow
import fanflow.events
from fanflow import Budget, RetryPolicy, Status, Store
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime

# The options, as the public type names them (what resolve checks against: every one
# of them is passed to every pattern below).
option_names = set(typing.get_type_hints(fanflow.Options))

PATTERNS: dict[str, Callable[..., Any]] = {
    "map": fanflow.map,
    "as_completed": fanflow.as_completed,
    "call": fanflow.call,
    "gather": fanflow.gather,
    "race": fanflow.race,
    "fan_out": fanflow.fan_out,
    "vote": fanflow.vote,
    "best_of_n": fanflow.best_of_n,
    "guarded": fanflow.guarded,
    "evaluate": fanflow.evaluate,
    "sections": fanflow.sections,
    "estimate": fanflow.estimate,
    "ParallelCalls": fanflow.ParallelCalls,
    "Skill": fanflow.Skill,
    "Chain": fanflow.Chain,
    "Flow": fanflow.Flow,
    "Pool": fanflow.Pool,
}


def test_the_options_are_the_issue_list() -> None:
    assert option_names == {
        "concurrency",
        "timeout",
        "deadline",
        "retry",
        "hedge_after",
        "hooks",
        "budget",
        "prices",
        "store",
        "cache",
        "job",
        "sink",
    }


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_public_pattern_takes_the_options_by_one_type(name: str) -> None:
    target = PATTERNS[name]
    fn = target.__init__ if inspect.isclass(target) else target
    params = inspect.signature(fn).parameters.values()
    [var_kw] = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(fn, globalns=vars(inspect.getmodule(fn)))
    assert hints[var_kw.name] == typing.Unpack[fanflow.Options]
    # No option is repeated as a parameter of its own (one name, one meaning).
    own = {p.name for p in params} & option_names
    assert own == set(), f"{name} spells {own} itself"


def _every_option(tmp_path: Path, store: Store, name: str) -> dict[str, Any]:
    seen: list[object] = []
    return {
        "concurrency": 2,
        "timeout": 30.0,
        "deadline": 100.0,
        "retry": RetryPolicy(attempts=2),
        "hedge_after": 20.0,
        "hooks": [seen.append],
        "budget": Budget(usd=100.0, prices={"scripted": fanflow.Price(1.0, 1.0)}),
        "prices": {"scripted": fanflow.Price(1.0, 1.0)},
        "store": store,
        "cache": False,
        "job": f"job-{name}",
        "sink": tmp_path / f"{name}.jsonl",
    }


async def _run_with(name: str, llm: ScriptedLLM, opts: dict[str, Any]) -> Any:
    """Run pattern ``name`` once with every option; return its result."""
    skill_opts = {k: v for k, v in opts.items() if k not in ("job", "sink")}
    runs: dict[str, Callable[[], Awaitable[Any]]] = {
        "map": lambda: fanflow.map(llm, "{input}", ["a", "b"], **opts),
        "as_completed": lambda: _drain(fanflow.as_completed(llm, "{input}", ["a", "b"], **opts)),
        "call": lambda: fanflow.call(llm, "a", **skill_opts).record(),
        "gather": lambda: fanflow.gather(fanflow.call(llm, "a"), settled=True, **skill_opts),
        # race's timeout= is, for one release, the old spelling of its deadline=.
        "race": lambda: fanflow.race(
            fanflow.call(llm, "a"), **{k: v for k, v in skill_opts.items() if k != "timeout"}
        ),
        "fan_out": lambda: fanflow.fan_out(llm, "task", workers=2, **opts),
        "vote": lambda: fanflow.vote(llm, "q", n=3, **opts),
        "best_of_n": lambda: fanflow.best_of_n(llm, "q", n=2, **opts),
        "guarded": lambda: fanflow.guarded(llm, "q", guard=lambda q: False, **opts),
        "evaluate": lambda: fanflow.evaluate(llm, "text", ["a"], **opts),
        "sections": lambda: fanflow.sections(llm, ["a", "b"], **opts),
        "ParallelCalls": lambda: fanflow.ParallelCalls(llm, **opts).arun(["a", "b"]),
        "Skill": lambda: fanflow.Skill(llm, "{x}", **skill_opts).arun(x="a"),
        "Chain": lambda: fanflow.Chain(
            [fanflow.Step(fanflow.Skill(llm, "{x}"), output="y")], **skill_opts
        ).arun(x="a"),
        "Flow": lambda: fanflow.Flow(
            [fanflow.Step(fanflow.Skill(llm, "{x}"), output="y")], **skill_opts
        ).arun(x="a"),
        "Pool": lambda: fanflow.Pool(fanflow.Skill(llm, "{x}"), [{"x": "a"}], **opts).arun(),
    }
    return await runs[name]()


async def _drain(stream: fanflow.results.ResultStream[Any]) -> list[Any]:
    async with stream as records:
        return [r async for r in records]


# Real time: the store commits on its writer thread, and virtual time would jump to the
# next timer (the 100 s deadline) while the loop waits for it.
@pytest.mark.looptime(False)
@pytest.mark.parametrize("name", sorted(set(PATTERNS) - {"estimate"}))
async def test_every_pattern_runs_with_every_option(name: str, tmp_path: Path) -> None:
    llm = ScriptedLLM(lambda r: "7")
    with Store(tmp_path / "s.db") as store:
        opts = _every_option(tmp_path, store, name)
        result = await _run_with(name, llm, opts)
        assert result is not None
        assert llm.calls >= 1
        seen = opts["hooks"][0].__self__  # the list the hook appends to
        assert any(isinstance(e, fanflow.events.CallEnded) for e in seen)
        assert opts["budget"].spent > 0  # every call drew on the shared budget
        sink = opts["sink"]
        if name not in ("call", "gather", "race", "Skill", "Chain", "Flow"):
            assert store.job(f"job-{name}") is not None
            lines = [json.loads(line) for line in sink.read_text().splitlines()]
            assert lines, f"{name} streamed nothing to its sink"


def test_estimate_takes_the_options_of_the_map_it_estimates() -> None:
    llm = ScriptedLLM(model="m")
    opts: dict[str, Any] = {"concurrency": 4, "prices": {"m": fanflow.Price(1.0, 2.0)}}
    estimate = fanflow.estimate(llm, "{input}", ["a"], max_tokens=10, **opts)
    assert estimate.cost is not None
    assert estimate.cost > 0


async def test_an_unknown_option_is_named_with_the_closest_one() -> None:
    llm = ScriptedLLM()
    with pytest.raises(
        TypeError,
        match=r"vote\(\) got an unexpected keyword argument 'concurency'; did you mean "
        r"'concurrency'\?",
    ):
        await fanflow.vote(llm, "q", concurency=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'max_flow'; did you mean 'max_flows'"):
        fanflow.Pool(lambda x: x, [{"x": 1}], max_flow=2)  # type: ignore[call-arg]


async def test_a_bad_value_says_the_fix_before_any_call() -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.ConfigError, match="deadline must be > 0 seconds, got 0"):
        await fanflow.best_of_n(llm, "q", deadline=0)
    with pytest.raises(fanflow.ConfigError, match="concurrency must be >= 1"):
        fanflow.Skill(llm, "{x}", concurrency=0)
    assert llm.calls == 0


# --------------------------------------------------------------- deadline, hedging


async def test_deadline_ends_a_vote_and_an_evaluation_in_virtual_time(looptime: float) -> None:
    llm = ScriptedLLM(latency=10.0)
    with pytest.raises(fanflow.AllFailed):
        await fanflow.vote(llm, "q", n=3, deadline=3.0)
    assert looptime == 3.0
    result = await fanflow.evaluate(llm, "text", ["a", "b"], deadline=2.0)
    assert [s.status for s in result.criteria] == [Status.TIMED_OUT] * 2
    assert looptime == 5.0


async def test_deadline_bounds_a_whole_flow_not_each_step(looptime: float) -> None:
    llm = ScriptedLLM(latency=2.0)
    chain = fanflow.Chain(
        [
            fanflow.Step(fanflow.Skill(llm, "{x}"), output="y"),
            fanflow.Step(fanflow.Skill(llm, "{y}"), output="z"),
        ],
        deadline=3.0,
    )
    result = await chain.arun(x="a")
    assert result.status is Status.TIMED_OUT
    assert result.failed_step == "z"
    assert looptime == 3.0


async def test_hedge_after_rescues_a_hung_sample_in_vote_and_best_of_n(looptime: float) -> None:
    # Call 0 hangs; its hedge, started at t=2, answers at t=3.
    llm = ScriptedLLM(lambda r: "yes", latency=1.0, failures={0: Fault.hang()})
    result = await fanflow.vote(llm, "q", n=1, hedge_after=2.0)
    assert result.winner == "yes"
    assert looptime == 3.0
    judged = ScriptedLLM(lambda r: "1", latency=1.0, failures={0: Fault.hang()})
    best = await fanflow.best_of_n(judged, "q", n=2, hedge_after=2.0)
    assert best.best == "1"
    assert looptime == 3.0 + 3.0 + 1.0  # candidates (one hedged), then the judge


async def test_guarded_takes_a_concurrency(looptime: float) -> None:
    llm = ScriptedLLM(lambda r: "SAFE" if "safety filter" in r.prompt else "answer", latency=1.0)
    together = await fanflow.guarded(llm, "q")
    assert together.makespan == 1.0
    one_at_a_time = await fanflow.guarded(llm, "q", concurrency=1)
    assert one_at_a_time.output == "answer"
    assert one_at_a_time.makespan == 2.0


# --------------------------------------------------------------- old spellings


async def test_race_timeout_is_the_old_spelling_of_deadline(looptime: float) -> None:
    llm = ScriptedLLM(latency=50.0)
    with (
        pytest.warns(
            DeprecationWarning, match=r"race\(timeout=\.\.\.\) is deprecated.*use deadline="
        ),
        pytest.raises(fanflow.errors.CallTimeout, match="within 5 s"),
    ):
        await fanflow.race(fanflow.call(llm, "a"), timeout=5.0)
    assert looptime == 5.0


@pytest.mark.parametrize(
    ("name", "where"),
    [("RateLimited", "errors"), ("VoteResult", "results"), ("Adaptive", "limits")],
)
def test_a_name_moved_off_the_top_level_says_where_it_lives(name: str, where: str) -> None:
    with pytest.raises(AttributeError, match=rf"use fanflow\.{where}\.{name}"):
        getattr(fanflow, name)
    assert getattr(getattr(fanflow, where), name).__name__ == name


def test_an_unknown_name_is_a_plain_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        fanflow.Nope  # noqa: B018


def test_seed_spellings_of_concurrency_stay() -> None:
    llm = ScriptedLLM()
    assert fanflow.ParallelCalls(llm, max_workers=3).max_workers == 3
    assert fanflow.ParallelCalls(llm, concurrency=3).max_workers == 3
    assert fanflow.Pool(lambda x: x, [{"x": 1}], max_flows=3).max_flows == 3
    assert fanflow.Pool(lambda x: x, [{"x": 1}], concurrency=3).max_flows == 3
    with pytest.raises(fanflow.ConfigError, match="same option; pass one"):
        fanflow.Pool(lambda x: x, [{"x": 1}], max_flows=3, concurrency=4)


def test_classes_still_show_their_options_as_attributes() -> None:
    llm = ScriptedLLM()
    skill = fanflow.Skill(llm, "{x}", timeout=3.0, budget=2.0)
    assert (skill.timeout, skill.budget, skill.store, skill.cache) == (3.0, 2.0, None, True)  # type: ignore[attr-defined]
    calls = fanflow.ParallelCalls(llm, 3, hooks=[print])
    assert calls.hooks == (print,)  # type: ignore[attr-defined]
    chain = fanflow.Chain([fanflow.Step(skill, output="y")], budget=5.0)
    assert (chain.budget, chain.prices) == (5.0, None)  # type: ignore[attr-defined]
