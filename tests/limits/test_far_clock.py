"""Rate grants from a far side that reads its own clock (a shared store): a grant is
judged by when it was booked there, not by how long its answer took to come back.

The far side books with the stores' own rule (``_shared._sqlite.earliest``), in memory
on one loop, reached over a simulated round trip, with a clock 1000 s ahead of the
loop's; virtual time makes the round trips exact.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from fanflow import Limits
from fanflow._leases import GlobalLane, GrantQueue, lease_time
from fanflow._shared._sqlite import earliest

pytestmark = pytest.mark.looptime

AHEAD = 1000.0  # the far clock minus the loop's


class _SlowAnswers(GrantQueue):
    """A far side that books on arrival (1 ms away) and whose answers come back late:
    the first fast, every other one ``lag`` seconds late (a loaded loop)."""

    def __init__(self, rate: float, lag: float, lease: float, horizon: float) -> None:
        super().__init__(self._direct, self._settle, horizon)
        self.rate, self.lease, self.horizon = rate, lease, horizon
        self.rows: list[tuple[float, int, int, int, int]] = []
        self.lag = lag
        self.calls = 0
        self.given_back = 0
        self.booked: dict[int, float] = {}  # grant -> its booked time, far clock

    async def _direct(self, costs: list[list[int]]) -> tuple[float, list[tuple[float, int]]]:
        await asyncio.sleep(0.001)
        now = asyncio.get_running_loop().time() + AHEAD
        answers: list[tuple[float, int]] = []
        for cost in costs:  # one second of ``rate`` requests, booked a lease late at most
            t = max(
                now,
                earliest(
                    self.rows, [cost[0], 0, 0, 0], [self.rate, *[math.inf] * 3], 1 + self.lease
                ),
            )
            if t - now > self.horizon:
                answers.append((t - now, 0))
                continue
            self.rows.append((t, cost[0], 0, 0, 0))
            self.booked[len(self.rows)] = t
            answers.append((t - now, len(self.rows)))
        self.calls += 1
        await asyncio.sleep(0.001 if self.calls == 1 else self.lag)
        return now, answers

    def _settle(self, grant: int, costs: list[int] | None) -> None:
        if costs is not None and not any(costs):
            self.given_back += 1


async def test_answers_later_than_the_lease_are_still_sent_within_it() -> None:
    limits = Limits(rpm=20, period=1.0)  # 20 requests/s: a 50 ms lease
    lease = lease_time(limits.period)
    grants = _SlowAnswers(20, lag=2 * lease, lease=lease, horizon=5 * lease)
    lane = GlobalLane(limits, None, grants)
    loop = asyncio.get_running_loop()
    lateness: list[float] = []

    async def call() -> None:
        permit = await lane.acquire((1, 1))
        booked = grants.booked[permit.grant]  # type: ignore[attr-defined]
        lateness.append(loop.time() + AHEAD - booked)
        lane.release()

    async with asyncio.timeout(600):  # virtual seconds: 40 calls take about 2
        await asyncio.gather(*(call() for _ in range(40)))
    assert len(lateness) == 40
    # Every answer after the first came two leases late. Judged by its round trip, no
    # grant could be sent in time (each was given back and booked again, for ever).
    # Placed by the far clock, only those due sooner than their answer's lag were: the
    # first few, booked before the queue was asking half a horizon ahead.
    assert grants.given_back <= 10
    assert min(lateness) >= 0  # never before its booking
    assert max(lateness) <= lease  # always within the lease of it
    await grants.aclose()
