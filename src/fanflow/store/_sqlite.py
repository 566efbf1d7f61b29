"""The SQLite result store: a cache of responses by key, and a journal of jobs' items.

One file, in WAL mode so that readers never wait for the writer and several processes
can share it. Reads (one indexed lookup per call) run inline on the caller's thread
through their own connection. Writes go to one writer thread (``_writer.py``) that
commits whatever has queued up in one transaction: a caller waits for exactly the
commit that holds its row. The file's tables and their upgrades are in ``_schema.py``,
the rows in ``_rows.py``; docs/decisions/0030-store-sqlite-writer-thread.md says why.

``synchronous=NORMAL`` in WAL mode keeps every committed transaction across a crash of
the process (SIGKILL included); only a power cut may lose the last few commits. Pass
``durability="full"`` to fsync each commit as well.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._exceptions import ConfigError, StoreError
from .._types import CallRecord, Response, Status
from ._base import ItemInfo, ItemRef, JobInfo
from ._lock import JobLock
from ._rows import (
    FINISH_JOB,
    INSERT_CALL,
    SELECT_CALL,
    SELECT_ITEMS,
    UPSERT_JOB,
    call_row,
    item_op,
    requeues,
    usage_of,
)
from ._schema import connect, describe
from ._writer import Op, Waiter, Writer

__all__ = ["DEFAULT_PATH", "ItemInfo", "JobInfo", "Store", "StoreStatistics"]

DEFAULT_PATH = Path(".fanflow") / "store.db"


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Counters of one :class:`Store` since it was opened."""

    path: str
    hits: int
    misses: int
    rows_written: int
    commits: int
    queued: int
    largest_commit: int
    writer_seconds: float


_OPEN: weakref.WeakSet[Store] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - runs at interpreter exit
    for store in list(_OPEN):
        with contextlib.suppress(StoreError):
            store.close()


class Store:
    """A result store in one SQLite file: cached responses by key, and jobs' items.

    Pass it to a pattern (``fanflow.map(..., store=store)``): every call is looked up
    first (a hit costs nothing) and every completed call is committed before it is
    reported. With ``job="name"`` the store also records each item's terminal status,
    so running the same job again resumes it, after a crash too. A job runs once at a
    time: a run holds the job's lock (:meth:`lock_job`), and a second run of it, in this
    or another process, is refused with a :class:`StoreError` naming the first.

    Args:
        path: the database file (default ``.fanflow/store.db`` under the current
            folder; its folder is created).
        timeout: seconds to wait for another process's lock before failing.
        durability: ``"normal"`` keeps every commit across a process crash (WAL with
            ``synchronous=NORMAL``); ``"full"`` also survives a power cut, for a slower
            commit.
        max_batch: the most queued writes committed in one transaction.

    Raises:
        StoreError: the file is damaged, locked or cannot be written; the message names
            the file and what to do.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 30.0,
        durability: Literal["normal", "full"] = "normal",
        max_batch: int = 1024,
    ) -> None:
        if durability not in ("normal", "full"):
            raise ConfigError(f"durability must be 'normal' or 'full', got {durability!r}")
        if timeout < 0:
            raise ConfigError(f"timeout must be >= 0 seconds, got {timeout}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.path = Path(path) if path is not None else DEFAULT_PATH
        self.timeout = timeout
        self._options = (durability, max_batch)
        self._hits = 0
        self._misses = 0
        self._closed = False
        self._read_lock = threading.Lock()
        self._locks: set[JobLock] = set()  # held until released or the store closes
        sync = "NORMAL" if durability == "normal" else "FULL"
        writer_conn = connect(self.path, timeout, sync, create=True)
        try:
            self._reader = connect(self.path, timeout, sync, create=False)
        except BaseException:
            writer_conn.close()
            raise
        self._writer = Writer(writer_conn, self.path, max_batch)
        _OPEN.add(self)

    def __repr__(self) -> str:
        return f"fanflow.Store({str(self.path)!r})"

    @property
    def location(self) -> str:
        """The database file, for messages (``JobStore.location``)."""
        return str(self.path)

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy in another process (a Ray worker) opens the same file.
        durability, max_batch = self._options
        return (_reopen, (str(self.path), self.timeout, durability, max_batch))

    def lock_job(self, name: str) -> JobLock:
        """Take the lock of job ``name`` for a run (released by ``release()`` or close).

        Raises:
            StoreError: another run of the job (in this or another process) holds it;
                the message names the process.
        """
        self._check_open()
        lock = JobLock(self.path, name)
        lock.acquire()
        self._locks = {held for held in self._locks if held.held}
        self._locks.add(lock)
        return lock

    # -- reading ---------------------------------------------------------------------

    def _read(self, sql: str, params: tuple[Any, ...], doing: str) -> list[Any]:
        self._check_open()
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise describe(self.path, exc, doing) from None

    def lookup(self, key: str) -> Response | None:
        """The stored response for a cache key, or None (counted as a hit or a miss)."""
        rows = self._read(SELECT_CALL, (key,), "looking up a stored result")
        if not rows:
            self._misses += 1
            return None
        self._hits += 1
        text, model, finish, n_in, n_out, estimated, cost, latency, ttft, *cache = rows[0]
        return Response(
            text,
            usage=usage_of(n_in, n_out, bool(estimated), cache),
            model=model,
            finish_reason=finish,
            latency=latency,
            cost=cost,
            time_to_first_token=ttft,
        )

    def jobs(self) -> list[JobInfo]:
        """Every job in the store, most recently run first."""
        rows = self._read(
            "SELECT name FROM jobs ORDER BY updated DESC, name", (), "listing its jobs"
        )
        return [info for (name,) in rows if (info := self.job(name)) is not None]

    def job(self, name: str) -> JobInfo | None:
        """A job's progress, or None if the store has no job of that name."""
        rows = self._read(
            "SELECT total, runs, created, updated FROM jobs WHERE name = ?",
            (name,),
            f"reading job {name!r}",
        )
        if not rows:
            return None
        total, runs, created, updated = rows[0]
        counts = self._read(
            "SELECT status, count(*) FROM items WHERE job = ? GROUP BY status",
            (name,),
            f"reading job {name!r}",
        )
        return JobInfo(name, total, runs, created, updated, {Status(s): n for s, n in counts})

    def items(self, job: str, *, status: Status | Iterable[Status] | None = None) -> list[ItemInfo]:
        """A job's items as last recorded, in index order; optionally only some statuses.

        ``store.items("labels", status=fanflow.Status.FAILED)`` lists the failures.
        """
        sql = SELECT_ITEMS
        params: tuple[Any, ...] = (job,)
        if status is not None:
            wanted = [status] if isinstance(status, Status) else list(status)
            sql += f" AND status IN ({','.join('?' * len(wanted))})"
            params += tuple(Status(s).value for s in wanted)
        rows = self._read(sql + " ORDER BY idx", params, f"reading the items of job {job!r}")
        return [
            ItemInfo(
                index=r[0],
                input_id=r[1],
                key=r[2],
                status=Status(r[3]),
                error_type=r[4],
                error=r[5],
                cached=bool(r[6]),
                usage=usage_of(r[7], r[8], False, r[13:16]),
                cost=r[9],
                updated=r[10],
                requeues=r[11],
                note=r[12],
            )
            for r in rows
        ]

    def statistics(self) -> StoreStatistics:
        """Lookups, hits and writes so far."""
        w = self._writer
        return StoreStatistics(
            path=str(self.path),
            hits=self._hits,
            misses=self._misses,
            rows_written=w.rows,
            commits=w.commits,
            queued=w.queue.qsize(),
            largest_commit=w.largest,
            writer_seconds=w.busy,
        )

    # -- writing ---------------------------------------------------------------------

    async def _commit(self, ops: list[Op]) -> None:
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._writer.submit(ops, Waiter(loop=loop, future=future))
        # A caller cancelled while waiting cancels only this future: the write stays
        # queued and still lands (close() waits for it), so nothing finished is lost.
        await future

    async def save(self, record: CallRecord[Any], *, key: str, item: ItemRef | None) -> None:
        """Commit a call's response under ``key`` (unless it came from the store) and,
        for a job, the item's terminal status; return once both are committed."""
        ops: list[Op] = []
        now = time.time()
        response = record.response
        if response is not None and not record.cached:
            request = record.request
            model = request.model if request is not None else None
            row = call_row(
                key, model, response, record.latency, len(record.attempts), now, requeues(record)
            )
            ops.append((INSERT_CALL, row))
        if item is not None:
            ops.append(item_op(record, item, key, now))
        if ops:
            await self._commit(ops)

    # -- the batch journal (backends/_batch.py) ---------------------------------------

    def batch_of(self, key: str) -> tuple[str, str] | None:
        """The provider batch a request was last submitted in, and whether its answer
        is stored (``"done"``) or still awaited (``"submitted"``); None if none."""
        rows = self._read(
            "SELECT batch_id, state FROM batch_items WHERE key = ?",
            (key,),
            "looking up a batched request",
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def record_batch(self, batch_id: str, provider: str, keys: Iterable[str]) -> None:
        """Commit a submitted batch and the requests in it (before anything else)."""
        now = time.time()
        items: list[Op] = [
            ("INSERT OR REPLACE INTO batch_items VALUES (?,?,?,?)", (k, batch_id, "submitted", now))
            for k in keys
        ]
        ops: list[Op] = [
            (
                "INSERT OR REPLACE INTO batches VALUES (?,?,?,?,?,?)",
                (batch_id, provider, "submitted", len(items), now, now),
            ),
            *items,
        ]
        await self._commit(ops)

    async def settle_batch(
        self,
        batch_id: str,
        status: str,
        answered: Iterable[tuple[str, str | None, Response]],
        unanswered: Iterable[str],
    ) -> None:
        """Commit an ended batch: its answers (``(key, model, response)``) are stored like
        any call's; its unanswered requests leave the journal (they will be sent again)."""
        now = time.time()
        ops: list[Op] = []
        for key, model, response in answered:
            ops.append((INSERT_CALL, call_row(key, model, response, None, 1, now)))
            ops.append(
                (
                    "UPDATE batch_items SET state = 'done', updated = ? WHERE key = ? "
                    "AND batch_id = ?",
                    (now, key, batch_id),
                )
            )
        for key in unanswered:
            ops.append(("DELETE FROM batch_items WHERE key = ? AND batch_id = ?", (key, batch_id)))
        ops.append(
            ("UPDATE batches SET status = ?, updated = ? WHERE id = ?", (status, now, batch_id))
        )
        await self._commit(ops)

    async def save_item(self, record: CallRecord[Any], item: ItemRef) -> None:
        """Commit the terminal status of a job item that made no call (a bad input)."""
        await self._commit([item_op(record, item, None, time.time())])

    async def start_job(self, name: str, total: int | None) -> dict[int, tuple[Status, str | None]]:
        """Record a run of job ``name``; return its items' last status and cache key."""
        now = time.time()
        await self._commit([(UPSERT_JOB, (name, total, now, now))])
        rows = self._read(
            "SELECT idx, status, key FROM items WHERE job = ?", (name,), f"reading job {name!r}"
        )
        return {idx: (Status(status), key) for idx, status, key in rows}

    async def finish_job(self, name: str, total: int) -> None:
        """Record that a run of job ``name`` saw all ``total`` inputs."""
        await self._commit([(FINISH_JOB, (total, time.time(), name))])

    async def read_capacity(self, ident: str) -> tuple[dict[str, float], float] | None:
        """What a job's handle learnt of its server under the limit identity ``ident``
        (``Lane.learnt``), and its age in seconds; None: nothing kept."""
        rows = self._read(
            "SELECT learnt, at FROM capacity WHERE ident = ?",
            (ident,),
            "reading what a job learnt of its server",
        )
        if not rows:
            return None
        learnt, at = rows[0]
        return json.loads(learnt), max(0.0, time.time() - at)

    async def keep_capacity(self, ident: str, learnt: dict[str, float]) -> None:
        """Keep what a job's handle learnt of its server, for the job's next run."""
        row = (ident, json.dumps(learnt), time.time())
        await self._commit([("INSERT OR REPLACE INTO capacity VALUES (?, ?, ?)", row)])

    def flush(self) -> None:
        """Block until every write queued so far is committed.

        Raises:
            StoreError: a queued write failed.
        """
        if self._closed:
            return
        event = threading.Event()
        self._writer.submit([], Waiter(event=event))
        event.wait()
        error, self._writer.error = self._writer.error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Commit what is queued, stop the writer and close the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        for lock in list(self._locks):
            lock.release()
        self._writer.stop()
        with self._read_lock:
            self._reader.close()

    async def aclose(self) -> None:
        """Like :meth:`close`, without blocking the event loop while the queue drains."""
        await asyncio.to_thread(self.close)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(
                f"the fanflow store {self.path} is closed; open a new fanflow.Store(...)",
                path=str(self.path),
            )

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _reopen(path: str, timeout: float, durability: Any, max_batch: int) -> Store:
    return Store(path, timeout=timeout, durability=durability, max_batch=max_batch)
