"""The worker side of a limit kept elsewhere: rate grants booked in batches, concurrency
slots leased and reused, and the lane made of them.

A lane whose limits belong to more than this process (the Ray broker of
``backends/_limiter.py``, a shared store of ``fanflow._shared``) books through these:

- a :class:`GrantQueue` asks for rate grants for whatever calls have gathered, in one
  message at a time; the far side books each send on its own clock at the earliest time
  the shared buckets allow and answers "send in ``delay`` seconds" (only for sends due
  within :func:`lease_time`); :class:`BrokerAdmission` (the lane's ``Admission``) sends
  ``delay`` after the answer, which is never early, and gives the grant back if it
  could not send within the lease (its loop lagged);
- a :class:`SlotLease` holds concurrency slots from the far side, passes one from call
  to call while calls wait here (up to :data:`REUSE` times in a row) and gives spare
  ones back after :data:`LINGER`; a :class:`LeasedGate` is the lane's gate over it;
- a :class:`GlobalLane` is a :class:`~fanflow._limits.Lane` made of the two.

They know the far side only by the callables they are given. See
docs/decisions/0071-ray-global-limits.md and 0200-shared-limits.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ._gate import Gate, GateStatistics
from ._limits import Lane, Limits, Permit

__all__ = [
    "LINGER",
    "REUSE",
    "BrokerAdmission",
    "FarClock",
    "GlobalLane",
    "GlobalPermit",
    "GrantQueue",
    "LeasedGate",
    "SlotLease",
    "lease_time",
]

# A worker passes a leased slot on to at most this many of its own calls in a row, then
# gives it back and asks again, behind the other workers already waiting.
REUSE = 8
# A slot no call of this worker is waiting for is kept this long before it goes back:
# the worker's next item usually asks for one within a loop turn or two, and keeping
# it saves that call a round trip to the broker.
LINGER = 0.005


def lease_time(period: float) -> float:
    """How late after its booked time a granted send may still go: long enough for a
    round trip to the broker under load, short against the period (0.25 s of 60 s)."""
    return max(0.05, min(0.25, 0.02 * period))


class SlotLease:
    """A worker's share of one handle's cluster-wide concurrency.

    Args:
        limit: the handle's concurrency limit: a worker never holds or asks for more
            slots than that, so it cannot queue ahead of other workers at the broker.
        ask: waits for one slot from the broker (True when granted).
        give_back: returns one slot to the broker (fire and forget).
        over: whether the worker holds more slots than it may now (a shared store's
            local share in an outage): a slot then goes back as its call ends.
    """

    __slots__ = (
        "_ask",
        "_asking",
        "_give_back",
        "_limit",
        "_over",
        "_reuses",
        "_tasks",
        "_timer",
        "_waiters",
        "held",
        "used",
    )

    def __init__(
        self,
        limit: int,
        ask: Callable[[], Awaitable[bool]],
        give_back: Callable[[], None],
        over: Callable[[], bool] | None = None,
    ) -> None:
        self._limit = limit
        self._ask = ask
        self._give_back = give_back
        self._over = over
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
        if self._over is not None and self._over():
            self.held -= 1
            self._give_back()
            self._ask_more()
            return
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


class LeasedGate:
    """A lane's gate whose slots are also leased from the far side: a local
    :class:`Gate` (the ramp after a pause, the adaptive controller move its limit) and
    the lease both hold. It has the gate's methods, so a lane uses it as its gate."""

    __slots__ = ("lease", "local")

    def __init__(self, limit: int | None, lease: SlotLease) -> None:
        self.local = Gate(limit)
        self.lease = lease

    @property
    def limit(self) -> int | None:
        return self.local.limit

    @property
    def waiting(self) -> int:
        return self.local.waiting

    def set_limit(self, limit: int | None) -> None:
        self.local.set_limit(limit)

    def idle(self) -> bool:
        return self.local.idle()

    def try_acquire(self) -> bool:
        if not self.local.try_acquire():
            return False
        if self.lease.try_take():
            return True
        self.local.release()
        return False

    async def acquire(self) -> None:
        await self.local.acquire()
        try:
            await self.lease.take()
        except BaseException:
            self.local.release()
            raise

    def release(self) -> None:
        self.lease.give()
        self.local.release()

    def statistics(self) -> GateStatistics:
        return self.local.statistics()


Answers = list[tuple[float, int]]


class FarClock:
    """What a far side's clock reads against this loop's, from the round trips seen.

    A far side that read its clock at ``far_now`` during a round trip from ``asked`` to
    ``answered`` (loop times) is ahead of the loop by at least ``far_now - answered``
    and at most ``far_now - asked``. The tightest of the last :data:`KEEP` round trips'
    bounds hold: one quick round trip places the bookings of the slow ones after it.
    """

    KEEP = 32  # round trips: a few seconds of them, so a slewing clock drifts little

    __slots__ = ("_high", "_low")

    def __init__(self) -> None:
        self._low: deque[float] = deque(maxlen=self.KEEP)
        self._high: deque[float] = deque(maxlen=self.KEEP)

    def sample(self, asked: float, answered: float, far_now: float) -> None:
        self._low.append(far_now - answered)
        self._high.append(far_now - asked)
        if max(self._low) > min(self._high):  # the far clock stepped: start again
            self._low = deque([far_now - answered], maxlen=self.KEEP)
            self._high = deque([far_now - asked], maxlen=self.KEEP)

    def place(self, far_time: float) -> tuple[float, float]:
        """(the earliest, the latest) loop time that ``far_time`` can be."""
        return far_time - max(self._low), far_time - min(self._high)


class GrantQueue:
    """A worker's way to the broker's rate buckets for one handle.

    Calls ask for grants through one queue, and the queue sends whatever has gathered
    in one message (up to ``max_batch``) with one message in flight at a time. So a
    thousand calls asking at once cost a few messages, and each answer comes back
    within about one round trip of its message being sent, which the lease needs
    (a grant whose answer took longer than a lease could never be used in time).

    Args:
        grant_many: books a list of sends; returns (delay, grant id) for each, with
            id 0 for a send not booked because it is due more than ``horizon`` away.
            A far side that reads its own clock returns (its time, those answers): each
            grant is then placed by a :class:`FarClock`, not by its round trip alone.
        settle: corrects (or with zeros gives back) one grant; fire and forget.
        horizon: how far ahead the broker books (the lease).
    """

    def __init__(
        self,
        grant_many: Callable[[list[list[int]]], Awaitable[Answers | tuple[float, Answers]]],
        settle: Callable[[int, list[int] | None], None],
        horizon: float,
        max_batch: int = 256,
    ) -> None:
        self._grant_many = grant_many
        self._horizon = horizon
        self.settle = settle
        self._max_batch = max_batch
        self._queue: deque[tuple[list[int], asyncio.Future[tuple[float, float, int]]]] = deque()
        self._pump: asyncio.Task[None] | None = None
        self.clock = FarClock()
        self.messages = 0

    async def grant(self, costs: list[int]) -> tuple[float, float, int]:
        """Book one send; return (the loop time it may go at, the loop time it was booked
        for at the latest, its grant id): it must go within a lease of the second."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[float, float, int]] = loop.create_future()
        self._queue.append((costs, fut))
        if self._pump is None:
            self._pump = loop.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))
                ]
                asked = loop.time()
                self.messages += 1
                try:
                    reply = await self._grant_many([costs for costs, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                answered = loop.time()
                far_now = None
                if isinstance(reply, tuple):
                    far_now, answers = reply
                    self.clock.sample(asked, answered, far_now)
                else:
                    answers = reply
                later: list[tuple[list[int], asyncio.Future[tuple[float, float, int]]]] = []
                due = 0.0
                for (costs, fut), (delay, grant) in zip(batch, answers, strict=True):
                    if grant == 0:  # not due yet: ask again, first in line
                        if not fut.done():
                            later.append((costs, fut))
                        due = delay
                    elif fut.done():  # the call was cancelled meanwhile: give it back
                        self.settle(grant, [0] * len(costs))
                    elif far_now is None:
                        # Booked at (the far side's now) + delay, and its now fell between
                        # asking and answering: answered + delay is never early.
                        fut.set_result((answered + delay, asked + delay, grant))
                    else:
                        earliest, latest = self.clock.place(far_now + delay)
                        fut.set_result((max(answered, earliest), latest, grant))
                if later:
                    self._queue.extendleft(reversed(later))
                    # Ask again when the first unbooked send is half a lease away: the
                    # answer still comes before it is due, and it books half a lease of
                    # sends (docs/decisions/0071).
                    await asyncio.sleep(max(due - self._horizon / 2, 0.001))
        finally:
            self._pump = None

    async def aclose(self) -> None:
        pump = self._pump
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


class GlobalPermit(Permit):
    """A permit whose rate reservation lives at the broker (``grant``, booked at
    ``booked``, one cost per rate limit)."""

    __slots__ = ("booked", "grant")

    def __init__(self, input: int, output: int, grant: int, booked: list[int]) -> None:
        super().__init__(input, output, [])
        self.grant = grant
        self.booked = booked


class BrokerAdmission:
    """A lane's rate admission booked at the broker (the lane's :class:`Admission`):
    each send is granted by the cluster-wide buckets; the lane's own pause after a 429
    and its header pacing still hold it back first.

    Args:
        grants: the worker's way to the broker's rate buckets for the handle.
        period: the period of the handle's rate limits (sets the lease).
    """

    __slots__ = ("grants", "lease_time")

    def __init__(self, grants: GrantQueue, period: float) -> None:
        self.grants = grants
        self.lease_time = lease_time(period)

    async def book(self, lane: Lane, tokens: tuple[int, int]) -> Permit:
        grants = self.grants
        loop = asyncio.get_running_loop()
        input, output = tokens
        costs = lane.costs(input, output)
        while True:
            await lane.wait_unpaused()  # this worker's own pause (429) and header pacing
            send_at, booked, grant = await grants.grant(costs)
            latest = booked + self.lease_time  # to stay in its booking
            pause = lane.paused_until
            try:
                if send_at > loop.time():
                    await asyncio.sleep(send_at - loop.time())
            except BaseException:
                grants.settle(grant, [0] * len(costs))  # never sent: give it back
                raise
            now = loop.time()
            paused = lane.paused_until
            if now <= latest and not (paused > pause and paused > now):
                return GlobalPermit(input, output, grant, costs)
            # Too late for its booking (the loop lagged), or a pause began: book again.
            grants.settle(grant, [0] * len(costs))

    def settle(self, lane: Lane, permit: Permit, usage: Any | None) -> None:
        if not isinstance(permit, GlobalPermit):
            return
        if usage is None or usage.input_tokens + usage.output_tokens <= 0:
            self.grants.settle(permit.grant, None)  # sent: its booking stands
            return
        actual = lane.costs(usage.input_tokens, usage.output_tokens)
        if not lane.limits.refund:
            actual = [max(a, b) for a, b in zip(actual, permit.booked, strict=True)]
        self.grants.settle(permit.grant, actual)


class GlobalLane(Lane):
    """A handle's lane in a Ray worker: concurrency slots and rate grants come from the
    broker; pauses after a 429, header pacing and the adaptive controller stay local.
    It is a :class:`Lane` made with a leased gate and the broker's admission; it
    overrides nothing.

    Args:
        limits: the handle's limits.
        lease: the worker's share of the handle's concurrency (None: no limit).
        grants: the broker's rate buckets (None: no rate limit).
    """

    __slots__ = ()

    def __init__(self, limits: Limits, lease: SlotLease | None, grants: GrantQueue | None) -> None:
        admission = None if grants is None else BrokerAdmission(grants, limits.period)
        gate = None if lease is None else (lambda limit: LeasedGate(limit, lease))
        super().__init__(limits, admission, gate)

    def __repr__(self) -> str:
        return f"fanflow.GlobalLane({self.limits!r})"
