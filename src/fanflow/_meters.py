"""Admission as a stack of small meters: the rules a lane is made of.

Every meter has the same methods (:class:`Meter`): ``acquire(permit)`` waits until its
rule admits the call the permit describes and records in it what it holds
(``acquire_nowait``: the same when it need not wait, as trio's ``acquire_nowait``);
``release(permit, outcome)`` gives that back and learns from how the call ended. A
:class:`~fanflow._limits.Lane` is the stack its ``Limits`` describe: acquired in
order (the gate's slot first), released with the outcome (the gate's slot last).

The meters that space sends in time (a pause, the pacing, the rate buckets, the
headers' credit) share one :class:`Turn`: calls take it in FIFO order and only the
head sleeps, until every rule agrees it may go.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Protocol

from ._exceptions import Overloaded, RateLimited, RequestTooLarge
from ._gate import Gate
from ._log import log_pause
from ._rate import Credit, RateBucket, Slot

__all__ = [
    "MAX_PAUSE",
    "AdaptiveMeter",
    "BucketMeter",
    "GateMeter",
    "Meter",
    "Outcome",
    "PaceMeter",
    "PauseMeter",
    "Permit",
    "RateMeter",
    "Turn",
]

# Sends due within this many seconds go now: timers may fire a hair early, and a
# virtual clock (looptime) steps in microseconds, so a shorter sleep would spin.
EPSILON = 1e-6

# Which part of a request a bucket counts.
TOTAL, INPUT, OUTPUT, REQUESTS = 0, 1, 2, 3
_KINDS = (("rpm", REQUESTS), ("tpm", TOTAL), ("input_tpm", INPUT), ("output_tpm", OUTPUT))

# A 429 in a lane with rate limits widens their margin by this much, up to the most.
_MARGIN_STEP = 0.02
_MAX_MARGIN = 0.2

# The longest a 429's Retry-After pauses a whole lane (the calls' own waits are
# bounded by their retry policy and deadline).
MAX_PAUSE = 60.0


def cost_of(kind: int, input: int, output: int) -> int:
    if kind == TOTAL:
        return input + output
    if kind == INPUT:
        return input
    if kind == OUTPUT:
        return output
    return 1


class Permit:
    """What the meters hold for one admitted attempt: its estimated tokens, its
    reservations in the rate buckets, the ramp's slot after a pause."""

    __slots__ = ("input", "output", "ramp", "slots")

    def __init__(
        self,
        input: int,
        output: int,
        slots: list[tuple[RateBucket, Slot, int]],
        ramp: Gate | None = None,
    ):
        self.input = input
        self.output = output
        self.slots = slots
        self.ramp = ramp


_REFUSALS = (RateLimited, Overloaded)


class Outcome:
    """How an admitted attempt ended, as every meter's ``release`` reads it."""

    __slots__ = ("error", "now", "refused", "response", "sent", "start", "state")

    def __init__(
        self, start: float, now: float, response: Any, error: BaseException | None, sent: int
    ) -> None:
        self.start = start  # when it was sent
        self.now = now
        self.response = response  # the Response, on success
        self.error = error  # its error, on failure (None: cancelled, or never sent)
        self.sent = sent  # the lane's calls in flight, this one included
        # A 429/529: the server refused for load.
        self.refused = error is not None and isinstance(error, _REFUSALS)
        if response is not None:
            self.state = getattr(response, "rate_limit", None)
        else:  # a refusal's rate-limit headers (a RateLimitState), if any
            self.state = getattr(error, "rate_limit", None) if self.refused else None


class Meter(Protocol):
    """One rule of admission."""

    def acquire_nowait(self, permit: Permit) -> Permit | None:
        """:meth:`acquire` when this rule admits the call at once; None when it must
        wait (then nothing was taken, and :meth:`acquire` is called)."""
        ...

    async def acquire(self, permit: Permit) -> Permit:
        """Wait until this rule admits the call ``permit`` describes; record in it
        what this meter holds and return it (a meter may return a richer permit)."""
        ...

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        """Give back what ``permit`` holds of this meter (None: admitted on the fast
        path) and learn from ``outcome`` (None: it was never sent)."""
        ...


class Turn:
    """The FIFO turn the clocked meters share, and whether any of them steers yet
    (``simple``: nothing to wait for but a free slot, the engine's fast path)."""

    __slots__ = ("_wake", "lock", "queued", "simple")

    def __init__(self, simple: bool) -> None:
        self.simple = simple
        self.lock = asyncio.Lock()
        self.queued = 0  # calls holding or waiting for the lock: none, no need to queue
        self._wake: asyncio.Future[None] | None = None

    def steer(self) -> None:
        """A meter has something to wait for: no fast path from now on."""
        self.simple = False

    def wake(self) -> None:
        """Wake the head of the turn to look again (tokens came back, new headers)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def sleep_or_wake(self, timeout: float) -> None:
        """Sleep ``timeout`` seconds, or less if :meth:`wake` is called."""
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = wake
        try:
            await asyncio.wait((wake,), timeout=timeout)
        finally:
            self._wake = None
            if not wake.done():
                wake.cancel()


class GateMeter:
    """The concurrency meter: one slot of the lane's gate per call in flight.

    A refusal that says nothing (a 429/529 with no Retry-After and no rate-limit
    headers) keeps its slot until an answer sent with it would typically have come
    (the median latency of the lane's successes): a rate limiter refuses at once, and
    the limit must bound the refused sends as it bounds the answered ones.
    """

    __slots__ = ("gate", "hedger")

    def __init__(self, gate: Any, hedger: Any) -> None:
        self.gate = gate  # a Gate, or a LeasedGate (fanflow._leases)
        self.hedger = hedger  # the lane's fanflow._hedge.Hedger: its median latency

    def acquire_nowait(self, permit: Permit) -> Permit | None:
        return permit if self.gate.try_acquire() else None

    async def acquire(self, permit: Permit) -> Permit:
        await self.gate.acquire()
        return permit

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        if outcome is not None and outcome.refused:
            until = self._held_until(outcome)
            if until is not None:
                asyncio.get_running_loop().call_at(until, self.gate.release)
                return
        self.gate.release()

    def _held_until(self, refusal: Outcome) -> float | None:
        """When a refusal's slot goes back (None: now, when the server said more)."""
        if refusal.state is not None or refusal.error.retry_after:  # type: ignore[union-attr]
            return None
        median = self.hedger.median()
        if median is None or refusal.start + median <= refusal.now:
            return None
        return float(refusal.start + median)


class PauseMeter:
    """A 429's Retry-After pauses a fixed lane, then a ramp admits half of the limit
    and one more per success (TCP fast recovery, RFC 5681); a rate-limit reset holds
    sends without a ramp. The adaptive controller lowers its limit instead."""

    __slots__ = ("_goal", "_turn", "adaptive", "concurrency", "pauses", "ramp", "until")

    def __init__(self, turn: Turn, concurrency: int | None, adaptive: bool) -> None:
        self._turn = turn
        self.concurrency = concurrency
        self.adaptive = adaptive
        self.until = 0.0
        self.pauses = 0
        # After a pause: a gate over the calls sent since, widened by one per success
        # until it reaches ``_goal``; calls already in flight do not count.
        self.ramp: Gate | None = None
        self._goal = 1

    def acquire_nowait(self, permit: Permit) -> Permit | None:
        ramp = self.ramp
        if ramp is None:
            return permit
        if not ramp.try_acquire():
            return None
        permit.ramp = ramp
        return permit

    async def acquire(self, permit: Permit) -> Permit:
        ramp = self.ramp
        if ramp is not None:
            await ramp.acquire()
            permit.ramp = ramp
        return permit

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        ramp = None if permit is None else permit.ramp
        if ramp is not None:
            if outcome is not None and outcome.response is not None and ramp is self.ramp:
                self._widen(ramp)
            ramp.release()
        if outcome is None or not outcome.refused or self.adaptive:
            return
        retry_after = outcome.error.retry_after  # type: ignore[union-attr]
        if retry_after is not None and retry_after > 0:
            log_pause(retry_after, outcome.error)  # type: ignore[arg-type]
            self.pause(outcome.now + min(retry_after, MAX_PAUSE), outcome.sent)

    def _widen(self, ramp: Gate) -> None:
        """One more call after each success: the ramp doubles every round trip."""
        limit = (ramp.limit or 0) + 1
        if limit >= self._goal:
            self.ramp = None
            ramp.set_limit(None)  # the ramp is over: everyone waiting may go
        else:
            ramp.set_limit(limit)

    def pause(self, until: float, sent: int) -> None:
        """Send nothing before ``until``, then ramp up from half the limit (or half
        of the ``sent`` calls in flight, with no limit)."""
        self.hold(until)
        self.pauses += 1
        if self.adaptive:
            return
        goal = self.concurrency
        self._goal = max(sent, 2) if goal is None else goal
        start = max(1, self._goal // 2)
        if self.ramp is None:
            self.ramp = Gate(start)
        else:
            self.ramp.set_limit(start)

    def hold(self, until: float) -> None:
        """Send nothing before ``until`` (a rate-limit reset), without a ramp."""
        self._turn.steer()
        if until > self.until:
            self.until = until


class _Learner:
    """A meter that learns from outcomes only: it admits every call at once."""

    __slots__ = ()

    def acquire_nowait(self, permit: Permit) -> Permit | None:
        return permit

    async def acquire(self, permit: Permit) -> Permit:
        return permit


class PaceMeter(_Learner):
    """The delay-based throttle (``Limits.paced``): sends spaced by a delay, longer
    after a 429/529, shorter after a success."""

    __slots__ = ("delay", "next", "settings")

    def __init__(self, settings: Any) -> None:
        self.settings = settings  # a fanflow.limits.Pacing
        self.delay: float = settings.initial
        self.next = -math.inf  # the next send time

    def claim(self, t: float, now: float) -> float:
        """The send time of a call that may go at ``t`` otherwise; its place is taken."""
        t = max(t, self.next)
        self.next = max(t, now) + self.delay
        return t

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        if outcome is None:
            return
        s = self.settings
        if outcome.response is not None:
            self.delay = max(s.min, self.delay * s.recover)
        elif outcome.refused:
            self.delay = min(s.max, self.delay * s.backoff)


class AdaptiveMeter(_Learner):
    """The adaptive concurrency controller (``fanflow.limits.Adaptive``, decision
    0131): it moves the gate's limit, slow start below the level where the server
    last pushed back, a slow probe above it."""

    __slots__ = ("_gate", "_grown_at", "_turn", "floor", "level", "settings")

    def __init__(self, settings: Any, gate: Any, turn: Turn) -> None:
        self.settings = settings  # a fanflow.limits.Adaptive
        self._gate = gate
        self._turn = turn
        initial = settings.initial
        self.level: float | None = None if initial is None else float(initial)
        self.floor = math.inf  # the level at the last push-back, times ``decrease``
        self._grown_at = 0.0

    def limit(self) -> int | None:
        level = self.level
        return None if level is None else math.ceil(level - 1e-9)

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        if outcome is None:
            return
        if outcome.response is not None:
            if self.level is not None:
                self._grow(outcome.now, outcome.sent)
        elif outcome.refused:
            self._cut(outcome.now, outcome.sent - 1)

    def _grow(self, now: float, sent: int) -> None:
        """A success: widen the limit while it is in use."""
        level = self.level
        assert level is not None
        limit = self.limit()
        if limit is not None and sent < limit and not self._gate.waiting:
            self._grown_at = now  # the limit is not what holds us back: do not grow it
            return
        if level < self.floor:
            level += 1.0  # slow start: one more per success, double per round trip
        else:
            level += level * self.settings.probe * max(0.0, now - self._grown_at)
        self._grown_at = now
        self.level = min(float(self.settings.max), level)
        if self.limit() != limit:
            self._gate.set_limit(self.limit())

    def _cut(self, now: float, others: int) -> None:
        """A 429/529: the calls still in flight are the ones the server accepted (a
        rejection comes back at once), its capacity measured; never below that."""
        s = self.settings
        level = math.inf if self.level is None else self.level
        self.level = self.floor = max(float(s.min), min(level, s.decrease * others))
        self._grown_at = now
        self._turn.steer()
        self._gate.set_limit(self.limit())

    def learnt(self) -> dict[str, float]:
        """The level and floor, once the server pushed back (for a shared store)."""
        if self.level is None or self.floor == math.inf:
            return {}
        return {"level": self.level, "floor": self.floor}

    def start_from(self, learnt: dict[str, float]) -> None:
        """Start from a level another process learnt, unless this one has its own."""
        level = learnt.get("level")
        if level is None or self.floor != math.inf:
            return
        s = self.settings
        self.level = min(float(s.max), max(float(s.min), level))
        self.floor = learnt.get("floor", self.level)
        self._grown_at = asyncio.get_running_loop().time()  # probe up from now
        self._turn.steer()
        self._gate.set_limit(self.limit())

    def inherit(self, other: AdaptiveMeter) -> None:
        """Start from the level ``other`` (an earlier loop's) reached."""
        if other.level is None:
            return
        self.level, self.floor = other.level, other.floor
        # The probe grows with the time since now, on this loop's clock.
        self._grown_at = asyncio.get_running_loop().time()
        self._turn.steer()
        self._gate.set_limit(self.limit())


class BucketMeter:
    """One rate limit of the lane's own (a :class:`~fanflow._rate.RateBucket`): the
    GCRA and its window, or, while the headers' ``credit`` of its unit is live, that
    credit and the window (decisions 0176, 0218)."""

    __slots__ = ("bucket", "credit", "kind")

    def __init__(self, bucket: RateBucket, kind: int, credit: Credit | None) -> None:
        self.bucket = bucket
        self.kind = kind
        self.credit = credit

    def time(self, t: float, now: float, cost: int) -> float:
        """When a call of ``cost`` may go, given that it may not before ``t``."""
        credit = self.credit
        if credit is not None and credit.live:
            return self.bucket.window_time(max(t, now + credit.wait(now, cost)), cost)
        return self.bucket.send_time(t, cost)

    def take(self, now: float, cost: int) -> Slot:
        slot = self.bucket.reserve(now, cost)
        credit = self.credit
        if credit is not None and credit.live:
            credit.take(now, cost)
        return slot

    def settle(self, slot: Slot, input: int, output: int, refund: bool) -> None:
        if self.kind == REQUESTS:
            return
        cost = cost_of(self.kind, input, output)
        if refund or cost > slot.cost:
            credit = self.credit
            if self.kind == TOTAL and credit is not None and credit.live:
                credit.give(slot.cost - cost)
            self.bucket.settle(slot, cost)


class RateMeter:
    """The lane's own rate limits (``rpm``, ``tpm``, ``input_tpm``, ``output_tpm``):
    calls take FIFO turns, each waits until the pause, the pacing and every bucket
    allow its estimated cost, reserves it, and settles it against the reported usage.
    A 429 widens the buckets' margin (decision 0130)."""

    __slots__ = ("_counts_tokens", "_last_cut", "_pace", "_pause", "_turn", "buckets", "limits")

    def __init__(
        self,
        limits: Any,
        credits: dict[int, Credit],
        pause: PauseMeter,
        pace: PaceMeter | None,
        turn: Turn,
    ) -> None:
        self.limits = limits
        self.buckets = [
            BucketMeter(
                RateBucket(name, value, limits.period, limits.burst, limits.margin),
                kind,
                credits.get(kind),
            )
            for name, kind in _KINDS
            if (value := getattr(limits, name)) is not None
        ]
        self._pause, self._pace, self._turn = pause, pace, turn
        self._last_cut = -math.inf
        self._counts_tokens = any(m.kind != REQUESTS for m in self.buckets)

    def check(self, input: int, output: int, who: str) -> None:
        """Raise ``RequestTooLarge`` if a request of this size can never be admitted."""
        for meter in self.buckets:
            bucket = meter.bucket
            cost = cost_of(meter.kind, input, output)
            if not bucket.fits(cost):
                raise RequestTooLarge(
                    f"{who} needs an estimated {cost:,} tokens ({input:,} in, "
                    f"{output:,} out) but {bucket.name}={bucket.limit:,g} allows at most "
                    f"{bucket.limit:,g} per {self.limits.period:g} s, so it can never be "
                    f"sent; raise {bucket.name}=, lower max_tokens= or shorten the prompt"
                )

    def costs(self, input: int, output: int) -> list[int]:
        return [cost_of(m.kind, input, output) for m in self.buckets]

    def ready_at(self, t: float, tokens: tuple[int, int]) -> float:
        for m in self.buckets:
            t = m.bucket.send_time(t, cost_of(m.kind, *tokens))
        return t

    def _time(self, now: float, costs: list[tuple[BucketMeter, int]]) -> float:
        """When the call may go by the pause, the pacing and every bucket."""
        t = max(now, self._pause.until)
        pace = self._pace
        if pace is not None and pace.next > t:
            t = pace.next
        for meter, cost in costs:
            t = meter.time(t, now, cost)
        return t

    def _take(self, permit: Permit, now: float, costs: list[tuple[BucketMeter, int]]) -> Permit:
        permit.slots = [(m.bucket, m.take(now, cost), m.kind) for m, cost in costs]
        if self._pace is not None:
            self._pace.next = now + self._pace.delay
        return permit

    def acquire_nowait(self, permit: Permit) -> Permit | None:
        if self._turn.queued:
            return None  # others are before it in the turn
        now = asyncio.get_running_loop().time()
        costs = [(m, cost_of(m.kind, permit.input, permit.output)) for m in self.buckets]
        if self._time(now, costs) - now > EPSILON:
            return None
        return self._take(permit, now, costs)

    async def acquire(self, permit: Permit) -> Permit:
        """Wait for this call's turn, then reserve its cost. Only the head of the queue
        sleeps, and it wakes on every settlement or new headers to look again."""
        loop = asyncio.get_running_loop()
        costs = [(m, cost_of(m.kind, permit.input, permit.output)) for m in self.buckets]
        turn = self._turn
        turn.queued += 1
        try:
            async with turn.lock:
                while True:
                    now = loop.time()
                    t = self._time(now, costs)
                    if t - now <= EPSILON:
                        return self._take(permit, now, costs)
                    await turn.sleep_or_wake(t - now)
        finally:
            turn.queued -= 1

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        if outcome is None:
            return
        if (
            self._counts_tokens
            and permit is not None
            and permit.slots  # none: booked elsewhere (a broker's permit)
            and outcome.response is not None
        ):
            self._settle(permit, outcome.response.usage)
        if isinstance(outcome.error, RateLimited) and outcome.start >= self._last_cut:
            # Our model of the server's limit was too generous: pace further under it
            # (once per round of 429s: attempts sent before the last widening saw the
            # old rate).
            self._last_cut = outcome.now
            for m in self.buckets:
                m.bucket.widen_margin(min(_MAX_MARGIN, m.bucket.margin + _MARGIN_STEP))

    def _settle(self, permit: Permit, usage: Any) -> None:
        input, output = usage.input_tokens, usage.output_tokens
        if input + output <= 0:
            return  # the provider reported no usage: keep the estimate
        refund = self.limits.refund
        for meter, (_, slot, _) in zip(self.buckets, permit.slots, strict=True):
            meter.settle(slot, input, output, refund)
        self._turn.wake()  # tokens came back: the head of the queue may go sooner

    def carry_from(self, other: RateMeter, shift: float) -> None:
        """Take over ``other``'s reservations (the same limits on an earlier loop)."""
        for mine, old in zip(self.buckets, other.buckets, strict=True):
            mine.bucket.carry_from(old.bucket, shift)
