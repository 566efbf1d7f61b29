"""Shared fixtures.

Async tests run on pytest-asyncio's loop; modules that test waiting (backoff, timeouts,
limits) mark themselves ``pytest.mark.looptime`` so the loop's clock is virtual: a 30 s
timeout finishes instantly and exactly. ``filterwarnings = error`` (pyproject) turns
"Task was destroyed but it is pending" and unclosed resources into failures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves tasks running on its loop (promise 6)."""
    yield
    current = asyncio.current_task()
    # Give cancelled tasks one turn to finish their cleanup, as the loop would.
    await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not leftover, f"tasks left running after the test: {leftover}"
