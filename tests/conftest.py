"""Shared fixtures.

Async tests run on pytest-asyncio's loop; modules that test waiting (backoff, timeouts,
limits) mark themselves ``pytest.mark.looptime`` so the loop's clock is virtual: a 30 s
timeout finishes instantly and exactly. ``filterwarnings = error`` (pyproject) turns
"Task was destroyed but it is pending" and unclosed resources into failures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves tasks running, or makes the loop report an error
    ("Task was destroyed but it is pending", "exception was never retrieved"): promise 6."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        yield
        current = asyncio.current_task()
        # Give cancelled tasks one turn to finish their cleanup, as the loop would.
        await asyncio.sleep(0)
        leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        assert not leftover, f"tasks left running after the test: {leftover}"
        # A pending task that lost its last reference is either still in all_tasks()
        # (caught above) or was already collected and reported to the handler.
        assert not reported, f"the event loop reported errors: {reported}"
    finally:
        loop.set_exception_handler(previous)
