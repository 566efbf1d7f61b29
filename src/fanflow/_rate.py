"""Rate arithmetic: request and token buckets, as pure functions of explicit inputs.

Nothing here sleeps or reads a clock: each function takes ``now`` and returns when a
send may happen, so tests check schedules exactly and property tests (hypothesis)
check "no window exceeds its limit" over random inputs.

A :class:`RateBucket` combines two rules, because hosted APIs enforce per-minute
limits over shorter periods too ("6,000 RPM may be enforced as 100 per second"):

1. **GCRA** (the Generic Cell Rate Algorithm of ATM networks, ITU-T I.371; the same
   scheduler as aiometer's ``max_per_second`` and the ``limits``/``redis-cell``
   libraries): sends are spaced evenly at ``rate`` per second, with a burst of at most
   ``burst`` units (half a second of budget by default), never a whole minute's worth at
   once. The state is one number, the theoretical arrival time (TAT).
   ``rate`` is the limit less a ``margin`` (3% by default), so a limiter of the same
   nominal size elsewhere absorbs network and event-loop jitter (decision 0130).
2. **A sliding window** of ``period`` seconds (60 s for per-minute limits): the sum of
   the costs sent in any half-open window ``(x - period, x]`` never exceeds ``limit``.
   GCRA alone would let ``burst + limit`` through in the first minute.

Admission *schedules*: a caller asks for a cost and gets the time at which it may send;
the reservation is committed at once, so later callers queue behind it in FIFO order
with O(1) work each and no thundering herd of sleepers re-checking the clock.
A reservation that is cancelled before it is sent is given back; one that is sent is
settled later against the cost the server reported (see :meth:`RateBucket.settle`).
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["Credit", "RateBucket", "Slot", "gcra_send_time"]

# A slot leaves the window this long after ``period``: clocks and timers are not exact to
# the last bit (a timer may fire a hair early), and a window edge must never be shared.
_GUARD = 1e-4


def gcra_send_time(tat: float, now: float, cost: float, rate: float, burst: float) -> float:
    """The earliest time >= ``now`` at which ``cost`` units conform to the GCRA.

    Args:
        tat: the theoretical arrival time (state of the bucket).
        now: the current time.
        cost: units wanted (requests or tokens).
        rate: units per second.
        burst: bucket capacity in units (the most that may go at once).

    A cost larger than ``burst`` conforms when the bucket is full and leaves it in debt
    (later sends wait longer), so a big request is never refused by the burst alone.
    """
    return max(now, tat - (burst - min(cost, burst)) / rate)


class Slot:
    """One reservation in a bucket's sliding window (its cost may be settled later)."""

    __slots__ = ("cost", "live", "time")

    def __init__(self, time: float, cost: float) -> None:
        self.time = time
        self.cost = cost
        self.live = True


class RateBucket:
    """A GCRA bucket plus a sliding window: ``limit`` units per ``period`` seconds.

    Args:
        name: what is limited, for messages ("rpm", "tpm", ...).
        limit: units allowed per period.
        period: the window in seconds (60 for per-minute limits).
        burst: seconds of budget that may go at once (capacity = limit / period *
            burst, at least one unit); 0 spaces sends perfectly evenly.
        margin: the share of the rate left unused (0.03: pace at 97% of the limit).
    """

    __slots__ = (
        "_last",
        "_log",
        "_sum",
        "burst",
        "limit",
        "margin",
        "name",
        "period",
        "rate",
        "tat",
    )

    def __init__(
        self,
        name: str,
        limit: float,
        period: float = 60.0,
        burst: float = 1.0,
        margin: float = 0.0,
    ) -> None:
        self.name = name
        self.limit = limit
        self.period = period
        self.margin = margin
        self.rate = limit / period * (1.0 - margin)
        self.burst = max(limit / period * burst, 1.0)
        self.tat = float("-inf")
        self._last = float("-inf")  # the latest send time handed out (FIFO order)
        self._log: deque[Slot] = deque()
        self._sum = 0.0

    def __repr__(self) -> str:
        return f"RateBucket({self.name}={self.limit:g}/{self.period:g}s, burst={self.burst:g})"

    def carry_from(self, other: RateBucket, shift: float) -> None:
        """Take over ``other``'s reservations (the same limit on an earlier event loop),
        its times moved by ``shift`` seconds onto this bucket's clock."""
        self.widen_margin(other.margin)
        self.tat = other.tat + shift
        self._last = other._last + shift
        log = list(other._log)  # one C-level copy: the other loop may run in a thread
        self._log = deque(Slot(s.time + shift, s.cost) for s in log if s.live)
        self._sum = sum(s.cost for s in self._log)

    def widen_margin(self, margin: float) -> None:
        """Pace further under the limit from now on (a margin learned from a 429)."""
        if margin > self.margin:
            self.margin = margin
            self.rate = self.limit / self.period * (1.0 - margin)

    def send_time(self, now: float, cost: float) -> float:
        """When ``cost`` units may be sent, without reserving them."""
        t = gcra_send_time(self.tat, now, cost, self.rate, self.burst)
        if t < self._last:
            t = self._last  # FIFO: never overtake an earlier reservation
        return self._window_time(t, cost)

    def window_time(self, t: float, cost: float) -> float:
        """When ``cost`` units may be sent by the sliding window alone (the limit per
        period; no pacing, no burst), in FIFO order."""
        return self._window_time(max(t, self._last), cost)

    def _window_time(self, t: float, cost: float) -> float:
        """The earliest time >= t at which the window has room for ``cost``."""
        log = self._log
        total = self._sum
        period = self.period
        i = 0
        n = len(log)
        # A slot has left the window ending at t when slot.time + period + guard <= t
        # (always this expression, so the float rounding is the same everywhere).
        while i < n and log[i].time + period + _GUARD <= t:
            total -= log[i].cost
            i += 1
        while total + cost > self.limit and i < n:
            t = log[i].time + period + _GUARD
            total -= log[i].cost
            i += 1
        return t

    def reserve(self, time: float, cost: float) -> Slot:
        """Commit ``cost`` units sent at ``time`` (a time from :meth:`send_time`)."""
        self.tat = max(self.tat, time) + cost / self.rate
        self._last = time
        log = self._log
        period = self.period
        while log and log[0].time + period + _GUARD <= time:
            old = log.popleft()
            old.live = False
            self._sum -= old.cost
        slot = Slot(time, cost)
        log.append(slot)
        self._sum += cost
        return slot

    def settle(self, slot: Slot, cost: float) -> None:
        """Correct a reservation to the cost the server reported.

        Unused units go back to both rules; an overrun is charged as debt, so the
        next sends wait for it.
        """
        delta = cost - slot.cost
        if delta == 0:
            return
        self.tat += delta / self.rate
        if slot.live:
            self._sum += delta
        slot.cost = cost

    def cancel(self, slot: Slot) -> None:
        """Give back a reservation that was never sent."""
        self.settle(slot, 0.0)

    def fits(self, cost: float) -> bool:
        """Whether one request of ``cost`` units can ever be admitted."""
        return cost <= self.limit


class Credit:
    """Units a server's rate-limit headers say are left (decision 0218): the amount at
    the last reading, refilling at the server's rate up to its limit, less what was sent
    since. While it is live (a refill rate known), it decides a send's turn in place of
    a bucket's margin and burst, which are for a limiter fanflow cannot see.
    """

    __slots__ = ("amount", "at", "cap", "rate", "since")

    def __init__(self) -> None:
        self.amount = math.inf
        self.at = 0.0  # when ``amount`` was counted
        self.rate = 0.0  # units per second; 0 until a reading gives one
        self.cap = math.inf
        self.since = -math.inf  # when the attempt whose reply set it was sent

    def __repr__(self) -> str:
        return f"Credit({self.amount:g} at {self.at:g}, +{self.rate:g}/s, cap {self.cap:g})"

    @property
    def live(self) -> bool:
        return self.rate > 0

    def left(self, now: float) -> float:
        """The credit at ``now``: as last set, plus the refill since, at most the cap."""
        return min(self.cap, self.amount + self.rate * (now - self.at))

    def wait(self, now: float, cost: float) -> float:
        """Seconds from ``now`` until the credit holds ``cost`` (0: it does now)."""
        return max(0.0, (cost - self.left(now)) / self.rate)

    def take(self, now: float, cost: float) -> None:
        """``cost`` units sent at ``now``."""
        self.amount = self.left(now) - cost
        self.at = now

    def give(self, units: float) -> None:
        """A send used ``units`` fewer than it took (negative: more)."""
        self.amount += units

    def observe(
        self, left: float, rate: float | None, limit: float | None, now: float, start: float
    ) -> bool:
        """A reading of the headers: ``left`` units at ``now`` (the server's remaining
        plus its refill since, less what was sent since), refilling at ``rate``, from
        the reply to an attempt sent at ``start``. Returns whether it set the credit."""
        if rate:
            self.rate = rate
        if not self.rate or start < self.since:
            # no refill rate known yet; or an older reading: the sends after it that
            # are already done are in neither its remaining nor what was sent since
            return False
        if start == self.since:  # sent together: the lowest reading is the latest
            left = min(left, self.left(now))
        self.amount = left
        self.at = now
        self.since = start
        if limit:
            self.cap = float(limit)
        return True
