from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.looptime


async def test_virtual_time_runs_instantly(looptime: float) -> None:
    await asyncio.sleep(100)
    assert looptime == 100
