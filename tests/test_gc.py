"""The GC's first threshold is raised while a batch runs and put back after (decision 0150)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

import fanflow
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime

#: Decision 0150: "the GC's generation-0 threshold is max(current, 10_000)" while a batch runs.
BATCH_GC_THRESHOLD = 10_000


@pytest.fixture(autouse=True)
def default_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


async def test_a_map_runs_with_the_raised_threshold_and_restores_it(looptime: float) -> None:
    seen: list[int] = []

    def reply(request: fanflow.Request) -> str:
        seen.append(gc.get_threshold()[0])
        return "ok"

    result = await fanflow.map(ScriptedLLM(reply, latency=1.0), "{input}", range(20))
    assert result.ok
    assert seen == [BATCH_GC_THRESHOLD] * 20
    assert gc.get_threshold() == (700, 10, 10)


async def test_overlapping_maps_restore_only_when_the_last_ends(looptime: float) -> None:
    llm = ScriptedLLM(latency=1.0)
    short = asyncio.create_task(fanflow.map(llm, "{input}", range(3)))
    long = asyncio.create_task(fanflow.map(ScriptedLLM(latency=5.0), "{input}", range(3)))
    await short
    assert looptime == 1.0
    assert gc.get_threshold()[0] == BATCH_GC_THRESHOLD  # the long one still runs
    await long
    assert gc.get_threshold() == (700, 10, 10)


async def test_a_failing_map_restores_the_threshold(looptime: float) -> None:
    def broken() -> Iterator[str]:
        yield "a"
        raise ValueError("the item source broke")

    with pytest.raises(ValueError, match="the item source broke"):
        await fanflow.map(ScriptedLLM(latency=1.0), "{input}", broken())
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize("user", [(50_000, 10, 10), (0, 10, 10)])
async def test_a_higher_or_disabled_threshold_is_left_alone(user: tuple[int, int, int]) -> None:
    gc.set_threshold(*user)
    seen: list[tuple[int, int, int]] = []

    def reply(request: fanflow.Request) -> str:
        seen.append(gc.get_threshold())
        return "ok"

    assert (await fanflow.map(ScriptedLLM(reply), "{input}", range(3))).ok
    assert seen == [user] * 3
    assert gc.get_threshold() == user


async def test_a_threshold_changed_during_the_batch_is_kept() -> None:
    def reply(request: fanflow.Request) -> str:
        gc.set_threshold(2000, 10, 10)
        return "ok"

    assert (await fanflow.map(ScriptedLLM(reply), "{input}", range(2))).ok
    assert gc.get_threshold() == (2000, 10, 10)
