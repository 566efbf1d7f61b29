"""The hedging policy's measurements: when a duplicate attempt is worth sending.

"The Tail at Scale" (Dean and Barroso, CACM 2013): send a second copy of a request once
the first has been outstanding longer than a high quantile of the latencies seen, and
the tail shrinks for a few percent more calls. A :class:`Hedger` belongs to one lane (one
handle on one event loop): it keeps the latencies of the handle's last successful
attempts and a count of calls and hedges, so duplicates stay under a share of the calls.
Pure bookkeeping: no clock, no sleeping; the engine asks it and does the waiting.
"""

from __future__ import annotations

__all__ = ["HEDGE_EXTRA", "HEDGE_QUANTILE", "Hedger"]

# A duplicate goes once an attempt is slower than this quantile of the handle's recent
# successful attempts, and never before this multiple of their median.
HEDGE_QUANTILE = 0.99
HEDGE_MEDIAN_FACTOR = 1.5

# Duplicates are at most this share of the calls started (the policy's cost cap).
HEDGE_EXTRA = 0.05

# Latencies kept (a ring) and needed before the policy trusts its quantile.
_WINDOW = 512
_WARMUP = 32
# The quantile is recomputed after this many new latencies (a sort of the window).
_REFRESH = 64


class Hedger:
    """Recent latencies of one handle and the hedges it has sent."""

    __slots__ = ("_delay", "_fresh", "_i", "_lat", "calls", "hedges")

    def __init__(self) -> None:
        self._lat: list[float] = []
        self._i = 0
        self._fresh = 0
        self._delay: float | None = None
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
        if self._fresh >= _REFRESH or (self._delay is None and len(lat) >= _WARMUP):
            self._fresh = 0
            self._delay = hedge_delay(lat)

    def delay(self) -> float | None:
        """Seconds after which an attempt gets a duplicate (None: not enough data)."""
        return self._delay

    def allow(self) -> bool:
        """Take one hedge if the cap allows it."""
        if self.hedges + 1 > HEDGE_EXTRA * self.calls:
            return False
        self.hedges += 1
        return True


def hedge_delay(latencies: list[float]) -> float | None:
    """The hedging delay for these latencies: their ``HEDGE_QUANTILE`` quantile, at
    least ``HEDGE_MEDIAN_FACTOR`` times their median (a tight distribution, where the
    quantile sits a hair above the median, would hedge calls that are merely average)."""
    if len(latencies) < _WARMUP:
        return None
    ordered = sorted(latencies)
    n = len(ordered)
    high = ordered[min(n - 1, int(HEDGE_QUANTILE * n))]
    median = ordered[n // 2]
    return max(high, HEDGE_MEDIAN_FACTOR * median)
