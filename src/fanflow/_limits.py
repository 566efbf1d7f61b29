"""Admission: how many calls a handle may have in flight.

A :class:`Limits` is configuration (frozen); a :class:`Lane` is the live state that
enforces it for one handle on one event loop. Every pattern using a handle shares its
lane, so two maps running at once stay within one limit together.

The gate is a FIFO semaphore whose limit can change while it is in use (the adaptive
controller of the limits work moves it); ``asyncio.Semaphore`` cannot do that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from ._exceptions import ConfigError

__all__ = ["Gate", "GateStatistics", "Lane", "LaneStatistics", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Limits of one LLM handle.

    Args:
        concurrency: the most calls in flight at once; None for no limit.
    """

    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(
                f"concurrency must be >= 1, got {self.concurrency}; use None for no limit"
            )

    def __repr__(self) -> str:
        return f"fanflow.Limits(concurrency={self.concurrency})"


@dataclass(frozen=True, slots=True)
class GateStatistics:
    """A snapshot of a gate (anyio's ``CapacityLimiterStatistics`` in spirit)."""

    limit: int | None
    in_flight: int
    waiting: int
    max_in_flight: int


class Gate:
    """A FIFO counting gate with an adjustable limit (None: no limit).

    Fairness: waiters are served in arrival order, so a burst from one pattern cannot
    starve another pattern sharing the handle.
    """

    __slots__ = ("_in_flight", "_limit", "_max_in_flight", "_waiters")

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ConfigError(f"concurrency must be >= 1, got {limit}; use None for no limit")
        self._limit = limit
        self._in_flight = 0
        self._max_in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int | None:
        return self._limit

    def set_limit(self, limit: int | None) -> None:
        """Change the limit; raising it admits waiters at once."""
        if limit is not None and limit < 1:
            raise ConfigError(f"concurrency must be >= 1, got {limit}; use None for no limit")
        self._limit = limit
        self._wake()

    def _has_room(self) -> bool:
        return self._limit is None or self._in_flight < self._limit

    def try_acquire(self) -> bool:
        """Take a slot if one is free now and nobody is queued before us."""
        if not self._waiters and (self._limit is None or self._in_flight < self._limit):
            self._in_flight += 1
            if self._in_flight > self._max_in_flight:
                self._max_in_flight = self._in_flight
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot. Cancellation while waiting takes no slot."""
        if self.try_acquire():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # We were handed a slot just as we were cancelled: give it back.
                self.release()
            else:
                self._remove(fut)
            raise
        # The slot was taken for us in _wake().

    def _remove(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def _take(self) -> None:
        self._in_flight += 1
        if self._in_flight > self._max_in_flight:
            self._max_in_flight = self._in_flight

    def release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._has_room():
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)

    def statistics(self) -> GateStatistics:
        return GateStatistics(
            limit=self._limit,
            in_flight=self._in_flight,
            waiting=len(self._waiters),
            max_in_flight=self._max_in_flight,
        )


@dataclass(frozen=True, slots=True)
class LaneStatistics:
    """A snapshot of a handle's admission state."""

    concurrency: GateStatistics


class Lane:
    """The live limiter of one handle on one event loop."""

    __slots__ = ("gate", "limits")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.gate = Gate(limits.concurrency)

    def try_acquire(self) -> bool:
        """Admit one more call now if possible, without waiting."""
        return self.gate.try_acquire()

    async def acquire(self) -> None:
        """Wait until one more call may be sent."""
        await self.gate.acquire()

    def release(self) -> None:
        """A call admitted by :meth:`acquire` has ended."""
        self.gate.release()

    def statistics(self) -> LaneStatistics:
        return LaneStatistics(concurrency=self.gate.statistics())
