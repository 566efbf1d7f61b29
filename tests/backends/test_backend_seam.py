"""The backend seam: map, as_completed and Pool choose where items run through one
function, and any object implementing ``fanflow.backends.Backend`` is a backend."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import fanflow
from fanflow.backends import Backend, CallOptions, LocalBackend, MapRun, MapSpec, PoolSpec
from fanflow.backends._base import Deliver
from fanflow.backends._config import resolve_backend
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime


class Recording:
    """A backend that runs everything locally and keeps what it was asked to run."""

    def __init__(self) -> None:
        self.local = LocalBackend()
        self.specs: list[MapSpec | PoolSpec] = []

    def map_run(self, spec: MapSpec, deliver: Deliver) -> MapRun:
        self.specs.append(spec)
        return self.local.map_run(spec, deliver)

    async def run_pool(
        self,
        spec: PoolSpec,
        deliver: Callable[[int, Any], Awaitable[None]],
        on_step: Callable[[int, str, bool], None],
    ) -> None:
        self.specs.append(spec)
        await self.local.run_pool(spec, deliver, on_step)


def test_backend_names_resolve_through_one_function() -> None:
    assert isinstance(resolve_backend("local"), LocalBackend)
    assert isinstance(resolve_backend(None), LocalBackend)
    assert resolve_backend("ray") == fanflow.backends.RayBackend()
    ray = fanflow.backends.RayBackend(workers=2)
    assert resolve_backend(ray) is ray
    assert isinstance(ray, Backend)  # the Ray settings implement the protocol
    mine = Recording()
    assert resolve_backend(mine) is mine


async def test_map_and_as_completed_run_on_the_backend_they_are_given(looptime: float) -> None:
    llm = ScriptedLLM(latency=1.0)
    backend = Recording()
    result = await fanflow.map(
        llm, "Q: {input}", ["a", "b", "c"], concurrency=2, backend=backend, temperature=0.5
    )
    assert result.outputs == ["echo: Q: a", "echo: Q: b", "echo: Q: c"]
    assert looptime == 2.0  # two at a time, 1 s each: the spec's concurrency held
    (spec,) = backend.specs
    assert isinstance(spec, MapSpec)
    assert spec.options.concurrency == 2  # the call options, checked once, as one value
    assert spec.options.hooks == ()
    assert spec.size == 3
    assert spec.build({"input": "z"}, 7).prompt == "Q: z"
    assert spec.build("z", 7).temperature == 0.5

    async with fanflow.as_completed(llm, "{input}", ["x", "y"], backend=backend) as results:
        got = sorted([r.value async for r in results])
    assert got == ["echo: x", "echo: y"]
    assert len(backend.specs) == 2


def test_a_map_specs_old_option_fields_warn_and_read_the_options() -> None:
    spec = MapSpec(
        llm=ScriptedLLM(),
        build=lambda item, index: fanflow.Request.of(str(item)),
        items=[],
        parse=str,
        options=CallOptions(concurrency=3, deadline=9.0),
    )
    with pytest.warns(DeprecationWarning, match=r"spec\.options\.concurrency"):
        assert spec.concurrency == 3
    with pytest.warns(DeprecationWarning, match=r"spec\.options\.deadline"):
        assert spec.deadline == 9.0
    with pytest.raises(AttributeError, match="no attribute 'concurrence'"):
        spec.concurrence  # noqa: B018 - a name that never was a field


async def test_a_pool_runs_on_the_backend_it_is_given() -> None:
    backend = Recording()
    skill = fanflow.Skill(ScriptedLLM(), "Hi {name}")
    pool = fanflow.Pool(skill, [{"name": "a"}, {"name": "b"}], max_flows=3, backend=backend)
    result = await pool.arun()
    assert result.outputs == ["echo: Hi a", "echo: Hi b"]
    (spec,) = backend.specs
    assert isinstance(spec, PoolSpec)
    assert spec.max_flows == 3
    assert [i for i, _ in spec.todo] == [0, 1]


class Older:
    """A backend written before ``map_batch`` was renamed ``map_run``."""

    def __init__(self) -> None:
        self.specs: list[MapSpec] = []

    def map_batch(self, spec: MapSpec, deliver: Deliver) -> MapRun:
        self.specs.append(spec)
        return LocalBackend().map_run(spec, deliver)

    async def run_pool(self, spec: PoolSpec, deliver: Any, on_step: Any) -> None:
        await LocalBackend().run_pool(spec, deliver, on_step)


async def test_a_backend_with_the_old_method_name_still_runs_with_a_warning() -> None:
    backend = Older()
    with pytest.warns(DeprecationWarning, match=r"Older\.map_batch is deprecated.*map_run"):
        result = await fanflow.map(ScriptedLLM(), "{input}", ["a", "b"], backend=backend)
    assert result.outputs == ["echo: a", "echo: b"]
    assert len(backend.specs) == 1


def test_the_old_name_of_the_map_run_protocol_warns() -> None:
    with pytest.warns(DeprecationWarning, match="BatchRun is deprecated.*fanflow.backends.MapRun"):
        assert fanflow.backends.BatchRun is MapRun  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="no attribute 'BatchRunner'"):
        fanflow.backends.BatchRunner  # type: ignore[attr-defined]  # noqa: B018
