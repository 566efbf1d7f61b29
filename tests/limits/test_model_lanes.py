"""A handle's limits per model: requests that name other models than the handle's get a
lane of their own (the same limits, their own admission and server feedback), in
virtual time."""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Limits, Request
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
