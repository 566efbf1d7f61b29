"""SimServer's limits: requests in flight, and RPM/TPM as token buckets (as the hosted
APIs document theirs), with a request reaching them late as over a real network."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from aiohttp import web

from ._simhttp import error_response
from ._simwire import Api, BucketView, SimRequest, limit_headers, retry_headers

__all__ = ["Limiter"]


@dataclass(slots=True)
class _Bucket:
    """A continuously refilling token bucket (capacity ``limit``, refill ``limit`` per
    ``period`` seconds)."""

    limit: int
    level: float
    at: float
    period: float = 60.0

    def refill(self, now: float) -> None:
        rate = self.limit / self.period
        self.level = min(float(self.limit), self.level + (now - self.at) * rate)
        self.at = now

    def wait_for(self, amount: int) -> float:
        """Seconds until ``amount`` is available (0 if it is now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / (self.limit / self.period)

    def view(self) -> BucketView:
        reset = (self.limit - self.level) / (self.limit / self.period)
        return BucketView(self.limit, max(0, int(self.level)), reset)


class Limiter:
    """The limits of one SimServer (its arguments of the same names; ``late`` is
    ``(arrival_jitter, connect_delay)``)."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        max_in_flight: int | None,
        period: float,
        late: tuple[float, float],
        rate_headers: bool,
        seed: int,
        retry_after: bool = True,
    ) -> None:
        for name, limit in (("rpm", rpm), ("tpm", tpm), ("max_in_flight", max_in_flight)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1, got {limit}; use None for no limit")
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, got {period}")
        self.rpm, self.tpm, self.max_in_flight, self.period = rpm, tpm, max_in_flight, period
        self.arrival_jitter, self.connect_delay = late
        self.rate_headers = rate_headers
        self.retry_after = retry_after
        # Connections seen (by their handler, kept so that an id is never reused).
        self._connections: dict[int, object] = {}
        self._arrival_rng = random.Random(seed + 1)  # apart from the fault draws
        self._requests: _Bucket | None = None
        self._tokens: _Bucket | None = None

    def reset(self, now: float) -> None:
        """Full buckets at ``now``."""
        rpm, tpm, period = self.rpm, self.tpm, self.period
        self._requests = _Bucket(rpm, float(rpm), now, period) if rpm else None
        self._tokens = _Bucket(tpm, float(tpm), now, period) if tpm else None

    async def arrive(self, request: web.BaseRequest, now: float) -> float:
        """Wait for a new connection's set-up and the arrival jitter; the time after."""
        late = 0.0
        if self.connect_delay and id(request.protocol) not in self._connections:
            self._connections[id(request.protocol)] = request.protocol
            late = self.connect_delay
        if self.arrival_jitter:
            late += self._arrival_rng.uniform(0.0, self.arrival_jitter)
        if not late:
            return now
        await asyncio.sleep(late)
        return asyncio.get_running_loop().time()

    def admit(
        self, api: Api, sim: SimRequest, tokens: int, now: float, in_flight: int
    ) -> web.Response | None:
        """None if the request passes (its request and ``tokens`` are charged), else
        the 429: in flight first, then requests, then tokens."""
        if self.max_in_flight is not None and in_flight > self.max_in_flight:
            return error_response(
                api,
                429,
                f"Too many concurrent requests: limit {self.max_in_flight} in flight. "
                "Lower your concurrency.",
                headers=self.headers(api) + self._retry_headers(api, 1.0),
            )
        rb, tb = self._requests, self._tokens
        if rb is not None:
            rb.refill(now)
        if tb is not None:
            tb.refill(now)
            if tokens > tb.limit:
                return error_response(
                    api,
                    429,
                    f"Request too large for {sim.model}: tokens per min (TPM): "
                    f"Limit {tb.limit}, Requested {tokens}.",
                    kind="tokens",
                    headers=self.headers(api),
                )
        wait_r = rb.wait_for(1) if rb is not None else 0.0
        wait_t = tb.wait_for(tokens) if tb is not None else 0.0
        if wait_r > 0 or wait_t > 0:
            what = "requests" if wait_r >= wait_t else "tokens"
            limit = rb.limit if what == "requests" and rb else tb.limit if tb else 0
            wait = max(wait_r, wait_t)
            return error_response(
                api,
                429,
                f"Rate limit reached for {sim.model} on {what} per min: Limit {limit}. "
                f"Please try again in {wait * 1000:.0f}ms.",
                kind=what,
                headers=self.headers(api) + self._retry_headers(api, wait),
            )
        if rb is not None:
            rb.level -= 1
        if tb is not None:
            tb.level -= tokens
        return None

    def _retry_headers(self, api: Api, wait: float) -> list[tuple[str, str]]:
        return retry_headers(api, wait) if self.retry_after else []

    def headers(self, api: Api) -> list[tuple[str, str]]:
        """The rate-limit headers of a reply (none without buckets or ``rate_headers``)."""
        rb, tb = self._requests, self._tokens
        if (rb is None and tb is None) or not self.rate_headers:
            return []
        return limit_headers(
            api,
            rb.view() if rb is not None else None,
            tb.view() if tb is not None else None,
            time.time(),
        )
