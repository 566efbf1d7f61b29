"""The embedded shared store: one SQLite file for the processes of one machine.

Every update is one short ``BEGIN IMMEDIATE`` transaction, so processes take turns at
the file's write lock, and each reads the time (``time.time()``) while it holds that
lock. That is the store's clock: on one machine every process reads the same clock, and
holding the lock orders the readings with the bookings, so no process books against a
time older than another's booking. (A wall-clock step, an NTP correction, moves every
process at once; it can shift bookings by the step, never split them.)

Calls run on one thread per process (SQLite connections belong to a thread): the event
loop never waits on the file lock, and the fire-and-forget updates (settle, release)
still run when the loop that asked for them has closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .._exceptions import ConfigError

__all__ = ["SQLiteStore", "earliest"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ident TEXT NOT NULL, at REAL NOT NULL,
    c0 INTEGER NOT NULL, c1 INTEGER NOT NULL, c2 INTEGER NOT NULL, c3 INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS grants_at ON grants (ident, at);
CREATE TABLE IF NOT EXISTS slots (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ident TEXT NOT NULL, holder TEXT NOT NULL,
    expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS slots_ident ON slots (ident, expires);
CREATE TABLE IF NOT EXISTS capacity (
    ident TEXT PRIMARY KEY, body TEXT NOT NULL, at REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS declared (
    ident TEXT NOT NULL, holder TEXT NOT NULL, body TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (ident, holder));
"""

# A booking may go at the instant the one it waits for leaves the window, plus this.
_TICK = 1e-6


def earliest(
    rows: Sequence[Sequence[float]], cost: Sequence[int], caps: Sequence[float], window: float
) -> float:
    """The earliest time after the last booking (``rows``: (at, c0..c3) in time order,
    all in the window) at which a send of ``cost`` keeps every ``window`` seconds
    within ``caps`` (per rate; inf: none). -inf when nothing is booked.

    Sends are also spaced evenly, the last one's cost at the rate of ``caps``, so a
    process can start its sends within their lease (decision 0200)."""
    t = rows[-1][0] if rows else -math.inf
    for k, cap in enumerate(caps):
        if math.isinf(cap):
            continue
        if rows:
            t = max(t, rows[-1][0] + rows[-1][k + 1] * window / cap)
        if not cost[k]:
            continue
        total = cost[k] + sum(row[k + 1] for row in rows)
        i = 0
        while total > cap and i < len(rows):
            total -= rows[i][k + 1]
            i += 1
        if i:
            t = max(t, rows[i - 1][0] + window + _TICK)
    return t


class SQLiteStore:
    """Bookings, slots and declared limits of every identity in one SQLite file."""

    def __init__(self, path: str, shown: str) -> None:
        self.shown = shown
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fanflow-sqlite")
        try:
            self._db = self._pool.submit(self._connect, path).result()
        except sqlite3.Error as exc:
            raise ConfigError(f"shared limits: cannot open {shown!r}: {exc}") from None
        self.round_trips = 0

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        self.round_trips += 1
        return await asyncio.wrap_future(self._pool.submit(self._txn, fn, *args))

    def _later(self, fn: Callable[..., Any], *args: Any) -> None:
        self.round_trips += 1
        self._pool.submit(self._txn, fn, *args)

    def _txn(self, fn: Callable[..., T], *args: Any) -> T:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db, time.time(), *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # -- declared limits ----------------------------------------------------------------

    async def declare(
        self, ident: str, holder: str, body: dict[str, Any], ttl: float
    ) -> dict[str, tuple[float, dict[str, Any]]]:
        """Record this holder's limits for ``ident`` (for ``ttl``); return every live
        holder's (this one's too): its first time and its limits."""
        return await self._run(_declare, ident, holder, body, ttl)

    # -- rates ----------------------------------------------------------------------------

    async def grant_many(
        self,
        ident: str,
        caps: list[float],
        window: float,
        costs: list[list[int]],
        horizon: float,
    ) -> tuple[float, list[tuple[float, int]]]:
        return await self._run(_grant_many, ident, caps, window, costs, horizon)

    def settle(self, ident: str, settles: list[tuple[int, list[int]]]) -> None:
        self._later(_settle, settles)

    # -- concurrency ------------------------------------------------------------------

    async def try_slot(self, ident: str, holder: str, limit: int, ttl: float) -> int:
        return await self._run(_try_slot, ident, holder, limit, ttl)

    def release(self, ident: str, slot: int) -> None:
        self._later(_release, slot)

    async def renew(self, ident: str, slots: list[int], ttl: float) -> None:
        await self._run(_renew, slots, ttl)

    async def adopt(self, ident: str, old: list[int], count: int, ttl: float) -> list[int]:
        """Take ``count`` slots whatever the limit, in place of the slots ``old``."""
        return await self._run(_adopt, ident, old, count, ttl)

    # -- capacity learnt ---------------------------------------------------------------

    def publish_capacity(self, ident: str, learnt: dict[str, float], keep: float) -> None:
        """Keep what a lane learnt of the server for ``keep`` seconds (fire and forget)."""
        self._later(_publish, ident, json.dumps(learnt), keep)

    async def read_capacity(self, ident: str) -> tuple[dict[str, float], float] | None:
        """(what was learnt, its age in seconds), or None: nothing kept."""
        return await self._run(_read, ident)


def _declare(
    db: sqlite3.Connection, now: float, ident: str, holder: str, body: dict[str, Any], ttl: float
) -> dict[str, tuple[float, dict[str, Any]]]:
    """A holder's first time (``since`` in its body) is the store's now when it declared
    with no live declaration, kept while it renews (decision 0309)."""
    db.execute("DELETE FROM declared WHERE expires <= ?", (now,))
    row = db.execute(
        "SELECT body FROM declared WHERE ident = ? AND holder = ?", (ident, holder)
    ).fetchone()
    since = json.loads(row[0]).get("since", now) if row else now
    db.execute(
        "INSERT OR REPLACE INTO declared VALUES (?, ?, ?, ?)",
        (ident, holder, json.dumps({**body, "since": since}), now + ttl),
    )
    rows = db.execute("SELECT holder, body FROM declared WHERE ident = ?", (ident,)).fetchall()
    out: dict[str, tuple[float, dict[str, Any]]] = {}
    for name, text in rows:
        found = json.loads(text)
        out[name] = (float(found.pop("since", -math.inf)), found)  # none: an older version's
    return out


def _grant_many(
    db: sqlite3.Connection,
    now: float,
    ident: str,
    caps: list[float],
    window: float,
    costs: list[list[int]],
    horizon: float,
) -> tuple[float, list[tuple[float, int]]]:
    """(the store's now, (delay, grant id) per send: id 0 when not booked)."""
    db.execute("DELETE FROM grants WHERE ident = ? AND at <= ?", (ident, now - window))
    rows: list[tuple[float, ...]] = db.execute(
        "SELECT at, c0, c1, c2, c3 FROM grants WHERE ident = ? ORDER BY at, id", (ident,)
    ).fetchall()
    answers: list[tuple[float, int]] = []
    for i, cost in enumerate(costs):
        t = max(now, earliest(rows, cost, caps, window))
        if t - now > horizon:
            answers.extend([(t - now, 0)] * (len(costs) - i))
            break
        cur = db.execute(
            "INSERT INTO grants (ident, at, c0, c1, c2, c3) VALUES (?, ?, ?, ?, ?, ?)",
            (ident, t, *cost),
        )
        rows.append((t, *cost))
        answers.append((t - now, int(cur.lastrowid or 0)))
    return now, answers


def _settle(db: sqlite3.Connection, now: float, grant: int, costs: list[int]) -> None:
    if not any(costs):
        db.execute("DELETE FROM grants WHERE id = ?", (grant,))
    else:
        db.execute("UPDATE grants SET c0 = ?, c1 = ?, c2 = ?, c3 = ? WHERE id = ?", (*costs, grant))


def _try_slot(
    db: sqlite3.Connection, now: float, ident: str, holder: str, limit: int, ttl: float
) -> int:
    db.execute("DELETE FROM slots WHERE ident = ? AND expires <= ?", (ident, now))
    (taken,) = db.execute("SELECT COUNT(*) FROM slots WHERE ident = ?", (ident,)).fetchone()
    if taken >= limit:
        return 0
    cur = db.execute(
        "INSERT INTO slots (ident, holder, expires) VALUES (?, ?, ?)", (ident, holder, now + ttl)
    )
    return int(cur.lastrowid or 0)


def _release(db: sqlite3.Connection, now: float, slot: int) -> None:
    db.execute("DELETE FROM slots WHERE id = ?", (slot,))


def _renew(db: sqlite3.Connection, now: float, slots: list[int], ttl: float) -> None:
    db.executemany("UPDATE slots SET expires = ? WHERE id = ?", [(now + ttl, s) for s in slots])


def _adopt(
    db: sqlite3.Connection, now: float, ident: str, old: list[int], count: int, ttl: float
) -> list[int]:
    db.executemany("DELETE FROM slots WHERE id = ?", [(s,) for s in old])
    insert = "INSERT INTO slots (ident, holder, expires) VALUES (?, '', ?)"
    return [int(db.execute(insert, (ident, now + ttl)).lastrowid or 0) for _ in range(count)]


def _publish(db: sqlite3.Connection, now: float, ident: str, body: str, keep: float) -> None:
    row = (ident, body, now, now + keep)
    db.execute("INSERT OR REPLACE INTO capacity VALUES (?, ?, ?, ?)", row)


def _read(db: sqlite3.Connection, now: float, ident: str) -> tuple[dict[str, float], float] | None:
    row = db.execute(
        "SELECT body, at FROM capacity WHERE ident = ? AND expires > ?", (ident, now)
    ).fetchone()
    return None if row is None else (json.loads(row[0]), max(0.0, now - row[1]))
