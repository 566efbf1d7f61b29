"""Each model's lane booked where the handle's limits are: in a shared store
(``Limits(shared=URL)``) under the model's own identity, and at the Ray backend's broker
(here without a cluster: the worker's lane factory talks to the broker actor's object on
this loop) under the model's own key."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import fanflow
from fanflow import Limits, Request
from fanflow._llm import set_lane_factory
from fanflow._shared import identity
from fanflow.backends._limiter import LINGER
from fanflow.backends._worker import BrokerActor, FanflowWorker
from fanflow.testing import ScriptedLLM, SimServer


def mixed(*models: str, n: int = 3) -> list[Request]:
    return [Request.of(f"{m}-{i}", model=m) for i in range(n) for m in models]


def test_a_models_shared_identity_is_its_own_and_the_handles_model_keeps_its_key() -> None:
    llm = fanflow.openai("own", base_url="http://127.0.0.1:9/v1", api_key="sk-key")
    assert identity(llm, "own") == identity(llm)  # stores written before keep their keys
    assert identity(llm, "m1")[0] != identity(llm)[0]
    assert identity(llm, "m1")[1].endswith("model=m1")


@pytest.mark.timeout(60)
async def test_with_shared_limits_each_model_is_booked_under_its_own_identity(
    tmp_path: Path,
) -> None:
    db = tmp_path / "limits.db"
    shared = f"sqlite:///{db}"
    limits = {"m1": Limits(rpm=6000, shared=shared), "m2": Limits(rpm=3000, shared=shared)}
    async with SimServer() as server:
        llm = fanflow.openai("own", base_url=server.url, api_key="sk-key", limits=limits)
        async with llm:
            result = await fanflow.map(llm, mixed("m1", "m2", n=4))
    assert result.ok
    with sqlite3.connect(db) as con:
        declared = dict(con.execute("SELECT ident, body FROM declared").fetchall())
        granted = dict(con.execute("SELECT ident, COUNT(*) FROM grants GROUP BY ident"))
    m1, m2 = identity(llm, "m1")[0], identity(llm, "m2")[0]
    assert {ident: json.loads(body)["rpm"] for ident, body in declared.items()} == {
        m1: 6000,
        m2: 3000,
    }
    assert granted == {m1: 4, m2: 4}


class _Remote:
    """An actor object called as a Ray actor handle is: ``handle.method.remote(...)``."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor
        self.calls: list[asyncio.Future[Any]] = []

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = getattr(self._actor, name)

        def remote(*args: Any) -> asyncio.Future[Any]:
            self.calls.append(asyncio.ensure_future(method(*args)))
            return self.calls[-1]

        return SimpleNamespace(remote=remote)


@pytest.mark.looptime
async def test_on_ray_each_model_is_booked_apart_at_the_broker() -> None:
    actor = BrokerActor()
    broker = _Remote(actor)
    FanflowWorker("w1", broker)  # sets this process's lane factory
    try:
        limits = {"own": Limits(concurrency=1), "m1": Limits(concurrency=2)}
        llm = ScriptedLLM(latency=1.0, model="own", limits=limits)
        result = await fanflow.map(llm, mixed("own", "m1"), concurrency=12)
        await asyncio.sleep(2 * LINGER)  # the spare slots go back to the broker
        await asyncio.gather(*broker.calls)
    finally:
        set_lane_factory(None)
    assert result.ok
    seen: dict[str, list[float]] = {}
    for request, at in zip(llm.requests, llm.started_at, strict=True):
        seen.setdefault(request.model or "", []).append(round(at, 3))
    assert seen == {"own": [0.0, 1.0, 2.0], "m1": [0.0, 0.0, 1.0]}
    assert actor.broker.statistics(llm.limit_id) is not None
    assert actor.broker.statistics(f"{llm.limit_id}/m1") is not None
