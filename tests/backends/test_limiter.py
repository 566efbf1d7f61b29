"""The cluster-wide limiter without a cluster: the broker and workers' leases on one loop.

Each "worker" is a :class:`SlotLease` whose ``ask``/``give_back`` call the broker
directly (in Ray they are actor calls); virtual time makes call durations exact.
"""

from __future__ import annotations

import asyncio
import random
import sys

import pytest

import fanflow
from fanflow import ConfigError, Limits, Response, Usage
from fanflow.backends._config import resolve_backend
from fanflow.backends._limiter import (
    LINGER,
    REUSE,
    GlobalLane,
    GrantQueue,
    LimitBroker,
    SlotLease,
    lease_time,
)

pytestmark = pytest.mark.looptime

LIMITS = Limits(concurrency=3)


def _lease(broker: LimitBroker, worker: str, gave: list[str] | None = None) -> SlotLease:
    async def ask() -> bool:
        await asyncio.sleep(0.001)  # a round trip to the broker actor
        return await broker.acquire("h", LIMITS, worker)

    def give_back() -> None:
        if gave is not None:
            gave.append(worker)
        broker.release("h", worker)

    return SlotLease(3, ask, give_back)


async def test_workers_together_never_exceed_the_limit_and_use_all_of_it() -> None:
    broker = LimitBroker()
    leases = [_lease(broker, f"w{i}") for i in range(4)]
    lanes = [GlobalLane(LIMITS, lease, None) for lease in leases]
    rng = random.Random(1)
    in_flight = peak = done = 0

    async def call(lane: GlobalLane) -> None:
        nonlocal in_flight, peak, done
        if not lane.try_acquire():
            await lane.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(rng.choice([0.5, 1.0, 2.0]))
        in_flight -= 1
        done += 1
        lane.release()

    async with asyncio.TaskGroup() as tg:
        for lane in lanes:
            for _ in range(25):
                tg.create_task(call(lane))
    await asyncio.sleep(LINGER)  # spare slots linger that long, then go back
    stats = broker.statistics("h")
    assert stats is not None
    assert done == 100
    assert peak == 3
    assert stats.max_leased == 3
    assert stats.leased == 0  # every slot went back
    for lease in leases:
        await lease.aclose()


async def test_a_busy_worker_lets_the_others_have_a_turn() -> None:
    broker = LimitBroker()
    gave: list[str] = []
    a, b = _lease(broker, "a", gave), _lease(broker, "b", gave)
    order: list[str] = []

    async def call(lease: SlotLease, name: str) -> None:
        await lease.take()
        order.append(name)
        await asyncio.sleep(1.0)
        lease.give()

    async with asyncio.TaskGroup() as tg:
        for _ in range(3 * REUSE):
            tg.create_task(call(a, "a"))
        await asyncio.sleep(0.1)  # a holds all 3 slots, with many calls queued
        tg.create_task(call(b, "b"))
    # b got a slot after at most REUSE reuses of one of a's slots, not after all of a.
    assert order.index("b") <= 3 + REUSE
    assert "a" in gave


async def test_a_dead_workers_slots_are_reclaimed() -> None:
    broker = LimitBroker()
    dead, alive = _lease(broker, "dead"), _lease(broker, "alive")
    for _ in range(3):
        await dead.take()  # and never gives them back: its process was killed
    waiting = asyncio.ensure_future(alive.take())
    await asyncio.sleep(5)
    assert not waiting.done()
    assert broker.forget("dead") == 3
    await asyncio.wait_for(waiting, 1)
    stats = broker.statistics("h")
    assert stats is not None
    assert stats.by_worker == {"alive": 1}
    # A request from the dead worker that arrives late is refused, not leaked.
    assert await broker.acquire("h", LIMITS, "dead") is False
    alive.give()
    await dead.aclose()
    await alive.aclose()


async def test_cancelling_a_waiting_call_takes_no_slot() -> None:
    broker = LimitBroker()
    lease = _lease(broker, "w")
    for _ in range(3):
        await lease.take()
    waiter = asyncio.ensure_future(lease.take())
    await asyncio.sleep(1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for _ in range(3):
        lease.give()
    await asyncio.sleep(1)
    stats = broker.statistics("h")
    assert stats is not None
    assert stats.leased == 0
    assert lease.held == lease.used == 0
    await lease.aclose()


async def test_an_unreachable_broker_fails_the_call_that_asked() -> None:
    async def ask() -> bool:
        raise ConnectionError("broker actor died")

    lease = SlotLease(3, ask, lambda: None)
    with pytest.raises(ConnectionError):
        await lease.take()
    await lease.aclose()


async def test_without_ray_installed_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    llm = fanflow.function(lambda request: "x")
    with pytest.raises(ConfigError, match=r"pip install 'fanflow\[ray\]'"):
        await fanflow.map(llm, "{input}", ["a"], backend="ray")


def test_unknown_backends_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"use 'local', 'ray', fanflow\.backends\.RayBackend\(\.\.\.\) or"
    ):
        resolve_backend("dask")
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        fanflow.backends.RayBackend(workers=0)
    with pytest.raises(ConfigError, match="unknown backend"):
        fanflow.Pool(lambda x: x, [{"x": 1}], backend="spark")


async def test_a_spare_slot_lingers_for_the_next_call_then_goes_back() -> None:
    broker = LimitBroker()
    asks = 0

    async def ask() -> bool:
        nonlocal asks
        asks += 1
        return await broker.acquire("h", LIMITS, "w")

    lease = SlotLease(3, ask, lambda: broker.release("h", "w"))
    await lease.take()
    lease.give()
    assert lease.try_take()  # reused at once: no second round trip
    lease.give()
    assert asks == 1
    await asyncio.sleep(LINGER)
    stats = broker.statistics("h")
    assert stats is not None
    assert stats.leased == 0
    assert lease.held == 0
    await lease.aclose()


class _DirectGrants(GrantQueue):
    """The broker's rate buckets reached over a simulated round trip of ``rtt``."""

    def __init__(self, broker: LimitBroker, limits: Limits, rtt: float = 0.002) -> None:
        super().__init__(self._direct, self._settle, lease_time(limits.period))
        self.broker = broker
        self.limits = limits
        self.rtt = rtt
        self.given_back = 0

    async def _direct(self, costs: list[list[int]]) -> list[tuple[float, int]]:
        await asyncio.sleep(self.rtt / 2)
        now = asyncio.get_running_loop().time()
        granted = self.broker.grant_many("h", self.limits, costs, now)
        await asyncio.sleep(self.rtt / 2)
        return granted

    def _settle(self, grant: int, costs: list[int] | None) -> None:
        if costs is not None and not any(costs):
            self.given_back += 1
        self.broker.settle("h", grant, costs)


def _max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize("workers", [1, 3])
async def test_rate_grants_keep_all_workers_within_one_limit(workers: int) -> None:
    limits = Limits(rpm=60, tpm=1200)  # per minute: 1 request/s, 20 tokens/s
    broker = LimitBroker()
    lanes = [GlobalLane(limits, None, _DirectGrants(broker, limits)) for _ in range(workers)]
    sent: list[tuple[float, int]] = []
    loop = asyncio.get_running_loop()

    async def call(lane: GlobalLane) -> None:
        permit = await lane.acquire((8, 10))  # estimated: 18 tokens
        now = loop.time()
        sent.append((now, 15))  # the reply used 15 (refunded: 3)
        await asyncio.sleep(0.5)
        lane.finish(permit, now, Response("x", usage=Usage(7, 8)))

    async with asyncio.TaskGroup() as tg:
        for i in range(90):
            tg.create_task(call(lanes[i % workers]))
    times = [t for t, _ in sent]
    # Never more than the limit in any 60 s at the server, whatever the workers.
    assert _max_in_window(times, 60.0) <= 60
    tokens_in_window = max(sum(c for u, c in sent if t - 60.0 < u <= t) for t in times)
    assert tokens_in_window <= 1200
    # ... and the limit less its 3% margin is used: 90 calls at 0.97 per s.
    assert max(times) < 90 / 0.97 + 1
    stats = broker.statistics("h")
    assert stats is not None
    assert stats.grants == 90


async def test_a_grant_that_cannot_be_used_in_time_goes_back_and_is_booked_again() -> None:
    limits = Limits(rpm=600)
    broker = LimitBroker()
    grants = _DirectGrants(broker, limits, rtt=1.0)  # a round trip longer than the lease
    lane = GlobalLane(limits, None, grants)
    permit = asyncio.ensure_future(lane.acquire())
    await asyncio.sleep(0.5)
    assert not permit.done()
    grants.rtt = 0.002  # the broker answers quickly again
    got = await asyncio.wait_for(permit, 10)
    assert got is not None
    assert grants.given_back >= 1
    lane.finish(got, 0.0, Response("x", usage=Usage(1, 1)))


async def test_many_calls_asking_at_once_share_few_messages_and_waste_no_grant() -> None:
    # The default burst (half a second) and margin (3%): 100 at once, then 194/s.
    limits = Limits(rpm=200, period=1.0)
    broker = LimitBroker()
    grants = _DirectGrants(broker, limits, rtt=0.01)
    lane = GlobalLane(limits, None, grants)
    loop = asyncio.get_running_loop()
    sent: list[float] = []

    async def call() -> None:
        permit = await lane.acquire()
        sent.append(loop.time())
        lane.finish(permit, loop.time(), Response("x", usage=Usage(1, 1)))

    async with asyncio.TaskGroup() as tg:
        for _ in range(1000):
            tg.create_task(call())
    # Bookings go a lease ahead at most: about one message per 50 ms, not per call.
    assert grants.messages <= 150
    assert grants.given_back == 0  # every answer came back within its lease
    assert _max_in_window(sent, 1.0) <= 200
    # ... and the limit is used: the broker's window is a lease longer than the period.
    rate = 200 * 0.97 / (1 + lease_time(1.0))
    assert max(sent) < (1000 - 100) / rate * 1.03
