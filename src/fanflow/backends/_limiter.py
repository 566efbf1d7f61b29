"""One limit for a whole cluster: a broker that leases admission to workers' lanes.

Rates (``rpm``, ``tpm``, ``input_tpm``, ``output_tpm``) are granted per call: a worker's
lane asks the broker for its call's cost; the broker books it in the handle's rate
buckets (the same :class:`~fanflow._rate.RateBucket` as a local lane, so the same GCRA
spacing and sliding window) at the earliest time they allow, and answers "send in
``delay`` seconds". Clocks of different machines need not agree: the worker sends
``delay`` after the answer arrived, which is never before the booked time, and gives the
grant back unused if it could not send within :func:`lease_time` of it (its event loop
lagged). The broker's window is ``period + lease`` long, so sends that happen up to a
lease after their booked time still never put more than the limit into any ``period``
seconds at the server. After the reply, the worker settles the tokens actually used.

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
from dataclasses import dataclass
from typing import Any

from .._budget import Budget
from .._exceptions import BudgetExceeded
from .._limits import Gate, Lane, Limits, Permit
from .._rate import RateBucket, Slot

__all__ = [
    "LINGER",
    "REUSE",
    "BrokerAdmission",
    "BrokerStatistics",
    "BudgetSpec",
    "GlobalLane",
    "GrantQueue",
    "LeasedGate",
    "LimitBroker",
    "RemoteBudget",
    "SlotLease",
    "budget_of",
    "lease_time",
    "needs_broker",
    "spec_of",
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


# The rate limits in the order ``Lane.costs`` gives a call's costs.
_RATES = ("rpm", "tpm", "input_tpm", "output_tpm")


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    """The broker's view of one handle: slots leased now and at most, by worker."""

    limit: int | None
    leased: int
    max_leased: int
    waiting: int
    by_worker: dict[str, int]
    grants: int = 0


class _Shared:
    __slots__ = ("buckets", "gate", "grants", "held", "next_grant")

    def __init__(self, limits: Limits) -> None:
        self.gate = Gate(limits.concurrency)
        self.held: Counter[str] = Counter()
        # The window is a lease longer than the period: see the module docstring.
        period = limits.period + lease_time(limits.period)
        self.buckets = [
            RateBucket(name, getattr(limits, name), period, limits.burst, limits.margin)
            for name in _RATES
            if getattr(limits, name) is not None
        ]
        self.grants: dict[int, list[Slot]] = {}
        self.next_grant = 0


class LimitBroker:
    """The cluster-wide admission state of every handle (lives in one Ray actor)."""

    def __init__(self) -> None:
        self._handles: dict[str, _Shared] = {}
        self._dead: set[str] = set()
        self._budgets: dict[str, Budget] = {}

    # A budget shared by every worker of a batch (``budget=`` on Ray).

    def open_budget(self, spec: BudgetSpec) -> None:
        self._budgets.setdefault(spec.budget_id, budget_of(spec))

    async def reserve_budget(
        self, budget_id: str, amount: float, who: str, output_tokens: int | None = None
    ) -> float:
        return await self._budgets[budget_id].reserve(amount, who, output_tokens)

    def settle_budget(self, budget_id: str, reserved: float, actual: float) -> None:
        budget = self._budgets.get(budget_id)
        if budget is not None:
            budget.settle(reserved, actual)

    def close_budget(self, budget_id: str) -> tuple[float, int]:
        """Forget a batch's budget; return what it spent and how many calls it skipped."""
        budget = self._budgets.pop(budget_id, None)
        if budget is None:
            return 0.0, 0
        stats = budget.statistics()
        return stats.spent, stats.skipped

    def _shared(self, handle_id: str, limits: Limits) -> _Shared:
        shared = self._handles.get(handle_id)
        if shared is None:
            shared = self._handles[handle_id] = _Shared(limits)
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

    def grant(
        self, handle_id: str, limits: Limits, costs: list[int], now: float
    ) -> tuple[float, int]:
        """Book one send of ``costs`` (one per rate limit, in the order of ``_RATES``
        that are set) at the earliest time the handle's buckets allow.

        Returns:
            (seconds from ``now`` until the send may go, the grant's id).
        """
        shared = self._shared(handle_id, limits)
        t = now
        for bucket, cost in zip(shared.buckets, costs, strict=True):
            t = bucket.send_time(t, cost)
        slots = [
            bucket.reserve(t, cost) for bucket, cost in zip(shared.buckets, costs, strict=True)
        ]
        shared.next_grant += 1
        shared.grants[shared.next_grant] = slots
        return t - now, shared.next_grant

    def grant_many(
        self, handle_id: str, limits: Limits, costs: list[list[int]], now: float
    ) -> list[tuple[float, int]]:
        """:meth:`grant` for several sends in one message, booked in order, but only
        those due within a lease from now: for the first one due later, and the rest,
        the answer is (seconds until it would be due, 0), nothing booked; ask again.

        Booking only the near future keeps a late answer cheap: a grant given back
        frees its time for the next booking, while a queue of bookings far ahead would
        keep every later send behind it.
        """
        shared = self._shared(handle_id, limits)
        horizon = lease_time(limits.period)
        answers: list[tuple[float, int]] = []
        for i, cost in enumerate(costs):
            t = now
            for bucket, c in zip(shared.buckets, cost, strict=True):
                t = bucket.send_time(t, c)
            if t - now > horizon:
                answers.extend([(t - now, 0)] * (len(costs) - i))
                break
            answers.append(self.grant(handle_id, limits, cost, now))
        return answers

    def settle(self, handle_id: str, grant: int, costs: list[int] | None) -> None:
        """A granted send ended: correct its booked costs to ``costs`` (the reported
        usage; None keeps the booking), or give it all back if it was never sent
        (``costs`` of zeros)."""
        shared = self._handles.get(handle_id)
        if shared is None:
            return
        slots = shared.grants.pop(grant, None)
        if slots is None or costs is None:
            return
        for bucket, slot, cost in zip(shared.buckets, slots, costs, strict=True):
            if cost != slot.cost:
                bucket.settle(slot, cost)

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
            grants=shared.next_grant,
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


class LeasedGate(Gate):
    """A lane's gate whose slots are also leased from the broker: the lane's own limit
    (the ramp after a pause, the adaptive controller) and the cluster's both hold."""

    __slots__ = ("lease",)

    def __init__(self, limit: int | None, lease: SlotLease) -> None:
        super().__init__(limit)
        self.lease = lease

    # Gate's own methods call self.try_acquire()/self.release(), which here also take
    # and give the lease; so the local half is spelled out with Gate's methods.

    def try_acquire(self) -> bool:
        if not Gate.try_acquire(self):
            return False
        if self.lease.try_take():
            return True
        Gate.release(self)
        return False

    async def acquire(self) -> None:
        if not Gate.try_acquire(self):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    Gate.release(self)  # handed a local slot just as we were cancelled
                else:
                    self._remove(fut)
                raise
        try:
            await self.lease.take()
        except BaseException:
            Gate.release(self)
            raise

    def release(self) -> None:
        self.lease.give()
        Gate.release(self)


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
        settle: corrects (or with zeros gives back) one grant; fire and forget.
        horizon: how far ahead the broker books (the lease).
    """

    def __init__(
        self,
        grant_many: Callable[[list[list[int]]], Awaitable[list[tuple[float, int]]]],
        settle: Callable[[int, list[int] | None], None],
        horizon: float,
        max_batch: int = 256,
    ) -> None:
        self._grant_many = grant_many
        self._horizon = horizon
        self.settle = settle
        self._max_batch = max_batch
        self._queue: deque[tuple[list[int], asyncio.Future[tuple[float, int, float]]]] = deque()
        self._pump: asyncio.Task[None] | None = None
        self.messages = 0

    async def grant(self, costs: list[int]) -> tuple[float, int, float]:
        """Book one send; return (delay, grant id, when the booking message was sent)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[float, int, float]] = loop.create_future()
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
                    answers = await self._grant_many([costs for costs, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                later: list[tuple[list[int], asyncio.Future[tuple[float, int, float]]]] = []
                due = 0.0
                for (costs, fut), (delay, grant) in zip(batch, answers, strict=True):
                    if grant == 0:  # not due yet: ask again, first in line
                        if not fut.done():
                            later.append((costs, fut))
                        due = delay
                    elif fut.done():  # the call was cancelled meanwhile: give it back
                        self.settle(grant, [0] * len(costs))
                    else:
                        fut.set_result((delay, grant, asked))
                if later:
                    self._queue.extendleft(reversed(later))
                    # Ask again when the first unbooked send is half a lease away: the
                    # answer still comes before it is due, and it books half a lease of
                    # sends. (Asking as soon as it entered the horizon booked one send per
                    # message: 270 messages for 1,000 sends at 200/s, 85 now.)
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
            delay, grant, asked = await grants.grant(costs)
            # The broker booked the send at (its now) + delay, and its now fell between
            # asking and answering: sending ``delay`` after the answer is never early,
            # and the send must go before asked + delay + lease to stay in its booking.
            send_at = loop.time() + delay
            latest = asked + delay + self.lease_time
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
        super().__init__(limits, None if grants is None else BrokerAdmission(grants, limits.period))
        if lease is not None:
            self.gate = LeasedGate(self.gate.limit, lease)

    def __repr__(self) -> str:
        return f"fanflow.GlobalLane({self.limits!r})"


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """What a worker needs to build its view of a cluster-wide budget."""

    budget_id: str
    unit: str
    limit: float
    prices: dict[str, Any] | None
    spent: float = 0.0


def spec_of(budget: Budget, budget_id: str) -> BudgetSpec:
    prices = budget.prices
    return BudgetSpec(
        budget_id, budget.unit, budget.limit, dict(prices) if prices else None, budget.spent
    )


def budget_of(spec: BudgetSpec) -> Budget:
    """A budget with the spec's cap, prices and what was spent before (for the broker)."""
    if spec.unit == "usd":
        budget = Budget(usd=spec.limit, prices=spec.prices)
    else:
        budget = Budget(tokens=int(spec.limit), prices=spec.prices)
    budget.settle(0.0, spec.spent)
    return budget


class RemoteBudget(Budget):
    """A worker's view of a budget kept by the broker: every worker's calls reserve and
    settle against the one budget there, so together they never spend more than it.
    Prices are applied here (``amount``), the arithmetic of the cap at the broker.

    Args:
        spec: the budget's unit, cap and prices.
        reserve: reserves at the broker (raises ``BudgetExceeded``, maybe wrapped).
        settle: settles at the broker; fire and forget.
    """

    __slots__ = ("_remote_reserve", "_remote_settle")

    def __init__(
        self,
        spec: BudgetSpec,
        reserve: Callable[[float, str, int | None], Awaitable[float]],
        settle: Callable[[float, float], None],
    ) -> None:
        if spec.unit == "usd":
            super().__init__(usd=spec.limit, prices=spec.prices)
        else:
            super().__init__(tokens=int(spec.limit), prices=spec.prices)
        self._remote_reserve = reserve
        self._remote_settle = settle

    async def reserve(self, amount: float, who: str, output_tokens: int | None = None) -> float:
        try:
            return await self._remote_reserve(amount, who, output_tokens)
        except BudgetExceeded as exc:
            # Ray wraps a remote error in a class of its own: raise the plain one.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BudgetExceeded):
                raise cause from None
            raise

    def settle(self, reserved: float, actual: float) -> None:
        self._remote_settle(reserved, actual)


def needs_broker(limits: Limits) -> bool:
    """Whether a handle's limits must be enforced cluster-wide."""
    return limits.concurrency is not None or limits.rated
