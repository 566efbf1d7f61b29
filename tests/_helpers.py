"""Helpers shared by tests: running a coroutine on a fresh virtual-time loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import looptime

T = TypeVar("T")


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a new looptime loop (time starts at 0 and only moves when idle).

    For hypothesis tests, which cannot use pytest-asyncio's per-test loop.
    """
    loop = looptime.new_event_loop(start=0.0)
    try:
        return loop.run_until_complete(coro)
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        loop.close()
        assert not pending, f"tasks left running: {pending}"
