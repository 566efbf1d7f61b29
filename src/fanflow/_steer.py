"""Steering by the server's rate-limit headers: one law for requests and tokens.

A reply's headers (a ``RateLimitState``) say how much is ``remaining`` of each limit
and when it is full again (``reset``). The hosted APIs' buckets refill continuously, so
with the limit known the refill rate is ``(limit - remaining) / reset``. What is left
now is ``remaining`` (counted when the request arrived) plus the refill since, capped
at the limit, less what was sent since. One law then holds for both units:

- with a refill rate known, what is left becomes a *credit* (:class:`~fanflow._rate.
  Credit`) that each send takes its cost from and that refills at the server's rate
  (no margin: the server says what is left; decisions 0159, 0176, 0218). Where the
  lane has a bucket of that unit, the credit decides the bucket's turn in place of its
  margin and burst (:class:`~fanflow._meters.BucketMeter`); the request credit also
  gates every send of a lane with no rate limits (:class:`SteerMeter`);
- when less is left than the next send needs, sends are held until enough has
  refilled (until the reset, with no rate known).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from ._meters import EPSILON, Outcome, PaceMeter, PauseMeter, Permit, Turn
from ._rate import Credit

__all__ = ["HeaderMeter", "SteerMeter"]


class HeaderMeter:
    """Reads each reply's rate-limit headers into the lane's credits and holds.

    Args:
        pause: where a hold on an empty bucket goes.
        turn: the lane's turn (woken when a credit changes).
        tokens_governed: whether the lane has a ``tpm`` bucket of its own for the
            token credit to govern (else token headers only hold).
    """

    __slots__ = (
        "_last_cost",
        "_mono",
        "_pause",
        "_tokens_in_flight",
        "_turn",
        "requests",
        "tokens",
        "tokens_governed",
    )

    def __init__(self, pause: PauseMeter, turn: Turn, tokens_governed: bool) -> None:
        self._pause = pause
        self._turn = turn
        self.tokens_governed = tokens_governed
        self.requests = Credit()
        self.tokens = Credit()
        self._mono = 0.0  # time.monotonic() when the request credit was last read
        self._tokens_in_flight = 0  # estimated tokens of the calls sent, not yet ended
        self._last_cost = 0  # the latest call's estimate: what the next one may need

    def acquire_nowait(self, permit: Permit) -> Permit:
        tokens = permit.input + permit.output
        self._tokens_in_flight += tokens
        self._last_cost = tokens
        return permit

    async def acquire(self, permit: Permit) -> Permit:
        return self.acquire_nowait(permit)

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        if permit is not None:
            self._tokens_in_flight -= permit.input + permit.output
        if outcome is not None and outcome.state is not None:
            self.observe(outcome.state, outcome.start, outcome.now, outcome.sent - 1)

    def observe(self, state: Any, start: float, now: float, others: int) -> None:
        """Steer by the headers of a reply to an attempt sent at ``start``, with
        ``others`` calls sent meanwhile (the server may not count them yet)."""
        elapsed = max(0.0, now - start)
        units = (
            (
                self.requests,
                True,
                1,
                others,
                state.requests_remaining,
                state.requests_reset,
                state.requests_limit,
            ),
            (
                self.tokens,
                self.tokens_governed,
                max(self._last_cost, 1),
                self._tokens_in_flight,
                state.tokens_remaining,
                state.tokens_reset,
                state.tokens_limit,
            ),
        )
        for credit, governed, cost, pending, remaining, reset, limit in units:
            if remaining is None or reset is None or reset <= 0:
                continue
            # ``remaining`` is whole units, rounded down (the bucket may hold up to one
            # more than it says): count one more as used (at most 1% of the limit).
            used = limit - remaining - min(1.0, limit / 100) if limit else 0.0
            rate = used / reset if used > 0 else None
            # The refill since, capped at the bucket's size, then what was sent since.
            left = float(remaining)
            if rate is not None and limit:
                left = min(float(limit), left + rate * elapsed)
            left -= pending
            if governed and credit.observe(left, rate, limit, now, start):
                if credit is self.requests:
                    self._mono = time.monotonic()
                self._turn.steer()
                self._turn.wake()
            if credit is self.tokens and credit.live:
                continue  # the token credit holds and spaces them
            if left < cost:
                self._pause.hold(
                    now + (reset if rate is None else min(reset, (cost - left) / rate))
                )

    def learnt(self) -> dict[str, float]:
        """The request credit's refill rate and cap, once headers gave them."""
        credit = self.requests
        return {"credit_rate": credit.rate, "credit_cap": credit.cap} if credit.rate else {}

    def start_from(self, learnt: dict[str, float], age: float) -> None:
        """Start from a refill rate another process read ``age`` seconds ago: the credit
        is what refilled since (the rest may be spent by others)."""
        rate = learnt.get("credit_rate")
        credit = self.requests
        if not rate or credit.rate:
            return
        credit.rate, credit.cap = rate, learnt.get("credit_cap", math.inf)
        credit.amount = min(credit.cap, rate * max(0.0, age))
        credit.at = asyncio.get_running_loop().time()
        self._mono = time.monotonic()
        self._turn.steer()

    def inherit(self, other: HeaderMeter) -> None:
        """Start from ``other``'s request credit (an earlier loop's), refilled since."""
        old = other.requests
        if not old.rate:
            return
        credit = self.requests
        since = max(0.0, time.monotonic() - other._mono)
        credit.rate = old.rate
        credit.cap = old.cap
        credit.amount = min(old.cap, old.amount + old.rate * since)
        credit.at = asyncio.get_running_loop().time()
        self._mono = time.monotonic()
        self._turn.steer()


class SteerMeter:
    """The clocked rules of a lane that has no rate buckets of its own to share a
    turn with: the pause, the pacing, then one request of the headers' credit."""

    __slots__ = ("_credit", "_pace", "_pause", "_turn")

    def __init__(
        self, pause: PauseMeter, pace: PaceMeter | None, credit: Credit, turn: Turn
    ) -> None:
        self._pause, self._pace, self._credit, self._turn = pause, pace, credit, turn

    def acquire_nowait(self, permit: Permit) -> Permit | None:
        pause, pace = self._pause, self._pace
        if not (pause.until or self._credit.live or pace is not None):
            return permit
        # Most calls have nothing to wait for: no coroutine for them.
        now = asyncio.get_running_loop().time()
        t = pause.until if pace is None else max(pause.until, pace.next)
        if t - now > EPSILON or not self._try_take(now):
            return None
        if pace is not None:
            pace.claim(t, now)
        return permit

    async def acquire(self, permit: Permit) -> Permit:
        if self._pause.until or self._credit.live or self._pace is not None:
            now = asyncio.get_running_loop().time()
            t = self._claim(now)
            if max(t, self._pause.until) - now > EPSILON or not self._try_take(now):
                await self.wait(t)
        return permit

    def release(self, permit: Permit | None, outcome: Outcome | None) -> None:
        """Nothing is held: the pause, the pacing and the credit learn elsewhere."""

    def _claim(self, now: float) -> float:
        t = self._pause.until
        if self._pace is not None:
            t = self._pace.claim(t, now)
        return t

    def _try_take(self, now: float) -> bool:
        """Take one request of the credit now, if nobody is queued for it (True also
        when there is no credit to keep)."""
        credit = self._credit
        if not credit.live:
            return True
        if self._turn.lock.locked() or credit.wait(now, 1) > EPSILON:
            return False
        credit.take(now, 1)
        return True

    async def wait(self, t: float | None = None) -> None:
        """Wait out a pause and the pacing (``t``: when :meth:`_claim` said this call
        may go), then take one request of the headers' credit."""
        loop = asyncio.get_running_loop()
        if t is None:
            t = self._claim(loop.time())
        # The pause may be extended while we sleep, so look again after each sleep.
        while (delay := max(t, self._pause.until) - loop.time()) > EPSILON:  # noqa: ASYNC110
            await asyncio.sleep(delay)
        if self._credit.live:
            await self._take()

    async def _take(self) -> None:
        """Calls take turns in FIFO order; only the head waits for the refill. A new
        reading wakes it to look again, so a misread rate costs one wait at most."""
        loop = asyncio.get_running_loop()
        credit, turn = self._credit, self._turn
        turn.queued += 1
        try:
            async with turn.lock:
                while True:
                    now = loop.time()
                    wait = credit.wait(now, 1) if credit.live else 0.0
                    if wait <= EPSILON:
                        credit.take(now, 1)
                        return
                    await turn.sleep_or_wake(wait)
        finally:
            turn.queued -= 1
