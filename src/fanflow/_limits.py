"""Admission: how many calls a handle may have in flight, and how fast they may go.

A :class:`Limits` is configuration (frozen); a :class:`Lane` is the live state that
enforces it for one handle on one event loop. Every pattern using a handle shares its
lane, so two maps running at once stay within one limit together.

A lane is a stack of small meters (:mod:`fanflow._meters`), the ones its limits
describe: the concurrency gate, the pause after a 429 and its ramp, the lane's own rate
buckets (or the :class:`Admission` that books them elsewhere), the rate-limit headers'
steering (:mod:`fanflow._steer`), the adaptive controller and the delay-based pacing.
Handles with no rate limits take the engine's fast path (:meth:`Lane.try_acquire`):
a free slot of the gate, nothing else, until the server first asks them to slow down.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._checks import check_concurrency
from ._exceptions import ConfigError, Overloaded, RateLimited
from ._gate import Gate, GateStatistics
from ._hedge import Hedger
from ._meters import (
    MAX_PAUSE,
    REQUESTS,
    TOTAL,
    AdaptiveMeter,
    GateMeter,
    Meter,
    Outcome,
    PaceMeter,
    PauseMeter,
    Permit,
    RateMeter,
    Turn,
)
from ._steer import HeaderMeter, SteerMeter

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_LIMITS",
    "MAX_PAUSE",
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


class _Booked:
    """The meter of an :class:`Admission`: a lane's rate limits booked elsewhere."""

    __slots__ = ("admission", "lane")

    def __init__(self, admission: Admission, lane: Lane) -> None:
        self.admission, self.lane = admission, lane

    def acquire_nowait(self, permit: Permit) -> Permit | None:
        return None  # booking elsewhere takes a round trip

    async def acquire(self, permit: Permit) -> Permit:
        booked = await self.admission.book(self.lane, (permit.input, permit.output))
        booked.ramp = permit.ramp  # the pause meter's slot, taken before
        return booked

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        if permit is not None and outcome is not None:
            response = outcome.response
            self.admission.settle(self.lane, permit, None if response is None else response.usage)


class Lane:
    """The live limiter of one handle on one event loop: the stack of meters its
    limits describe, and what the engine reads of the handle's recent calls.

    Args:
        limits: the handle's limits.
        admission: where rate limits are booked (None: in this lane's own buckets).
        gate: makes the concurrency gate from its first limit (None: a :class:`Gate`).
    """

    __slots__ = (
        "_acquire",
        "_clock",
        "_learn",
        "_older",
        "_rate_limited",
        "_release",
        "_sent",
        "adaptive",
        "answered_before",
        "controller",
        "gate",
        "headers",
        "hedger",
        "limits",
        "metered",
        "needs_tokens",
        "pace",
        "pacing",
        "pauses",
        "rates",
        "refused_at",
        "steer",
        "successes",
        "turn",
    )

    def __init__(
        self,
        limits: Limits,
        admission: Admission | None = None,
        gate: Callable[[int | None], Any] | None = None,
    ) -> None:
        self.limits = limits
        self.controller = limits.controller
        self.pacing = limits.pacing
        self.hedger = Hedger()
        self.successes = 0  # attempts that succeeded (the engine's requeue rule reads it)
        self.answered_before = False  # a success on this handle's lane of an earlier loop
        # The engine's requeue rule (decision 0165): when the first 429/529 since the
        # last success came back (inf: none since), and how many of the calls in
        # flight then are still in flight (a call outliving a refusal was accepted).
        self.refused_at = math.inf
        self._older = 0
        self._rate_limited = 0
        self._sent = 0  # calls admitted and not yet finished (waiting ones excluded)
        try:  # this loop's clock against time.monotonic(), to carry times across loops
            self._clock = asyncio.get_running_loop().time() - time.monotonic()
        except RuntimeError:
            self._clock = 0.0
        self._build(limits, admission, gate)

    def _build(
        self, limits: Limits, admission: Admission | None, gate: Callable[[int | None], Any] | None
    ) -> None:
        """Make the stack of meters ``limits`` describe."""
        c = self.controller
        concurrency = limits.concurrency if c is None or c.initial is None else c.initial
        self.gate = Gate(concurrency) if gate is None else gate(concurrency)
        self.metered = limits.rated
        self.turn = turn = Turn(simple=not self.metered and self.pacing is None)
        self.pauses = pause = PauseMeter(turn, limits.concurrency, c is not None)
        self.pace = None if self.pacing is None else PaceMeter(self.pacing)
        self.adaptive = None if c is None else AdaptiveMeter(c, self.gate, turn)
        own_tpm = admission is None and limits.tpm is not None
        self.headers = HeaderMeter(pause, turn, tokens_governed=own_tpm)
        credits = {REQUESTS: self.headers.requests, TOTAL: self.headers.tokens}
        self.rates = RateMeter(limits, credits, pause, self.pace, turn)
        self.needs_tokens = any(m.kind != REQUESTS for m in self.rates.buckets)
        self.steer = SteerMeter(pause, self.pace, self.headers.requests, turn)
        rate: Meter = self.steer
        if self.metered:
            rate = self.rates if admission is None else _Booked(admission, self)
        gate_meter = GateMeter(self.gate, self.hedger)
        self._acquire: tuple[Meter, ...] = (gate_meter, pause, rate, self.headers)
        learn: list[Meter] = [rate] if rate is not self.steer else []
        if self.metered and admission is not None:
            learn.append(self.rates)  # its margin still learns from 429s
        learn.append(pause)
        learn.extend(m for m in (self.adaptive, self.pace) if m is not None)
        learn.append(self.headers)
        self._learn: tuple[Meter, ...] = tuple(learn)
        self._release = (*learn, gate_meter)

    def __repr__(self) -> str:
        return f"fanflow.Lane({self.limits!r})"

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet finished."""
        return self._sent

    @property
    def _buckets(self) -> list[tuple[Any, int]]:
        """The lane's own rate buckets and what each counts (for tests and tools)."""
        return [(m.bucket, m.kind) for m in self.rates.buckets]

    def try_acquire(self) -> bool:
        """Admit one more call now if nothing is metered or steered and a slot is free.

        The fast path of the engine: a handle with no rate limits does no bucket work.
        """
        if self.turn.simple and self.gate.try_acquire():
            self._sent += 1
            return True
        return False

    def check(self, input: int, output: int, who: str) -> None:
        """Raise at once if a request of this size can never be admitted.

        Raises:
            RequestTooLarge: it needs more tokens than a bucket allows per period.
        """
        self.rates.check(input, output, who)

    async def acquire(self, tokens: tuple[int, int] | None = None) -> Permit | None:
        """Wait until one more call may be sent: through every meter of the stack in
        turn, each holding what it takes in the permit.

        Args:
            tokens: the estimated (input, output) tokens, when the lane counts tokens.

        Returns:
            The permit to pass to :meth:`finish` (None when no meter holds anything).
        """
        if self.turn.simple and self.gate.try_acquire():
            self._sent += 1
            return None  # nothing steers: a free slot is all it takes (try_acquire)
        input, output = tokens or (0, 0)
        permit = Permit(input, output, [])
        taken = 0
        try:
            for meter in self._acquire:
                admitted = meter.acquire_nowait(permit)
                permit = await meter.acquire(permit) if admitted is None else admitted
                taken += 1
        except BaseException:
            for meter in reversed(self._acquire[:taken]):
                meter.release(permit, None)  # never sent: give back, learn nothing
            raise
        self._sent += 1
        if self.metered or permit.ramp is not None:
            return permit
        return None

    def ready_at(self, now: float, tokens: tuple[int, int] = (0, 0)) -> float:
        """When one more call of ``tokens`` could be sent by the pause and the rate
        buckets (calls already queued for them not counted): a router
        (fanflow/_router.py) reads it to send where there is room now."""
        return self.rates.ready_at(max(now, self.pauses.until), tokens)

    @property
    def paused_until(self) -> float:
        """Event-loop time before which this lane sends nothing (0.0: never paused)."""
        return self.pauses.until

    def costs(self, input: int, output: int) -> list[int]:
        """A call's cost in each rate limit that is set, in the order rpm, tpm,
        input_tpm, output_tpm."""
        return self.rates.costs(input, output)

    async def wait_unpaused(self) -> None:
        """Wait out a pause (a 429's Retry-After), the pacing and the headers' credit."""
        await self.steer.wait()

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
        end: float | None = None,
    ) -> None:
        """An attempt admitted by :meth:`acquire` has ended: every meter gives back
        what it held and learns from the outcome.

        Args:
            permit: what :meth:`acquire` returned.
            start: when the attempt was sent.
            response: the :class:`fanflow.Response`, on success.
            error: the attempt's error, on failure (None for a cancellation).
            end: when it ended, on the loop's clock (None: now).
        """
        now = asyncio.get_running_loop().time() if end is None else end
        outcome = Outcome(start, now, response, error, self._sent)
        if response is not None:
            self.successes += 1
            self.refused_at = math.inf
            self._older = 0
            self.hedger.observe(now - start)
        else:
            if self._older and start <= self.refused_at:
                self._older -= 1  # one of the calls in flight at the first refusal ended
            if outcome.refused:
                self._refused(now)
        self._sent -= 1
        for meter in self._release:
            meter.release(permit, outcome)

    def _refused(self, now: float) -> None:
        self._rate_limited += 1
        if self.refused_at == math.inf:  # the first refusal since the last success
            self.refused_at = now
            self._older = self._sent - 1

    def overloaded(self, error: RateLimited | Overloaded, start: float) -> None:
        """Learn from a 429/529 to an attempt sent at ``start`` (what :meth:`finish`
        does for one), without ending an attempt."""
        now = asyncio.get_running_loop().time()
        self._refused(now)
        outcome = Outcome(start, now, None, error, self._sent)
        for meter in self._learn:
            meter.release(None, outcome)

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

    def pause(self, until: float) -> None:
        """Send nothing before ``until`` (a 429's Retry-After), then resume at half the
        limit (or, with no limit, half of what was in flight) and add one call per
        success up to the whole. (The adaptive controller does not pause the lane: it
        lowers its limit instead.)"""
        self.pauses.pause(until, self._sent)

    def inherit(self, other: Lane) -> None:
        """Start from what ``other`` (this handle's lane on an earlier event loop) learnt
        of the server: the adaptive level, the rate buckets' reservations and margins,
        the hedging delay, and the headers' credit, refilled for the time since (each
        ``fanflow.run`` has a loop of its own; decision 0159)."""
        if self.adaptive is not None and other.adaptive is not None:
            self.adaptive.inherit(other.adaptive)
        if self.limits == other.limits:  # the same buckets: carry their reservations
            self.rates.carry_from(other.rates, self._clock - other._clock)
        self.answered_before = other.answered
        self.headers.inherit(other.headers)
        self.hedger.start_from(other.hedger.learnt())

    def learnt(self) -> dict[str, float]:
        """What this lane learnt of the server, for a shared store to keep (decision
        0282): the adaptive level and floor once the server pushed back, the refill
        rate and cap its rate-limit headers gave, the hedging delay its latencies gave,
        and whether a call succeeded."""
        out: dict[str, float] = {}
        if self.adaptive is not None:
            out.update(self.adaptive.learnt())
        out.update(self.headers.learnt())
        out.update(self.hedger.learnt())
        if self.answered:
            out["answered"] = 1.0
        return out

    def start_from(self, learnt: dict[str, float], age: float) -> None:
        """Start from what :meth:`learnt` gave in another process ``age`` seconds ago,
        as :meth:`inherit` does from a lane of this process. Its headers' credit is
        taken as spent then: other processes may be drawing on it."""
        if self.adaptive is not None:
            self.adaptive.start_from(learnt)
        self.headers.start_from(learnt, age)
        self.hedger.start_from(learnt)
        if learnt.get("answered"):
            self.answered_before = True

    def statistics(self) -> LaneStatistics:
        pause = self.pauses.until
        return LaneStatistics(
            concurrency=self.gate.statistics(),
            paused_until=pause if pause else None,
            pauses=self.pauses.pauses,
            rate_limited=self._rate_limited,
            adaptive_limit=None if self.adaptive is None else self.adaptive.level,
            margin=max((m.bucket.margin for m in self.rates.buckets), default=0.0),
            hedges=self.hedger.hedges,
            delay=None if self.pace is None else self.pace.delay,
        )
