"""The Redis store's grant script against a real redis-server on loopback: it books by
the rule of every shared store (``_sqlite.earliest`` over every row in the window), and
it does so without reading every row (decision 0295).

Each test drives a :class:`~fanflow._shared._redis.RedisStore` directly and reads the
server's keys with a plain client: no processes, no sleeps.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fanflow._shared._local import ALONE_AFTER, LocalShare
from fanflow._shared._redis import RedisStore
from fanflow._shared._sqlite import earliest

from .test_shared import redis_url

redis = pytest.importorskip("redis")


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with redis_url(tmp_path) as found:
        yield found


def _keys(ident: str) -> tuple[str, str, str]:
    return tuple(f"fanflow:{{{ident}}}:{k}" for k in ("g", "c", "n"))  # type: ignore[return-value]


def _rows(client: Any, ident: str) -> list[tuple[float, ...]]:
    """The bookings at Redis, in the order Redis keeps them: (at, 4 costs)."""
    g, c, _ = _keys(ident)
    costs = client.hgetall(c)
    out = []
    for member, at in client.zrange(g, 0, -1, withscores=True):
        cost = costs.get(member, b"0 0 0 0").split()
        out.append((float(at), *(float(x) for x in cost)))
    return out


def _expected(
    rows: list[tuple[float, ...]],
    now: float,
    caps: list[float],
    window: float,
    costs: list[list[int]],
    horizon: float,
) -> list[tuple[float, bool]]:
    """(delay, booked) per send, by the rule of every shared store, from the rows
    booked before the message and the store's now."""
    cut = float(f"{now - window:.6f}")
    rows = [r for r in rows if r[0] > cut]
    out: list[tuple[float, bool]] = []
    for i, cost in enumerate(costs):
        t = max(now, earliest(rows, cost, caps, window))
        if t - now > horizon:
            return out + [(t - now, False)] * (len(costs) - i)
        rows.append((t, *cost))
        out.append((t - now, True))
    return out


@pytest.mark.timeout(120)
async def test_redis_books_by_the_scan_rule_through_settles_give_backs_and_expiry(
    url: str,
) -> None:
    # Random messages of 1 to 8 sends, under an rpm and a tpm that bind, windows from
    # 2 ms (the rows booked under a longer one leave it at once: expiry, without a
    # sleep) to 60 s, settlements to other token counts and give-backs of rows in the
    # middle of the window; and the keys lost or written by another version. Each
    # answer must be what the rule gives over the rows at Redis before the message.
    rng = random.Random(27)
    store = RedisStore(url, url)
    client = redis.Redis.from_url(url)
    ident = "differential"
    g, c, n = _keys(ident)
    booked: list[int] = []
    checked = bound = 0
    for step in range(600):
        op = rng.random()
        if op < 0.6 or not booked:
            window = rng.choice([0.002, 0.02, 1.05, 60.0, 60.0])
            horizon = rng.choice([0.05, 1.0, 100.0])
            caps = [
                rng.choice([3.0, 10.0, 40.0, math.inf]),
                rng.choice([200.0, 2000.0, math.inf]),
                rng.choice([math.inf, 500.0]),
                math.inf,
            ]
            costs = [
                # A request costs 1 of the rpm, or 0 from a process that sets no rpm.
                [int(rng.random() < 0.9), rng.randrange(0, 300), rng.randrange(0, 100), 0]
                for _ in range(rng.randrange(1, 9))
            ]
            before = _rows(client, ident)
            now, answers = await store.grant_many(ident, caps, window, costs, horizon)
            want = _expected(before, now, caps, window, costs, horizon)
            assert len(answers) == len(want)
            for (delay, grant), (wanted, ok) in zip(answers, want, strict=True):
                assert abs(delay - wanted) < 1e-5, (step, answers, want)
                assert bool(grant) == ok, (step, answers, want)
                if grant:
                    booked.append(grant)
                bound += delay > 1e-5
            checked += len(answers)
        elif op < 0.9:
            picked = rng.sample(booked, min(len(booked), rng.randrange(1, 4)))
            settles = []
            for grant in picked:
                if rng.random() < 0.4:
                    booked.remove(grant)
                    settles.append((grant, [0, 0, 0, 0]))  # given back
                else:
                    settles.append((grant, [1, rng.randrange(1, 400), 0, rng.randrange(0, 60)]))
            store.settle(ident, settles)
            await store._flush()
        elif op < 0.94:
            client.hdel(c, "sum")  # the sums lost
        elif op < 0.96:
            client.delete(c)  # the costs lost
        elif op < 0.98:
            client.delete(g)  # the bookings lost
        else:
            # A row booked by a script that keeps no sums (another version).
            (at,) = client.time()[:1]
            grant = client.incr(n)
            client.zadd(g, {str(grant): float(at) + rng.random()})
            client.hset(c, str(grant), "1 50 0 0")
            booked.append(grant)
    client.close()
    await store._client.aclose()
    assert checked > 1000
    assert bound > 300  # most sends waited for a cap or the spacing: the rule was exercised


def _fill(client: Any, ident: str, rows: int, span: float) -> None:
    """``rows`` bookings of one request each, spaced evenly over ``span`` seconds around
    Redis's now, written as another version would (no sums: the next grant counts)."""
    g, c, n = _keys(ident)
    seconds, micros = client.time()
    start = seconds + micros / 1e6 - span / 2
    pipe = client.pipeline(transaction=False)
    for i in range(1, rows + 1):
        pipe.zadd(g, {str(i): f"{start + i * span / rows:.6f}"})
        pipe.hset(c, str(i), "1 0 0 0")
    pipe.set(n, rows)
    pipe.execute()


@pytest.mark.timeout(120)
async def test_redis_time_per_grant_does_not_grow_with_the_bookings_in_the_window(
    url: str,
) -> None:
    # A full window of 60 s under an rpm: each grant must leave the oldest row out,
    # and book after it leaves the window. Redis's own time per grant (its slowlog,
    # every command, in microseconds) with 20 bookings in the window and with 20,000.
    # A script that reads every booking takes about 1,000 times longer with 20,000.
    store = RedisStore(url, url)
    client = redis.Redis.from_url(url)
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 1000)
    medians = {}
    for rows in (20, 20_000):
        ident = f"full-{rows}"
        _fill(client, ident, rows, 60.0)
        caps = [float(rows), math.inf, math.inf, math.inf]
        await store.grant_many(ident, caps, 60.0, [[1, 0, 0, 0]], 1000.0)  # counts them once
        client.slowlog_reset()
        for _ in range(25):
            _, answers = await store.grant_many(ident, caps, 60.0, [[1, 0, 0, 0]], 1000.0)
            assert answers[0][1] > 0
            assert answers[0][0] > 20  # booked after an old row leaves the window
        spent = [e["duration"] for e in client.slowlog_get(1000) if b"EVALSHA" in e["command"]]
        assert len(spent) == 25
        medians[rows] = statistics.median(spent)
    client.close()
    await store._client.aclose()
    # The bound is loose (a loaded machine delays Redis itself): the scan it guards
    # against took 750 times as long (148,755 against 199 us), running sums about the same.
    assert medians[20_000] < 20 * medians[20] + 2_000, medians


def test_a_process_ranked_past_the_concurrency_waits_a_bounded_time_for_a_slot() -> None:
    # The local share of a concurrency of 2 among 4 processes: the first two by rank
    # hold a slot, the others none, until the store has been lost ALONE_AFTER (then
    # one: never stuck for ever); nothing is known of a rank: none either.
    shares = [LocalShare([], 4, 1.0, 2, 0.0, 3.0, rank) for rank in (0, 1, 2, 3, None)]
    assert [s.slots_at(3.0) for s in shares] == [1, 1, 0, 0, 0]
    assert [s.may_take(0, 3.0) for s in shares] == [True, True, False, False, False]
    assert [s.slots_at(ALONE_AFTER) for s in shares] == [1, 1, 1, 1, 1]
    assert LocalShare([], 2, 1.0, 4, 0.0, 3.0, None).slots_at(3.0) == 2  # 4 of 2: 2 each
    assert LocalShare([], 4, 1.0, 2, 0.0, 3.0, 0, at_most=0).slots_at(3.0) == 0  # a rejoin's cap
