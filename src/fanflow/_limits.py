"""Admission: how many calls a handle may have in flight, and how fast they may go.

A :class:`Limits` is configuration (frozen); a :class:`Lane` is the live state that
enforces it for one handle on one event loop. Every pattern using a handle shares its
lane, so two maps running at once stay within one limit together.

A lane has up to three parts, and a handle with no limits pays only for the first:

- the gate: a FIFO semaphore whose limit can change while it is in use (the adaptive
  controller moves it; ``asyncio.Semaphore`` cannot);
- rate buckets (``rpm``, ``tpm``, ``input_tpm``, ``output_tpm``; see :mod:`._rate`):
  calls take FIFO turns; each waits until the buckets have room for its estimated cost,
  reserves it, and after the reply settles it against the reported usage;
- reactions to the server: with an adaptive controller (``Limits.adaptive()`` and the
  handles' default) a 429/529 lowers the in-flight limit to what the server accepted and
  only the rejected call waits its Retry-After; with fixed limits a 429 with
  Retry-After pauses the whole lane for exactly that long and then resumes at half of
  what was in flight, one more per success; a 429 in a lane with rate limits widens
  their margin (decision 0130); rate-limit headers space sends when ``remaining`` runs
  low and hold them while it is used up.

Handles with no rate limits take the engine's fast path (:meth:`Lane.try_acquire`): no
bucket work, no token estimate, until the server first asks them to slow down.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from ._checks import check_concurrency
from ._exceptions import ConfigError, Overloaded, RateLimited, RequestTooLarge
from ._hedge import Hedger
from ._log import log_pause
from ._rate import Credit, RateBucket, Slot
from ._types import RateLimitState

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_LIMITS",
    "Adaptive",
    "Admission",
    "Gate",
    "GateStatistics",
    "Lane",
    "LaneStatistics",
    "Limits",
    "Pacing",
    "Permit",
]


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}; use None for no limit")


# The most calls a pattern puts in flight when neither it (``concurrency=``) nor its
# handle (``Limits(concurrency=)``) sets a limit. The handle's default controller lowers
# it as soon as the server pushes back (see DEFAULT_LIMITS).
DEFAULT_CONCURRENCY = 1024


@dataclass(frozen=True)
class Adaptive:
    """Settings of the adaptive concurrency controller (decision 0131).

    It starts at ``initial`` calls in flight and, until the server first pushes back,
    adds one per success (slow start: the limit doubles every round trip, RFC 5681).
    On a 429/529 the limit drops to ``decrease`` x the calls still in flight (the calls
    the server accepted: its capacity, measured), and that level is remembered. Below
    it the limit climbs back in slow start; above it, by ``probe`` of itself per second
    while the limit is in use, so a server at capacity sees a 429 every few tens of
    seconds, not every round trip.

    Args:
        initial: the in-flight limit to start from; None starts with no limit, and the
            controller takes over at the first 429/529 (the handles' default).
        min: the lowest in-flight limit.
        max: the highest in-flight limit.
        probe: growth above the remembered level, as a share of the limit per second.
        decrease: the factor applied on an overload signal (0 < decrease < 1).
    """

    initial: int | None = 8
    min: int = 1
    max: int = 1000
    probe: float = 0.005
    decrease: float = 0.9

    def __post_init__(self) -> None:
        initial = self.max if self.initial is None else self.initial
        if not 1 <= self.min <= initial <= self.max:
            raise ConfigError(
                f"adaptive limits need 1 <= min <= initial <= max, got min={self.min}, "
                f"initial={self.initial}, max={self.max}"
            )
        if not 0 < self.decrease < 1:
            raise ConfigError(f"decrease must be in (0, 1), got {self.decrease}")
        if not 0 < self.probe <= 1:
            raise ConfigError(f"probe must be in (0, 1] (a share per second), got {self.probe}")

    def __repr__(self) -> str:
        return (
            f"fanflow.limits.Adaptive(initial={self.initial}, min={self.min}, max={self.max}, "
            f"probe={self.probe:g}, decrease={self.decrease:g})"
        )


@dataclass(frozen=True)
class Pacing:
    """Settings of the delay-based throttle: sends are spaced by a delay that is
    multiplied by ``backoff`` on a 429/529 and by ``recover`` after each success, within
    ``[min, max]`` seconds (the throttler often written by hand around an LLM client).

    Args:
        initial: the delay between sends to start from, in seconds.
        min: the smallest delay (> 0, so a backoff can grow it again).
        max: the largest delay.
        backoff: the factor on an overload signal (> 1).
        recover: the factor after a success (0 < recover < 1).
    """

    initial: float = 0.1
    min: float = 0.01
    max: float = 10.0
    backoff: float = 2.0
    recover: float = 0.9

    def __post_init__(self) -> None:
        if not 0 < self.min <= self.initial <= self.max:
            raise ConfigError(
                f"pacing needs 0 < min <= initial <= max seconds, got min={self.min}, "
                f"initial={self.initial}, max={self.max}"
            )
        if not self.backoff > 1:
            raise ConfigError(f"backoff must be > 1, got {self.backoff}")
        if not 0 < self.recover < 1:
            raise ConfigError(f"recover must be in (0, 1), got {self.recover}")


@dataclass(frozen=True)
class Limits:
    """Limits of one LLM handle, shared by every pattern that uses it.

    Args:
        concurrency: the most calls in flight at once; None for no limit.
        rpm: requests per minute (per ``period``); None for no limit.
        tpm: tokens (input + output) per minute; None for no limit.
        input_tpm: input tokens per minute, for APIs that count them apart.
        output_tpm: output tokens per minute, for APIs that count them apart.
        burst: seconds of budget that may be sent at once (default 0.5: a 6,000 RPM
            limit sends at most 50 requests together, then paces evenly). 0 spaces every
            send evenly. At most ``period``.
        margin: the share of each rate limit left unused (default 0.03: pace at 97%),
            so that the server's own limiter of the same size never runs dry under
            arrival jitter (decision 0130). A 429 widens it by 0.02, up to 0.2.
        period: the window of the rate limits in seconds (60: per minute).
        refund: after a reply, give back the reserved tokens it did not use (True).
            Use False for a server that charges ``max_tokens`` when the request arrives
            and never gives it back; overruns are charged either way.
        controller: settings of the adaptive concurrency controller (made by
            :meth:`Limits.adaptive`); None for a fixed concurrency.
        pacing: settings of the delay-based throttle (made by :meth:`Limits.paced`);
            None for none.
        shared: a store that every process naming it shares these limits through
            (``sqlite:///relative.db``, ``sqlite:////absolute.db`` or a plain path on one machine; ``redis://host:port/db``,
            ``rediss://``, ``unix://`` across machines; ``?ttl=`` seconds for a dead
            process's concurrency slots to come back, 10 by default). None: this
            process's own. See :mod:`fanflow._shared`.
    """

    concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    input_tpm: float | None = None
    output_tpm: float | None = None
    burst: float = 0.5
    period: float = 60.0
    refund: bool = True
    controller: Adaptive | None = None
    margin: float = 0.03
    pacing: Pacing | None = None
    shared: str | None = None

    def __post_init__(self) -> None:
        if self.shared is not None:
            from ._shared._url import parse_url

            parse_url(self.shared)  # an unknown form: a ConfigError naming those allowed
        check_concurrency(self.concurrency)
        for name in ("rpm", "tpm", "input_tpm", "output_tpm"):
            _positive(name, getattr(self, name))
        if not self.burst >= 0:
            raise ConfigError(f"burst must be >= 0 seconds, got {self.burst}")
        if not self.period > 0:
            raise ConfigError(f"period must be > 0 seconds, got {self.period}")
        if self.burst > self.period:
            raise ConfigError(
                f"burst={self.burst:g} s is more than the period ({self.period:g} s): "
                f"it would send more than a whole period's limit at once; use at most "
                f"burst={self.period:g}"
            )
        if not 0 <= self.margin < 0.5:
            raise ConfigError(
                f"margin must be in [0, 0.5) (a share of the rate left unused), got {self.margin}"
            )
        if self.concurrency is not None and self.controller is not None:
            raise ConfigError(
                "concurrency= and an adaptive controller contradict each other; use "
                "Limits.adaptive(max=...) to cap what the controller may reach"
            )

    @classmethod
    def adaptive(
        cls,
        *,
        initial: int | None = 8,
        min: int = 1,
        max: int = 1000,
        probe: float = 0.005,
        decrease: float = 0.9,
        rpm: float | None = None,
        tpm: float | None = None,
        input_tpm: float | None = None,
        output_tpm: float | None = None,
    ) -> Limits:
        """Limits for a server whose capacity is unknown: the in-flight limit starts at
        ``initial`` and finds the server's capacity by itself (see :class:`Adaptive`).
        Known rate limits may still be given and are enforced as usual."""
        return cls(
            rpm=rpm,
            tpm=tpm,
            input_tpm=input_tpm,
            output_tpm=output_tpm,
            controller=Adaptive(initial, min, max, probe, decrease),
        )

    @classmethod
    def paced(
        cls,
        *,
        initial: float = 0.1,
        min: float = 0.01,
        max: float = 10.0,
        backoff: float = 2.0,
        recover: float = 0.9,
        concurrency: int | None = None,
    ) -> Limits:
        """Limits that space sends by a delay: times ``backoff`` on a 429/529, times
        ``recover`` after each success, within ``[min, max]`` (see :class:`Pacing`)."""
        return cls(concurrency=concurrency, pacing=Pacing(initial, min, max, backoff, recover))

    def __repr__(self) -> str:
        parts = [f"concurrency={self.concurrency}"]
        for name in ("rpm", "tpm", "input_tpm", "output_tpm"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value:g}")
        if self.burst != 0.5:
            parts.append(f"burst={self.burst:g}")
        if self.margin != 0.03:
            parts.append(f"margin={self.margin:g}")
        if self.period != 60.0:
            parts.append(f"period={self.period:g}")
        if self.controller is not None:
            parts.append(f"controller={self.controller!r}")
        if self.pacing is not None:
            parts.append(f"pacing={self.pacing!r}")
        if self.shared is not None:
            from ._shared._url import redact

            parts.append(f"shared={redact(self.shared)!r}")
        return f"fanflow.Limits({', '.join(parts)})"

    @property
    def rated(self) -> bool:
        """Whether any rate limit (rpm, tpm, input_tpm, output_tpm) is set."""
        return (
            self.rpm is not None
            or self.tpm is not None
            or self.input_tpm is not None
            or self.output_tpm is not None
        )


# A handle's limits when none are given: no limit until the server first answers 429 or
# 529, then the adaptive controller holds the in-flight limit under the level where it
# pushed back (decision 0131). Rate limits are never guessed: give rpm=/tpm= to pace.
DEFAULT_LIMITS = Limits(controller=Adaptive(initial=None, max=DEFAULT_CONCURRENCY))


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


class Permit:
    """What one admitted attempt holds: its reservations in the lane's rate buckets and,
    while the lane ramps up after a pause, a slot of the ramp's gate."""

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


# Sends due within this many seconds go now: timers may fire a hair early, and a
# virtual clock (looptime) steps in microseconds, so a shorter sleep would not advance
# it and the wait would spin.
_EPSILON = 1e-6

# Which part of a request a token bucket counts.
_TOTAL, _INPUT, _OUTPUT, _REQUESTS = 0, 1, 2, 3

# A 429 in a lane with rate limits widens their margin by this much, up to the most.
_MARGIN_STEP = 0.02
_MAX_MARGIN = 0.2

# The longest a 429's Retry-After pauses a whole lane (a server asking for an hour gets
# this; the calls' own waits are bounded by their retry policy and deadline).
MAX_PAUSE = 60.0

# Rate-limit headers: below this share of the limit remaining, sends are spread evenly
# over the time left until the reset instead of going at full speed.
_LOW_REMAINING = 0.1


def _cost(kind: int, input: int, output: int) -> int:
    if kind == _TOTAL:
        return input + output
    if kind == _INPUT:
        return input
    if kind == _OUTPUT:
        return output
    return 1


class Admission(Protocol):
    """Where a lane books its calls' rate limits, when not in its own buckets.

    A :class:`Lane` given none books ``rpm``/``tpm``/... in its own rate buckets (this
    process's view of the limit). The Ray backend gives its workers' lanes one that
    books at the cluster-wide broker instead (``backends/_limiter.py``). Either way the
    lane keeps its concurrency gate, its pauses after a 429 and its header pacing.
    """

    async def book(self, lane: Lane, tokens: tuple[int, int]) -> Permit:
        """Wait until a call of ``tokens`` (input, output) may be sent, and reserve it.
        ``lane.wait_unpaused()`` and ``lane.paused_until`` say when the lane itself
        holds sends; ``lane.costs(...)`` is the call's cost in each rate limit."""
        ...

    def settle(self, lane: Lane, permit: Permit, usage: Any | None) -> None:
        """A booked call ended: correct its booking to ``usage`` (the reply's reported
        usage), or keep it (None: failed, timed out, or cancelled after sending)."""
        ...


@dataclass(frozen=True, slots=True)
class LaneStatistics:
    """A snapshot of a handle's admission state.

    Attributes:
        concurrency: the gate (in flight, waiting, limit).
        paused_until: event-loop time until which sends were last held (None: never).
        pauses: 429/529 answers with a Retry-After that paused the lane.
        rate_limited: 429/529 answers seen.
        adaptive_limit: the adaptive controller's in-flight limit (None: not adaptive,
            or not yet woken by a 429/529).
        margin: the share of the rate limits left unused now (learned from 429s).
        hedges: duplicate attempts started by the hedging policy.
        delay: the delay-based throttle's delay between sends (None: not paced).
    """

    concurrency: GateStatistics
    paused_until: float | None = None
    pauses: int = 0
    rate_limited: int = 0
    adaptive_limit: float | None = None
    margin: float = 0.0
    hedges: int = 0
    delay: float | None = None


class Lane:
    """The live limiter of one handle on one event loop.

    Args:
        limits: the handle's limits.
        admission: where rate limits are booked (None: in this lane's own buckets).
    """

    __slots__ = (
        "_admission",
        "_buckets",
        "_clock",
        "_credit",
        "_credit_at",
        "_credit_cap",
        "_credit_from",
        "_credit_mono",
        "_credit_rate",
        "_delay",
        "_floor",
        "_grown_at",
        "_hint_interval",
        "_hint_next",
        "_hint_until",
        "_last_cost",
        "_last_cut",
        "_level",
        "_older",
        "_pace_next",
        "_pause_until",
        "_pauses",
        "_ramp",
        "_ramp_goal",
        "_rate_limited",
        "_sent",
        "_simple",
        "_tokens",
        "_tokens_in_flight",
        "_turn",
        "_wake",
        "answered_before",
        "controller",
        "gate",
        "hedger",
        "limits",
        "metered",
        "needs_tokens",
        "pacing",
        "refused_at",
        "successes",
    )

    def __init__(self, limits: Limits, admission: Admission | None = None) -> None:
        self.limits = limits
        self._admission = admission
        self.controller = limits.controller
        self._level: float | None = None
        concurrency = limits.concurrency
        if self.controller is not None and self.controller.initial is not None:
            self._level = float(self.controller.initial)
            concurrency = self.controller.initial
        # The level at which the server last pushed back (times ``decrease``): slow
        # start below it, a slow probe above it.
        self._floor = math.inf
        self._grown_at = 0.0
        self.successes = 0  # attempts that succeeded (the engine's requeue rule reads it)
        # Whether this handle's lane on an earlier loop had a success (Lane.inherit).
        self.answered_before = False
        # The engine's requeue rule (decision 0165): when the first 429/529 since the
        # last success came back (inf: none since), and how many of the calls in
        # flight then are still in flight (a refusal comes back in one round trip: a
        # call outliving it was accepted).
        self.refused_at = math.inf
        self._older = 0
        self.hedger = Hedger()
        self.gate = Gate(concurrency)
        buckets: list[tuple[RateBucket, int]] = []
        for name, kind in (
            ("rpm", _REQUESTS),
            ("tpm", _TOTAL),
            ("input_tpm", _INPUT),
            ("output_tpm", _OUTPUT),
        ):
            limit = getattr(limits, name)
            if limit is not None:
                bucket = RateBucket(name, limit, limits.period, limits.burst, limits.margin)
                buckets.append((bucket, kind))
        self._buckets = buckets
        self.metered = bool(buckets)
        self.needs_tokens = any(kind != _REQUESTS for _, kind in buckets)
        self._pause_until = 0.0
        self._pauses = 0
        self._rate_limited = 0
        # After a pause: a gate over the calls sent since, widened by one per success
        # until it reaches ``_ramp_goal``; calls already in flight do not count.
        self._ramp: Gate | None = None
        self._ramp_goal = 1
        self._last_cut = -math.inf
        self._hint_until = -math.inf
        self._hint_next = -math.inf
        self._hint_interval = 0.0
        # Requests the server's rate-limit headers say may still go (decision 0159): the
        # credit when last observed, at ``_credit_at``, refilling at ``_credit_rate`` up
        # to ``_credit_cap``.
        self._credit = math.inf
        self._credit_at = 0.0
        self._credit_rate = 0.0
        self._credit_cap = math.inf
        self._credit_from = -math.inf  # when the attempt that set the credit was sent
        self._credit_mono = 0.0  # time.monotonic() at _credit_at: loop clocks differ
        try:  # this loop's clock against time.monotonic(), to carry times across loops
            self._clock = asyncio.get_running_loop().time() - time.monotonic()
        except RuntimeError:
            self._clock = 0.0
        # Tokens the headers say are left, for the ``tpm`` bucket (decision 0218).
        self._tokens = Credit()
        self._tokens_in_flight = 0
        self._last_cost = 0
        # The delay-based throttle (Limits.paced): the delay now, the next send time.
        self.pacing = limits.pacing
        self._delay = self.pacing.initial if self.pacing is not None else 0.0
        self._pace_next = -math.inf
        # Cleared for good once the server steers us.
        self._simple = not self.metered and self.pacing is None
        self._turn = asyncio.Lock()  # FIFO turns under the rate buckets
        self._sent = 0  # calls admitted and not yet finished (waiting ones excluded)
        self._wake: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"fanflow.Lane({self.limits!r})"

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet finished."""
        return self._sent

    def try_acquire(self) -> bool:
        """Admit one more call now if nothing is metered or steered and a slot is free.

        The fast path of the engine: a handle with no rate limits does no bucket work.
        """
        if self._simple and self.gate.try_acquire():
            self._sent += 1
            return True
        return False

    # -- admission ----------------------------------------------------------------

    def check(self, input: int, output: int, who: str) -> None:
        """Raise at once if a request of this size can never be admitted.

        Raises:
            RequestTooLarge: it needs more tokens than a bucket allows per period.
        """
        for bucket, kind in self._buckets:
            cost = _cost(kind, input, output)
            if not bucket.fits(cost):
                raise RequestTooLarge(
                    f"{who} needs an estimated {cost:,} tokens ({input:,} in, "
                    f"{output:,} out) but {bucket.name}={bucket.limit:,g} allows at most "
                    f"{bucket.limit:,g} per {self.limits.period:g} s, so it can never be "
                    f"sent; raise {bucket.name}=, lower max_tokens= or shorten the prompt"
                )

    async def acquire(self, tokens: tuple[int, int] | None = None) -> Permit | None:
        """Wait until one more call may be sent; reserve its cost in the rate buckets.

        Args:
            tokens: the estimated (input, output) tokens, when the lane counts tokens.

        Returns:
            The reservation to pass to :meth:`finish` (None when nothing is metered).
        """
        await self.gate.acquire()
        ramp = self._ramp
        try:
            if ramp is not None:
                await ramp.acquire()
            try:
                if self.metered:
                    permit = await self._book(tokens or (0, 0))
                    permit.ramp = ramp
                    self._sent += 1
                    return permit
                if (
                    self._pause_until
                    or self._hint_interval
                    or self._credit_rate
                    or self.pacing is not None
                ):
                    now = asyncio.get_running_loop().time()
                    t = self._steer_time(now)
                    # Most calls have nothing to wait for: no coroutine for them.
                    if max(t, self._pause_until) - now > _EPSILON or not self._try_credit(now):
                        await self._wait_steer(t)
            except BaseException:
                if ramp is not None:
                    ramp.release()
                raise
        except BaseException:
            self.gate.release()
            raise
        self._sent += 1
        return None if ramp is None else Permit(0, 0, [], ramp)

    def ready_at(self, now: float, tokens: tuple[int, int] = (0, 0)) -> float:
        """When one more call of ``tokens`` could be sent by the pause, the headers'
        spacing and the rate buckets (calls already queued for them not counted): a
        router (fanflow/_router.py) reads it to send where there is room now."""
        t = max(now, self._pause_until)
        if now < self._hint_until:
            t = max(t, self._hint_next)
        for bucket, kind in self._buckets:
            t = bucket.send_time(t, _cost(kind, *tokens))
        return t

    @property
    def paused_until(self) -> float:
        """Event-loop time before which this lane sends nothing (0.0: never paused)."""
        return self._pause_until

    def costs(self, input: int, output: int) -> list[int]:
        """A call's cost in each rate limit that is set, in the order rpm, tpm,
        input_tpm, output_tpm."""
        return [_cost(kind, input, output) for _, kind in self._buckets]

    async def wait_unpaused(self) -> None:
        """Wait out a pause (a 429's Retry-After) and the pacing of rate-limit headers."""
        await self._wait_steer()

    async def _book(self, tokens: tuple[int, int]) -> Permit:
        if self._admission is None:
            return await self._schedule(tokens)
        permit = await self._admission.book(self, tokens)
        self._tokens_in_flight += permit.input + permit.output
        self._last_cost = permit.input + permit.output
        return permit

    def _steer_time(self, now: float) -> float:
        """When a call may go by the pause, the headers' spacing and the pacing (its
        place in the spacing is taken now)."""
        t = self._pause_until
        if now < self._hint_until:
            t = max(t, self._hint_next)
            self._hint_next = max(t, now) + self._hint_interval
        if self.pacing is not None:
            t = max(t, self._pace_next)
            self._pace_next = max(t, now) + self._delay
        return t

    def _try_credit(self, now: float) -> bool:
        """Take one request of the headers' credit now, if there is one and no call is
        queued for it (True also when there is no credit to keep)."""
        rate = self._credit_rate
        if not rate:
            return True
        if self._turn.locked():
            return False
        credit = self._credit_now(now)
        if (1.0 - credit) / rate > _EPSILON:
            return False
        self._credit = credit - 1.0
        self._credit_at = now
        return True

    async def _wait_steer(self, t: float | None = None) -> None:
        """Wait out a pause and the pacing asked for by rate-limit headers (``t``: when
        :meth:`_steer_time` said this call may go), then take one request of the
        headers' credit."""
        loop = asyncio.get_running_loop()
        if t is None:
            t = self._steer_time(loop.time())
        # The pause may be extended while we sleep, so look again after each sleep.
        while (delay := max(t, self._pause_until) - loop.time()) > _EPSILON:  # noqa: ASYNC110
            await asyncio.sleep(delay)
        if self._credit_rate:
            await self._take_credit()

    async def _take_credit(self) -> None:
        """Take one request of the credit the server's headers give (decision 0159).

        Calls take turns in FIFO order; only the head waits, for the refill to make up
        one request. A new reading of the headers wakes it to look again, so a refill
        rate misread from one reply (a reset rounded to the second) costs one wait at
        most, never a queue of sends promised far ahead.
        """
        loop = asyncio.get_running_loop()
        async with self._turn:
            while True:
                now = loop.time()
                rate = self._credit_rate
                credit = self._credit_now(now)
                wait = (1.0 - credit) / rate if rate else 0.0
                if wait <= _EPSILON:
                    self._credit = credit - 1.0
                    self._credit_at = now
                    return
                await self._sleep_or_wake(wait)

    def _credit_now(self, now: float) -> float:
        """The headers' credit at ``now``: as last set, plus the refill since, at most
        the limit."""
        return min(self._credit_cap, self._credit + self._credit_rate * (now - self._credit_at))

    async def _sleep_or_wake(self, timeout: float) -> None:
        """Sleep ``timeout`` seconds, or less if woken (``_wake``: a settlement gave
        tokens back, or new headers changed the credit): the head of a queue then
        looks again."""
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = wake
        try:
            await asyncio.wait((wake,), timeout=timeout)
        finally:
            self._wake = None
            if not wake.done():
                wake.cancel()

    async def _schedule(self, tokens: tuple[int, int]) -> Permit:
        """Wait for this call's turn under the rate buckets, then reserve its cost.

        Calls take turns in FIFO order (one lock); only the head of the queue sleeps,
        until the time the buckets allow. A settlement that gives tokens back, or a
        pause, changes that time, so the head wakes on every settlement and looks again
        rather than sleeping to a time computed from stale reservations.
        """
        loop = asyncio.get_running_loop()
        input, output = tokens
        costs = [(bucket, _cost(kind, input, output), kind) for bucket, kind in self._buckets]
        async with self._turn:
            while True:
                now = loop.time()
                t = max(now, self._pause_until)
                if now < self._hint_until and self._hint_next > t:
                    t = self._hint_next
                if self._pace_next > t:
                    t = self._pace_next
                for bucket, cost, kind in costs:
                    if kind == _REQUESTS and self._credit_rate:
                        t = self._credit_time(bucket, t, now)
                    elif kind == _TOTAL and self._tokens.live:
                        t = max(t, now + self._tokens.wait(now, cost))
                        t = bucket.window_time(t, cost)
                    else:
                        t = bucket.send_time(t, cost)
                if t - now <= _EPSILON:
                    break
                await self._sleep_or_wake(t - now)
            slots = [(bucket, bucket.reserve(now, cost), kind) for bucket, cost, kind in costs]
            if self._credit_rate and any(kind == _REQUESTS for _, kind in self._buckets):
                self._credit = self._credit_now(now) - 1.0
                self._credit_at = now
            if self._tokens.live:
                self._tokens.take(now, input + output)
            if now < self._hint_until:
                self._hint_next = now + self._hint_interval
            if self.pacing is not None:
                self._pace_next = now + self._delay
        self._tokens_in_flight += input + output
        self._last_cost = input + output
        return Permit(input, output, slots)

    def _credit_time(self, bucket: RateBucket, t: float, now: float) -> float:
        """When a request may go by the server's headers (decision 0176): as soon as
        their credit has one request, and the limit given allows it in its window.
        The bucket's margin and burst are for a limiter it cannot see; this one says
        what is left."""
        wait = (1.0 - self._credit_now(now)) / self._credit_rate
        return bucket.window_time(max(t, now + wait), 1)

    def release(self) -> None:
        """A call admitted by :meth:`acquire` has ended (no outcome to learn from)."""
        self._sent -= 1
        self.gate.release()

    def finish(
        self,
        permit: Permit | None,
        start: float,
        response: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """An attempt admitted by :meth:`acquire` has ended: settle its reservation
        against the reported usage and learn from the outcome.

        Args:
            permit: what :meth:`acquire` returned.
            start: when the attempt was sent.
            response: the :class:`fanflow.Response`, on success.
            error: the attempt's error, on failure (None for a cancellation).
        """
        if permit is not None:
            self._tokens_in_flight -= permit.input + permit.output
            if self._admission is not None:
                self._admission.settle(self, permit, None if response is None else response.usage)
            elif response is not None:
                self._settle(permit, response.usage)
            ramp = permit.ramp
            if ramp is not None:
                if response is not None and ramp is self._ramp:
                    self._widen(ramp)
                ramp.release()
        if response is not None:
            self.successes += 1
            self.refused_at = math.inf
            self._older = 0
            now = asyncio.get_running_loop().time()
            self.hedger.observe(now - start)
            if self._level is not None:
                self._grow(now)
            if self.pacing is not None:
                self._delay = max(self.pacing.min, self._delay * self.pacing.recover)
            state = getattr(response, "rate_limit", None)
            if state is not None:
                self._observe(state, start)
        else:
            if self._older and start <= self.refused_at:
                self._older -= 1  # one of the calls in flight at the first refusal ended
            if error is not None and isinstance(error, RateLimited | Overloaded):
                self._overloaded(error, start)
        self._sent -= 1
        self.gate.release()

    @property
    def accepted_in_flight(self) -> bool:
        """Whether a call in flight when the server first refused (with no success
        since) is still in flight: it outlived a refusal's round trip, so the server
        took it (decision 0165)."""
        return self._older > 0

    @property
    def answered(self) -> bool:
        """Whether any call of this handle has succeeded (on this loop or an earlier one)."""
        return self.successes > 0 or self.answered_before

    def _settle(self, permit: Permit, usage: Any) -> None:
        input, output = usage.input_tokens, usage.output_tokens
        if input + output <= 0:
            return  # the provider reported no usage: keep the estimate
        refund = self.limits.refund
        for bucket, slot, kind in permit.slots:
            if kind != _REQUESTS:
                cost = _cost(kind, input, output)
                if refund or cost > slot.cost:
                    if kind == _TOTAL and self._tokens.live:
                        self._tokens.give(slot.cost - cost)
                    bucket.settle(slot, cost)
        self._wake_head()  # tokens came back: the head of the queue may go sooner

    # -- reactions ------------------------------------------------------------------

    def _limit(self) -> int | None:
        if self._level is not None:
            return math.ceil(self._level - 1e-9)
        return self.limits.concurrency

    def _widen(self, ramp: Gate) -> None:
        """One more call after each success: the ramp doubles every round trip."""
        limit = (ramp.limit or 0) + 1
        if limit >= self._ramp_goal:
            self._ramp = None
            ramp.set_limit(None)  # the ramp is over: everyone waiting may go
        else:
            ramp.set_limit(limit)

    def _grow(self, now: float) -> None:
        """A success: widen the adaptive limit while it is in use (decision 0131)."""
        c = self.controller
        level = self._level
        assert c is not None
        assert level is not None
        limit = self._limit()
        if limit is not None and self._sent < limit and not self.gate._waiters:
            self._grown_at = now  # the limit is not what holds us back: do not grow it
            return
        if level < self._floor:
            level += 1.0  # slow start: one more per success, double per round trip
        else:
            level += level * c.probe * max(0.0, now - self._grown_at)
        self._grown_at = now
        self._level = min(float(c.max), level)
        if self._limit() != limit:
            self.gate.set_limit(self._limit())

    def _overloaded(self, error: RateLimited | Overloaded, start: float) -> None:
        now = asyncio.get_running_loop().time()
        self._rate_limited += 1
        if self.refused_at == math.inf:  # the first refusal since the last success
            self.refused_at = now
            self._older = self._sent - 1
        if self.pacing is not None:
            self._delay = min(self.pacing.max, self._delay * self.pacing.backoff)
        c = self.controller
        if c is not None:
            # The calls still in flight are the ones the server accepted (a rejection
            # comes back at once): that is its capacity, measured. A burst of 429s
            # lowers the level as its rejections return, never below that.
            others = self._sent - 1
            level = math.inf if self._level is None else self._level
            level = max(float(c.min), min(level, c.decrease * others))
            self._level = self._floor = level
            self._grown_at = now
            self._simple = False
            self.gate.set_limit(self._limit())
        if isinstance(error, RateLimited) and self.metered and start >= self._last_cut:
            # Our model of the server's rate limit was too generous: pace further under
            # it (once per round of 429s: attempts sent before the last widening saw the
            # old rate).
            self._last_cut = now
            for bucket, _ in self._buckets:
                bucket.widen_margin(min(_MAX_MARGIN, bucket.margin + _MARGIN_STEP))
        state = getattr(error, "rate_limit", None)
        if state is not None:
            self._observe(state, start)
        if c is None and error.retry_after is not None and error.retry_after > 0:
            log_pause(error.retry_after, error)
            self.pause(now + min(error.retry_after, MAX_PAUSE))

    def pause(self, until: float) -> None:
        """Send nothing before ``until`` (a 429's Retry-After), then resume at half the
        limit (or, with no limit, half of what was in flight at the 429) and add one
        call per success up to the whole (TCP fast recovery, RFC 5681, rather than slow
        start from one call: the server asked for a pause, not for a fresh start).
        Calls sent before the pause do not count. (The adaptive controller does not
        pause the lane: it lowers its limit instead.)"""
        if until > self._pause_until:
            self._pause_until = until
        self._simple = False
        self._pauses += 1
        if self.controller is not None:
            return
        goal = self._limit()
        self._ramp_goal = max(self._sent, 2) if goal is None else goal
        start = max(1, self._ramp_goal // 2)
        if self._ramp is None:
            self._ramp = Gate(start)
        else:
            self._ramp.set_limit(start)

    def _hold(self, until: float) -> None:
        """Send nothing before ``until`` (a rate-limit reset), without a ramp."""
        self._simple = False
        if until > self._pause_until:
            self._pause_until = until

    def _observe(self, state: RateLimitState, start: float) -> None:
        """Steer by the server's rate-limit headers (a ``RateLimitState``) of a reply to
        an attempt sent at ``start``.

        The hosted APIs' buckets refill continuously and ``reset`` is the time until the
        bucket is full again, so with the limit known the refill rate is
        ``(limit - remaining) / reset``. ``remaining`` was counted when the request
        arrived; since then the calls sent after it have taken their share and the
        bucket has refilled for as long. When too little is left for the next call,
        hold sends until enough has refilled (at most ``reset``); when less than 10%
        remains, space sends at the refill rate less the margin.
        """
        now = asyncio.get_running_loop().time()
        in_flight = self._sent - 1  # the others sent: the server may not count them yet
        elapsed = max(0.0, now - start)
        pairs = (
            (
                "requests",
                1,
                in_flight,
                state.requests_remaining,
                state.requests_reset,
                state.requests_limit,
            ),
            (
                "tokens",
                max(self._last_cost, 1),
                self._tokens_in_flight,
                state.tokens_remaining,
                state.tokens_reset,
                state.tokens_limit,
            ),
        )
        for what, cost, pending, remaining, reset, limit in pairs:
            if remaining is None or reset is None or reset <= 0:
                continue
            # ``remaining`` is whole units, rounded down (the bucket may hold up to one
            # more than it says), so count one more as used (at most 1% of the limit):
            # a credit paced by the refill rate then does not run ahead of the server.
            used = limit - remaining - min(1.0, limit / 100) if limit else 0.0
            rate = used / reset if used > 0 else None
            # The refill since, capped at the bucket's size, then what the calls sent
            # since took (they came in while it refilled: capping after taking them
            # would count refill the full bucket could not hold).
            left = float(remaining)
            if rate is not None and limit:
                left = min(float(limit), left + rate * elapsed)
            left -= pending
            if what == "requests":
                self._steer_by_credit(left, rate, limit, now, start)
            elif self._steer_tokens(left, rate, limit, now, start):
                continue  # the token credit holds and spaces them (decision 0218)
            if left < cost:
                wait = reset if rate is None else min(reset, (cost - left) / rate)
                self._hold(now + wait)
                continue
            if what == "requests" and self._credit_rate:
                continue  # the credit spaces them at the refill rate (decision 0176)
            if limit and remaining < _LOW_REMAINING * limit:
                self._simple = False
                if rate:
                    interval = cost / (rate * (1.0 - self.limits.margin))
                else:
                    interval = reset * cost / left
                if now >= self._hint_until or interval > self._hint_interval:
                    self._hint_interval = interval
                self._hint_until = now + reset
                self._hint_next = max(self._hint_next, now)

    def _steer_by_credit(
        self, left: float, rate: float | None, limit: int | None, now: float, start: float
    ) -> None:
        """Requests left at the server (``left``: its ``remaining`` plus the refill
        since, less the calls sent since) become the credit the next sends take from
        (:meth:`_take_credit`, and the rate buckets' turn: :meth:`_credit_time`). It
        refills at the server's rate, as the hold on an empty bucket does (decisions
        0159 and 0176: no margin; the server says what is left). So a wave of calls
        larger than what is left (a first wave, or items arriving all at once) goes
        as far as the credit reaches and then at the refill rate, instead of drawing a
        429 each."""
        if rate:
            self._credit_rate = rate
        if not self._credit_rate:
            return  # no refill rate known yet: the hold on an empty bucket only
        if start < self._credit_from:
            return  # an older reading: the calls sent after it but already done are
            # in neither its ``remaining`` nor ``pending`` (the credit knows better)
        if start == self._credit_from:  # sent together: the lowest reading is the latest
            left = min(left, self._credit_now(now))
        self._credit = left
        self._credit_at = now
        self._credit_mono = time.monotonic()
        self._credit_from = start
        if limit:
            self._credit_cap = float(limit)
        self._simple = False
        self._wake_head()

    def _wake_head(self) -> None:
        """Wake the head of the queue (asleep in :meth:`_sleep_or_wake`) to look again:
        tokens came back, or new headers changed a credit."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _steer_tokens(
        self, left: float, rate: float | None, limit: int | None, now: float, start: float
    ) -> bool:
        """Tokens left at the server become the credit the ``tpm`` bucket's turn takes
        from, as :meth:`_steer_by_credit` does for requests (decision 0218). Returns
        whether the credit is live (then it, not a hold, waits for the refill)."""
        if self._admission is not None or not any(k == _TOTAL for _, k in self._buckets):
            return False  # no tpm bucket of this lane's own to give way to
        if self._tokens.observe(left, rate, limit, now, start):
            self._simple = False
            self._wake_head()
        return self._tokens.live

    def inherit(self, other: Lane) -> None:
        """Start from what ``other`` (this handle's lane on an earlier event loop) learnt
        of the server: the adaptive level, the rate buckets' reservations and margins,
        and the headers' credit, refilled for the time since. Each ``fanflow.run`` has
        a loop of its own, so without this every run's first wave would overshoot
        again (decision 0159: 114 of 120 refused in a second run against a 50/s
        bucket)."""
        if other._level is not None and self.controller is not None:
            self._level, self._floor = other._level, other._floor
            # The probe above the floor grows with the time since this moment (on
            # this loop's clock: the other loop's times mean nothing here).
            self._grown_at = asyncio.get_running_loop().time()
            self._simple = False
            self.gate.set_limit(self._limit())
        if self.limits == other.limits:  # the same buckets: carry their reservations
            shift = self._clock - other._clock
            for (bucket, _), (old, _) in zip(self._buckets, other._buckets, strict=True):
                bucket.carry_from(old, shift)
        self.answered_before = other.answered
        rate = other._credit_rate
        if rate:
            since = max(0.0, time.monotonic() - other._credit_mono)
            self._credit_rate = rate
            self._credit_cap = other._credit_cap
            self._credit = min(other._credit_cap, other._credit + rate * since)
            self._credit_at = asyncio.get_running_loop().time()
            self._credit_mono = time.monotonic()
            self._simple = False

    def statistics(self) -> LaneStatistics:
        pause = self._pause_until
        return LaneStatistics(
            concurrency=self.gate.statistics(),
            paused_until=pause if pause else None,
            pauses=self._pauses,
            rate_limited=self._rate_limited,
            adaptive_limit=self._level,
            margin=max((b.margin for b, _ in self._buckets), default=0.0),
            hedges=self.hedger.hedges,
            delay=self._delay if self.pacing is not None else None,
        )
