"""One limit for a whole cluster: a broker that leases admission to workers' lanes.

A handle's limits belong to its API key, not to a process, so on Ray every worker's lane
for the same handle draws from one :class:`LimitBroker` (kept in one Ray actor, keyed by
the handle's ``limit_id``). Concurrency is leased one slot at a time: a worker asks for a
slot when a call of its own is waiting, passes it from call to call while it has more
waiting (up to :data:`REUSE` times, so other workers get their turn), and gives it back
when it has none. The broker never counts more slots out than the limit, so the calls in
flight across the cluster never exceed it, whatever the number of workers. A dead
worker's slots are reclaimed when the driver tells the broker it died (``forget``).

Why a broker rather than splitting the limit between workers (``concurrency // W``
each): a split wastes the share of a worker that is idle, starving or dead, and cannot
follow workers that come and go; why leases rather than one broker call per call:
under load a worker reuses its slots without a round trip. See
docs/decisions/0070-ray-global-limits.md.

Nothing here imports Ray: the broker is plain asyncio (the actor wraps it), and the
worker's lane talks to it through two callables, so both are tested without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from .._limits import Gate, Lane, LaneStatistics, Limits

__all__ = ["LINGER", "REUSE", "BrokerStatistics", "GlobalLane", "LimitBroker", "SlotLease"]

# A worker passes a leased slot on to at most this many of its own calls in a row, then
# gives it back and asks again, behind the other workers already waiting.
REUSE = 8
# A slot no call of this worker is waiting for is kept this long before it goes back:
# the worker's next item usually asks for one within a loop turn or two, and keeping
# it saves that call a round trip to the broker.
LINGER = 0.005


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    """The broker's view of one handle: slots leased now and at most, by worker."""

    limit: int | None
    leased: int
    max_leased: int
    waiting: int
    by_worker: dict[str, int]


class _Shared:
    __slots__ = ("gate", "held")

    def __init__(self, limit: int | None) -> None:
        self.gate = Gate(limit)
        self.held: Counter[str] = Counter()


class LimitBroker:
    """The cluster-wide admission state of every handle (lives in one Ray actor)."""

    def __init__(self) -> None:
        self._handles: dict[str, _Shared] = {}
        self._dead: set[str] = set()

    def _shared(self, handle_id: str, limits: Limits) -> _Shared:
        shared = self._handles.get(handle_id)
        if shared is None:
            shared = self._handles[handle_id] = _Shared(limits.concurrency)
        return shared

    async def acquire(self, handle_id: str, limits: Limits, worker: str) -> bool:
        """Wait for one concurrency slot of the handle, leased to ``worker``.

        Returns:
            False if the worker was declared dead meanwhile (nothing is leased).
        """
        shared = self._shared(handle_id, limits)
        await shared.gate.acquire()
        if worker in self._dead:
            shared.gate.release()
            return False
        shared.held[worker] += 1
        return True

    def release(self, handle_id: str, worker: str) -> None:
        """``worker`` gives one slot back."""
        shared = self._handles.get(handle_id)
        if shared is None or shared.held[worker] <= 0:
            return  # already reclaimed by forget()
        shared.held[worker] -= 1
        shared.gate.release()

    def forget(self, worker: str) -> int:
        """``worker`` is gone: reclaim every slot it held. Returns how many."""
        self._dead.add(worker)
        freed = 0
        for shared in self._handles.values():
            n = shared.held.pop(worker, 0)
            for _ in range(n):
                shared.gate.release()
            freed += n
        return freed

    def statistics(self, handle_id: str) -> BrokerStatistics | None:
        shared = self._handles.get(handle_id)
        if shared is None:
            return None
        gate = shared.gate.statistics()
        return BrokerStatistics(
            limit=gate.limit,
            leased=gate.in_flight,
            max_leased=gate.max_in_flight,
            waiting=gate.waiting,
            by_worker={w: n for w, n in shared.held.items() if n},
        )


class SlotLease:
    """A worker's share of one handle's cluster-wide concurrency.

    Args:
        limit: the handle's concurrency limit: a worker never holds or asks for more
            slots than that, so it cannot queue ahead of other workers at the broker.
        ask: waits for one slot from the broker (True when granted).
        give_back: returns one slot to the broker (fire and forget).
    """

    __slots__ = (
        "_ask",
        "_asking",
        "_give_back",
        "_limit",
        "_reuses",
        "_tasks",
        "_timer",
        "_waiters",
        "held",
        "used",
    )

    def __init__(
        self, limit: int, ask: Callable[[], Awaitable[bool]], give_back: Callable[[], None]
    ) -> None:
        self._limit = limit
        self._ask = ask
        self._give_back = give_back
        self.held = 0  # slots leased from the broker
        self.used = 0  # of which taken by calls now
        self._asking = 0
        self._reuses = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def try_take(self) -> bool:
        """Take a leased slot that is free now, if nobody is queued before us."""
        if self.used < self.held and not self._waiters:
            self.used += 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot (a free leased one, else one more from the broker)."""
        if self.try_take():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._ask_more()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give()  # handed a slot just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def give(self) -> None:
        """A call that took a slot has ended."""
        self.used -= 1
        if self._waiters:
            self._reuses += 1
            if self._reuses >= REUSE:
                # Let the other workers' waiting calls go first: back to the broker.
                self._reuses = 0
                self.held -= 1
                self._give_back()
                self._ask_more()
                return
        self._hand_over()

    def _ask_more(self) -> None:
        loop = asyncio.get_running_loop()
        while self._asking < len(self._waiters) and self.held + self._asking < self._limit:
            self._asking += 1
            task = loop.create_task(self._one_more())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one_more(self) -> None:
        try:
            granted = await self._ask()
        except asyncio.CancelledError:
            self._asking -= 1
            raise
        except Exception as exc:
            # The broker is unreachable: fail the call that asked (its record says so).
            self._asking -= 1
            if self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_exception(exc)
            return
        self._asking -= 1
        if granted:
            self.held += 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self.used < self.held and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)
        # Slots nobody here is waiting for go back soon, for the other workers.
        if self.used < self.held and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LINGER, self._trim)

    def _trim(self) -> None:
        self._timer = None
        while self.used < self.held and not self._waiters:
            self.held -= 1
            self._give_back()

    async def aclose(self) -> None:
        """Stop asking and give back the spare slots (the worker is finishing)."""
        if self._timer is not None:
            self._timer.cancel()
        self._trim()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class GlobalLane(Lane):
    """A handle's lane in a Ray worker: its concurrency slots come from the broker.

    Everything else a lane does for this process stays local.
    """

    __slots__ = ("lease",)

    def __init__(self, limits: Limits, lease: SlotLease) -> None:
        super().__init__(replace(limits, concurrency=None))
        self.limits = limits
        self.lease = lease

    def __repr__(self) -> str:
        return f"fanflow.GlobalLane({self.limits!r})"

    def try_acquire(self) -> bool:
        return self.lease.try_take()

    async def acquire(self) -> None:
        await self.lease.take()

    def release(self) -> None:
        self.lease.give()

    def statistics(self) -> LaneStatistics:
        return super().statistics()


def needs_broker(limits: Limits) -> bool:
    """Whether a handle's limits must be enforced cluster-wide."""
    return limits.concurrency is not None
