"""Hedging: a duplicate attempt races one that is slow, and the first success wins.

:class:`Race` is the one mechanism, for a pattern's ``hedge_after`` and for the hedging
policy alike; :class:`Hedger` holds the policy's measurements: when a duplicate is worth
sending.

"The Tail at Scale" (Dean and Barroso, CACM 2013): send a second copy of a request once
the first has been outstanding longer than a high quantile of the latencies seen, and
the tail shrinks for a few percent more calls. A :class:`Hedger` belongs to one lane (one
handle on one event loop): it keeps the latencies of the handle's last successful
attempts and a count of calls and hedges, so duplicates stay under a share of the calls.

It also watches the running attempts with one timer for them all (:meth:`Hedger.watch`,
decision 0133), firing at most every eighth of the delay, so a duplicate may start up to
12.5% late.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ._types import Response

__all__ = ["HEDGE_EXTRA", "HEDGE_QUANTILE", "HedgeWon", "Hedger", "Race", "Racer", "Watched"]

# A duplicate goes once an attempt is slower than this quantile of the handle's recent
# successful attempts, and never before this multiple of their median.
HEDGE_QUANTILE = 0.99
HEDGE_MEDIAN_FACTOR = 1.5
# ... and never before this many seconds: a duplicate sent sooner cannot beat an answer
# already on its way (and latencies of 0, a clock that did not move, would hedge all).
HEDGE_MIN_DELAY = 0.01

# Duplicates are at most this share of the calls started (the policy's cost cap).
HEDGE_EXTRA = 0.05

# Latencies kept (a ring) and needed before the policy trusts its quantile.
_WINDOW = 512
_WARMUP = 32
# The quantile is recomputed after this many new latencies (a sort of the window).
_REFRESH = 64


class Watched(Protocol):
    """A running attempt that may get a duplicate."""

    def spawn_hedge(self) -> None: ...


class Hedger:
    """Recent latencies of one handle, the hedges it has sent, the attempts it watches."""

    __slots__ = (
        "_delay",
        "_fresh",
        "_i",
        "_lat",
        "_own",
        "_running",
        "_timer",
        "calls",
        "hedges",
    )

    def __init__(self) -> None:
        self._running: dict[Watched, float] = {}  # attempt -> when it is due (FIFO)
        self._timer: asyncio.TimerHandle | None = None
        self._lat: list[float] = []
        self._i = 0
        self._fresh = 0
        self._delay: float | None = None
        self._own = False  # _delay is from this hedger's latencies (not learnt elsewhere)
        self.calls = 0  # first attempts started under the policy
        self.hedges = 0  # duplicates started by the policy

    def observe(self, latency: float) -> None:
        """A successful attempt took ``latency`` seconds."""
        lat = self._lat
        if len(lat) < _WINDOW:
            lat.append(latency)
        else:
            lat[self._i] = latency
            self._i = (self._i + 1) % _WINDOW
        self._fresh += 1
        if self._fresh >= _REFRESH or (not self._own and len(lat) >= _WARMUP):
            self._fresh = 0
            self._delay = hedge_delay(lat)
            self._own = self._delay is not None

    def median(self) -> float | None:
        """The median latency of the recent successful attempts (None: none yet)."""
        lat = self._lat
        return sorted(lat)[len(lat) // 2] if lat else None

    def delay(self) -> float | None:
        """Seconds after which an attempt gets a duplicate (None: not enough data)."""
        return self._delay

    def learnt(self) -> dict[str, float]:
        """The delay this hedger hedges after (its own, or the one it started from), for
        another lane to start from."""
        return {} if self._delay is None else {"hedge_delay": self._delay}

    def start_from(self, learnt: dict[str, float]) -> None:
        """Hedge after the delay another lane measured until this one has its own."""
        delay = learnt.get("hedge_delay")
        if not self._own and delay is not None and delay >= HEDGE_MIN_DELAY:
            self._delay = delay

    def watch(self, attempt: Watched, due: float) -> None:
        """Call ``attempt.spawn_hedge()`` at about ``due`` unless :meth:`unwatch` first."""
        self._running[attempt] = due
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(due, self._sweep)

    def unwatch(self, attempt: Watched) -> None:
        self._running.pop(attempt, None)

    def _sweep(self) -> None:
        self._timer = None
        running = self._running
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = now
        while running:
            attempt, due = next(iter(running.items()))
            if due > now + 1e-6:
                break
            del running[attempt]
            attempt.spawn_hedge()
        if running:
            step = (self._delay or 0.0) / 8
            self._timer = loop.call_at(max(due, now + step), self._sweep)

    def allow(self) -> bool:
        """Take one hedge if the cap allows it."""
        if self.hedges + 1 > HEDGE_EXTRA * self.calls:
            return False
        self.hedges += 1
        return True


def hedge_delay(latencies: list[float]) -> float | None:
    """The hedging delay for these latencies: their ``HEDGE_QUANTILE`` quantile, at
    least ``HEDGE_MEDIAN_FACTOR`` times their median (a tight distribution, where the
    quantile sits a hair above the median, would hedge calls that are merely average),
    and at least ``HEDGE_MIN_DELAY``."""
    if len(latencies) < _WARMUP:
        return None
    ordered = sorted(latencies)
    n = len(ordered)
    high = ordered[min(n - 1, int(HEDGE_QUANTILE * n))]
    median = ordered[n // 2]
    return max(high, HEDGE_MEDIAN_FACTOR * median, HEDGE_MIN_DELAY)


class HedgeWon(Exception):
    """Raised in an attempt that lost the race to its duplicate (never leaves the engine)."""


class Racer(Protocol):
    """A call whose attempts may race a duplicate (the engine's)."""

    race: Race | None

    async def attempt(self, *, hedge: bool, wait_before: float) -> Response: ...


class Race:
    """One attempt raced by a duplicate started ``delay`` seconds after it was sent.

    The attempt runs inline in the call's task and, while it is sent, is watched: by a
    timer of its own (``hedge_after``), or by the policy's :class:`Hedger` (one timer for
    every attempt, and a cap on duplicates). A duplicate runs in a task. The first
    success wins: a duplicate that wins expires the attempt's timeout (asyncio's own
    race-free cancellation), which then raises :class:`HedgeWon`; an attempt that wins
    cancels the duplicate. When both fail, the attempt's error stands.
    """

    __slots__ = ("call", "cm", "delay", "hedger", "loop", "task", "timer", "won")

    def __init__(
        self, call: Racer, delay: float, hedger: Hedger | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.call = call
        self.delay = delay
        self.hedger = hedger  # None: ``hedge_after`` (no cap, a timer of its own)
        self.loop = loop
        self.cm: asyncio.Timeout | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[Response | None] | None = None
        self.won: Response | None = None

    async def run(self, wait_before: float) -> Response:
        """The attempt, or its duplicate's answer if that came first."""
        call = self.call
        call.race = self
        try:
            return await call.attempt(hedge=False, wait_before=wait_before)
        except HedgeWon:
            assert self.won is not None
            return self.won
        except Exception:
            task = self.task
            if task is None:
                raise
            won = await task  # the duplicate may still succeed
            if won is None:
                raise
            return won
        finally:
            call.race = None
            task = self.task
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def watch(self, cm: asyncio.Timeout, start: float) -> None:
        """The attempt was sent at ``start`` under ``cm``: a duplicate if it is still
        running ``delay`` seconds later."""
        self.cm = cm
        due = start + self.delay
        if self.hedger is None:
            self.timer = self.loop.call_at(due, self.spawn_hedge)
        else:
            self.hedger.watch(self, due)

    def unwatch(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        elif self.hedger is not None:
            self.hedger.unwatch(self)
        self.cm = None

    def beaten(self, cm: asyncio.Timeout) -> bool:
        """Whether ``cm`` expired because the duplicate won."""
        return self.won is not None and cm is self.cm

    def spawn_hedge(self) -> None:
        """The attempt is slower than the delay: start a duplicate (under the policy, if
        its cap allows one)."""
        if self.cm is None or self.task is not None:
            return
        if self.hedger is not None and not self.hedger.allow():
            return
        self.task = self.loop.create_task(self._duplicate())

    async def _duplicate(self) -> Response | None:
        try:
            response = await self.call.attempt(hedge=True, wait_before=0.0)
        except Exception:
            return None  # recorded in the attempts; the first attempt goes on
        self.won = response
        cm = self.cm
        if cm is not None and not cm.expired():
            cm.reschedule(self.loop.time())  # stop the first attempt: the duplicate won
        return response
