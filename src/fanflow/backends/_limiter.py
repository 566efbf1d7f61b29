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

Why a broker and leases rather than splitting the limit between workers:
docs/decisions/0071-ray-global-limits.md.

Nothing here imports Ray: the broker is plain asyncio (the actor wraps it), and the
worker's lane talks to it through two callables, so both are tested without a cluster.
The worker's side (``GrantQueue``, ``SlotLease``, ``BrokerAdmission``, ``GlobalLane``)
lives in :mod:`fanflow._leases`, shared with the stores of ``Limits(shared=)``
(decision 0200), and is re-exported here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .._budget import Budget
from .._exceptions import BudgetExceeded
from .._leases import (
    LINGER,
    REUSE,
    BrokerAdmission,
    GlobalLane,
    GrantQueue,
    LeasedGate,
    SlotLease,
    lease_time,
)
from .._limits import Gate, Limits
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
