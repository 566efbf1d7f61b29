"""A FIFO counting gate whose limit can change while it is in use.

The concurrency meter of a lane, the ramp after a pause, a pattern's ``concurrency=``
and the Ray broker's slots are all one :class:`Gate`; ``asyncio.Semaphore`` cannot
change its limit (the adaptive controller moves it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from ._checks import check_concurrency

__all__ = ["Gate", "GateStatistics"]


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
        check_concurrency(limit)
        self._limit = limit
        self._in_flight = 0
        self._max_in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int | None:
        return self._limit

    @property
    def waiting(self) -> int:
        """Calls queued for a slot."""
        return len(self._waiters)

    def set_limit(self, limit: int | None) -> None:
        """Change the limit; raising it admits waiters at once."""
        check_concurrency(limit)
        self._limit = limit
        self._wake()

    def _has_room(self) -> bool:
        return self._limit is None or self._in_flight < self._limit

    def idle(self) -> bool:
        """A slot is free and nobody waits for one (a batch's tail, not its middle)."""
        return not self._waiters and self._has_room()

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
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        # The slot was taken for us in _wake().

    def release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._has_room():
            fut = self._waiters.popleft()
            if not fut.done():
                self._in_flight += 1
                if self._in_flight > self._max_in_flight:
                    self._max_in_flight = self._in_flight
                fut.set_result(None)

    def statistics(self) -> GateStatistics:
        return GateStatistics(
            limit=self._limit,
            in_flight=self._in_flight,
            waiting=len(self._waiters),
            max_in_flight=self._max_in_flight,
        )
