"""A handle's limits per model: requests that name other models than the handle's get a
lane of their own (the handle's limits, or the model's own where ``limits=`` maps models
to limits; their own admission and server feedback) and their own price, in virtual
time."""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Limits, Price, Request
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


def starts(llm: ScriptedLLM) -> dict[str, list[float]]:
    """Each model's call start times, in order."""
    out: dict[str, list[float]] = {}
    for request, at in zip(llm.requests, llm.started_at, strict=True):
        out.setdefault(request.model or "", []).append(round(at, 3))
    return out


def mixed(*models: str, n: int = 3) -> list[Request]:
    return [Request.of(f"{m}-{i}", model=m) for i in range(n) for m in models]


async def test_each_model_has_its_own_concurrency() -> None:
    llm = ScriptedLLM(latency=1.0, model="own", limits=Limits(concurrency=1))
    # The map's workers follow the handle's concurrency (two per slot) unless the call
    # names its own: enough workers here for three models.
    result = await fanflow.map(llm, mixed("own", "m1", "m2"), concurrency=6)
    assert result.ok
    # One call at a time per model, three models side by side.
    assert starts(llm) == {m: [0.0, 1.0, 2.0] for m in ("own", "m1", "m2")}
    assert llm.max_in_flight == 3


async def test_each_model_has_its_own_rpm() -> None:
    llm = ScriptedLLM(latency=0.1, model="own", limits=Limits(rpm=60, burst=0.0, margin=0.0))
    result = await fanflow.map(llm, mixed("m1", "m2"))
    assert result.ok
    assert starts(llm) == {m: [0.0, 1.0, 2.0] for m in ("m1", "m2")}


async def test_a_429_for_one_model_does_not_hold_back_another() -> None:
    llm = ScriptedLLM(
        latency=1.0,
        model="own",
        limits=Limits(concurrency=4),
        failures={0: Fault.rate_limited(retry_after=30.0)},
    )
    result = await fanflow.map(llm, mixed("m1", "m2", n=2))
    assert result.ok
    seen = starts(llm)
    assert seen["m2"] == [0.0, 0.0]  # m1's pause is m1's
    assert seen["m1"][0] == 0.0
    assert min(seen["m1"][1:]) >= 30.0


async def test_the_handles_own_model_keeps_the_handles_lane() -> None:
    llm = ScriptedLLM(model="own", limits=Limits(concurrency=2))
    assert llm.lane("own") is llm.lane() is llm.lane(None)
    assert llm.lane("m1") is llm.lane("m1")
    assert llm.lane("m1") is not llm.lane()
    assert llm.lane("m1").limits == llm.limits


async def test_models_named_in_a_mapping_have_their_own_limits() -> None:
    limits = {
        "own": Limits(concurrency=1),
        "m1": Limits(concurrency=2),
        "*": Limits(concurrency=3),  # any other model
    }
    llm = ScriptedLLM(latency=1.0, model="own", limits=limits)
    assert llm.limits == Limits(concurrency=1)
    result = await fanflow.map(llm, mixed("own", "m1", "m2"), concurrency=12)
    assert result.ok
    assert starts(llm) == {"own": [0.0, 1.0, 2.0], "m1": [0.0, 0.0, 1.0], "m2": [0.0, 0.0, 0.0]}


async def test_models_named_in_a_mapping_are_paced_at_their_own_rpm() -> None:
    paced = {"burst": 0.0, "margin": 0.0}
    limits = {"m1": Limits(rpm=60, **paced), "m2": Limits(rpm=120, **paced)}  # type: ignore[arg-type]
    llm = ScriptedLLM(latency=0.1, model="own", limits=limits)
    result = await fanflow.map(llm, mixed("m1", "m2"))
    assert result.ok
    assert starts(llm) == {"m1": [0.0, 1.0, 2.0], "m2": [0.0, 0.5, 1.0]}


async def test_a_model_the_mapping_leaves_out_has_the_default_limits() -> None:
    llm = ScriptedLLM(model="own", limits={"m1": Limits(rpm=60)})
    assert llm.limits == fanflow.limits.DEFAULT_LIMITS  # its own model is not named
    assert llm.lane("m2").limits == fanflow.limits.DEFAULT_LIMITS
    assert llm.lane("m1").limits == Limits(rpm=60)


@pytest.mark.parametrize("bad", [{}, {"m1": 500}, {3: Limits()}], ids=["empty", "value", "key"])
def test_a_mapping_that_is_not_of_model_names_to_limits_is_refused(bad: object) -> None:
    with pytest.raises(fanflow.errors.ConfigError, match=r"limits= .*model name"):
        ScriptedLLM(limits=bad)  # type: ignore[arg-type]


async def test_each_models_calls_are_priced_at_that_models_price() -> None:
    prices = {"cheap": Price(input=1.0, output=2.0), "dear": Price(input=100.0, output=200.0)}
    llm = ScriptedLLM(model="own")
    result = await fanflow.map(llm, mixed("cheap", "dear", n=2), prices=prices)
    assert result.ok
    spent: dict[str, float] = {}
    for record in result.records:
        assert record.request is not None
        model = record.request.model
        assert model is not None
        usage = record.usage
        expected = prices[model].cost(usage.input_tokens, usage.output_tokens)
        assert expected > 0
        assert record.cost == pytest.approx(expected)
        spent[model] = spent.get(model, 0.0) + expected
    assert result.summary.cost == pytest.approx(spent["cheap"] + spent["dear"])
