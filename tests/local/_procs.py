"""Helpers for tests that watch the local model's worker processes (Linux /proc)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts: it was not reaped)."""
    return Path(f"/proc/{pid}").exists()


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has exited; reaping an
    orphan is its new parent's business)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int:
    """The parent process id of ``pid``."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


async def wait_for(predicate: Callable[[], object], what: str, limit: float = 60.0) -> None:
    """Poll ``predicate`` every 5 ms until it is true; fail after ``limit`` seconds of real
    time. For real events in other processes, which no asyncio.Event can signal."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not predicate():
        assert loop.time() < end, f"gave up waiting for {what}"
        await asyncio.sleep(0.005)
