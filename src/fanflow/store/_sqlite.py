"""The SQLite result store: a cache of responses by key, and a journal of jobs' items.

One file, in WAL mode so that readers never wait for the writer and several processes
can share it. Reads (one indexed lookup per call) run inline on the caller's thread
through their own connection. Writes go to one writer thread that commits whatever has
queued up in one transaction ("group commit", as databases do with their logs): under
load, thousands of calls share a handful of commits, and a caller waits for exactly the
commit that holds its row. The measurements are in
docs/decisions/0030-store-sqlite-writer-thread.md.

``synchronous=NORMAL`` in WAL mode keeps every committed transaction across a crash of
the process (SIGKILL included); only a power cut may lose the last few commits. Pass
``durability="full"`` to fsync each commit as well.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._exceptions import ConfigError, StoreError
from .._types import CallRecord, Response, Status, Usage
from ._base import ItemInfo, ItemRef, JobInfo
from ._lock import JobLock

__all__ = ["DEFAULT_PATH", "ItemInfo", "JobInfo", "Store", "StoreStatistics"]

DEFAULT_PATH = Path(".fanflow") / "store.db"

SCHEMA_VERSION = 4

# What each version added to a store written by the one before it; _migrate runs the
# steps a store lacks, so a store from an earlier fanflow opens and keeps its rows.
# 2: the batch tables (in _SCHEMA, created if missing). 3: requeued 429s and the last
# attempt's note (Attempt.requeued/note). 4: the prompt cache's counts (Usage's
# cached_input_tokens, cache_write_input_tokens, cache_write_1h_input_tokens).
_ADDED_COLUMNS: dict[int, tuple[str, ...]] = {
    3: (
        "ALTER TABLE calls ADD COLUMN requeues INTEGER NOT NULL DEFAULT 0;",
        "ALTER TABLE items ADD COLUMN requeues INTEGER NOT NULL DEFAULT 0;",
        "ALTER TABLE items ADD COLUMN note TEXT;",
    ),
    4: (
        "ALTER TABLE calls ADD COLUMN cached_input_tokens INTEGER NOT NULL DEFAULT 0;",
        "ALTER TABLE calls ADD COLUMN cache_write_input_tokens INTEGER NOT NULL DEFAULT 0;",
        "ALTER TABLE calls ADD COLUMN cache_write_1h_input_tokens INTEGER NOT NULL DEFAULT 0;",
        "ALTER TABLE items ADD COLUMN cached_input_tokens INTEGER NOT NULL DEFAULT 0;",
        "ALTER TABLE items ADD COLUMN cache_write_input_tokens INTEGER NOT NULL DEFAULT 0;",
        "ALTER TABLE items ADD COLUMN cache_write_1h_input_tokens INTEGER NOT NULL DEFAULT 0;",
    ),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    model TEXT,
    text TEXT NOT NULL,
    response_model TEXT,
    finish_reason TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    usage_estimated INTEGER NOT NULL,
    cost REAL,
    latency REAL,
    time_to_first_token REAL,
    duration REAL,
    attempts INTEGER NOT NULL,
    created REAL NOT NULL,
    requeues INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_1h_input_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    total INTEGER,
    runs INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    job TEXT NOT NULL,
    idx INTEGER NOT NULL,
    input_id TEXT,
    key TEXT,
    status TEXT NOT NULL,
    error_type TEXT,
    error TEXT,
    cached INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL,
    updated REAL NOT NULL,
    requeues INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_1h_input_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    status TEXT NOT NULL,
    requests INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    key TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    state TEXT NOT NULL,
    updated REAL NOT NULL
) WITHOUT ROWID;
"""

_INSERT_CALL = (
    "INSERT OR REPLACE INTO calls (key, model, text, response_model, finish_reason, "
    "input_tokens, output_tokens, usage_estimated, cost, latency, time_to_first_token, "
    "duration, attempts, created, requeues, cached_input_tokens, cache_write_input_tokens, "
    "cache_write_1h_input_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_ITEM = (
    "INSERT OR REPLACE INTO items (job, idx, input_id, key, status, error_type, error, "
    "cached, input_tokens, output_tokens, cost, updated, requeues, note, cached_input_tokens, "
    "cache_write_input_tokens, cache_write_1h_input_tokens) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_SELECT_CALL = (
    "SELECT text, response_model, finish_reason, input_tokens, output_tokens, "
    "usage_estimated, cost, latency, time_to_first_token, cached_input_tokens, "
    "cache_write_input_tokens, cache_write_1h_input_tokens FROM calls WHERE key = ?"
)
_UPSERT_JOB = (
    "INSERT INTO jobs (name, total, runs, created, updated) VALUES (?, ?, 1, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET runs = runs + 1, updated = excluded.updated, "
    "total = coalesce(excluded.total, total)"
)
_FINISH_JOB = "UPDATE jobs SET total = ?, updated = ? WHERE name = ?"

# Errors are kept short: the whole message is in the record; the store keeps a summary.
_MAX_ERROR_CHARS = 2000

Op = tuple[str, tuple[Any, ...]]


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


def _describe(path: Path, exc: BaseException, doing: str) -> StoreError:
    """A clear error for a failed store operation: which file, what happened, what to do."""
    text = str(exc)
    low = text.lower()
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        message = (
            f"the fanflow store {path} is damaged or not a SQLite database ({text}) while "
            f"{doing}; move it aside (or delete it) to start a new store, or pass another "
            "path to fanflow.Store(...)"
        )
    elif "locked" in low or "busy" in low:
        message = (
            f"the fanflow store {path} is locked by another process ({text}) while "
            f"{doing}; wait for it to finish, raise fanflow.Store(..., timeout=) to wait "
            "longer, or use another path"
        )
    elif (
        "readonly" in low
        or "read-only" in low
        or "unable to open" in low
        or (isinstance(exc, OSError))
    ):
        message = (
            f"the fanflow store {path} cannot be written ({text}) while {doing}; check that "
            "its folder exists and is writable, or pass another path to fanflow.Store(...)"
        )
    elif "full" in low or "disk i/o" in low:
        message = (
            f"the fanflow store {path} could not be written ({text}) while {doing}; free "
            "disk space or move the store to another disk"
        )
    else:
        message = f"the fanflow store {path} failed while {doing}: {type(exc).__name__}: {text}"
    error = StoreError(message, path=str(path))
    error.__cause__ = exc
    return error


class _Waiter:
    """Someone waiting for a commit: an asyncio future (with its loop) or a thread."""

    __slots__ = ("event", "future", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[None] | None = None,
        event: threading.Event | None = None,
    ) -> None:
        self.loop = loop
        self.future = future
        self.event = event


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # the caller was cancelled while waiting: nothing to tell
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class _Writer:
    """One thread that commits queued writes in batches and wakes their waiters."""

    def __init__(self, conn: sqlite3.Connection, path: Path, max_batch: int) -> None:
        self.conn = conn
        self.path = path
        self.max_batch = max_batch
        self.queue: queue.SimpleQueue[tuple[list[Op], _Waiter] | None] = queue.SimpleQueue()
        self.rows = 0
        self.commits = 0
        self.largest = 0
        self.busy = 0.0
        self.error: StoreError | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"fanflow-store-writer:{path.name}", daemon=True
        )
        self.thread.start()

    def submit(self, ops: list[Op], waiter: _Waiter) -> None:
        self.queue.put((ops, waiter))

    def _run(self) -> None:
        get = self.queue.get
        get_nowait = self.queue.get_nowait
        while True:
            first = get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    entry = get_nowait()
                except queue.Empty:
                    break
                if entry is None:
                    stop = True
                    break
                batch.append(entry)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[list[Op], _Waiter]]) -> None:
        began = time.perf_counter()
        error: StoreError | None = None
        ops = [op for entry in batch for op in entry[0]]
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                # Consecutive rows of one statement go in one executemany.
                i = 0
                while i < len(ops):
                    sql = ops[i][0]
                    j = i + 1
                    while j < len(ops) and ops[j][0] == sql:
                        j += 1
                    self.conn.executemany(sql, [op[1] for op in ops[i:j]])
                    i = j
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            error = _describe(self.path, exc, f"committing {len(ops)} rows")
        else:
            self.rows += len(ops)
            self.commits += 1
            self.largest = max(self.largest, len(ops))
        self.busy += time.perf_counter() - began
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, waiter in batch:
            if waiter.event is not None:
                self.error = error or self.error
                waiter.event.set()
            elif waiter.loop is not None and waiter.future is not None:
                by_loop.setdefault(waiter.loop, []).append(waiter.future)
        for loop, futures in by_loop.items():
            # A closed loop raises RuntimeError: nobody there is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, futures, error)


class _Busy(Exception):
    """Another process held a lock SQLite would not wait for; opening is retried."""

    def __init__(self, error: sqlite3.Error) -> None:
        super().__init__(str(error))
        self.error = error


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


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
        writer_conn = self._connect(sync, create=True)
        try:
            self._reader = self._connect(sync, create=False)
        except BaseException:
            writer_conn.close()
            raise
        self._writer = _Writer(writer_conn, self.path, max_batch)
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

    # -- opening ---------------------------------------------------------------------

    def _connect(self, synchronous: str, *, create: bool) -> sqlite3.Connection:
        """Open a connection in WAL mode (creating the schema first), waiting up to
        ``timeout`` seconds for other processes.

        SQLite's busy timeout does not cover all of opening: switching a new file to WAL
        upgrades a read lock to a write lock, and SQLite answers "database is locked" at
        once there rather than risk a deadlock (its busy handler is not called for that
        upgrade). Two processes creating the same store at once hit exactly this, so the
        whole opening is retried here until the timeout.
        """
        deadline = time.monotonic() + self.timeout
        pause = 0.005
        while True:
            try:
                return self._connect_once(synchronous, create=create)
            except _Busy as busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _describe(self.path, busy.error, "opening it") from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.1)

    def _connect_once(self, synchronous: str, *, create: bool) -> sqlite3.Connection:
        path = self.path
        conn: sqlite3.Connection | None = None
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"the fanflow store {path} could not switch to WAL mode (got {mode}); "
                    "put it on a local disk (network file systems do not support WAL)",
                    path=str(path),
                )
            conn.execute(f"PRAGMA synchronous={synchronous}")
            if create:
                self._migrate(conn)
            return conn
        except StoreError:
            if conn is not None:
                conn.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                raise _Busy(exc) from None
            raise _describe(path, exc, "opening it") from None

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

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the fanflow store {self.path} was written by a newer fanflow (schema "
                f"{version}, this one knows {SCHEMA_VERSION}); upgrade fanflow or use "
                "another path",
                path=str(self.path),
            )
        if version == SCHEMA_VERSION:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Read again under the write lock: another process may have upgraded the
            # file meanwhile, and ALTER TABLE must run once.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                # A new file (version 0) gets the whole schema; an older store gets the
                # tables and columns added since its version.
                for sql in _SCHEMA.split(";"):
                    if sql.strip():
                        conn.execute(sql)
                for step, sqls in sorted(_ADDED_COLUMNS.items()):
                    if 0 < version < step:
                        for sql in sqls:
                            conn.execute(sql)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- reading ---------------------------------------------------------------------

    def _read(self, sql: str, params: tuple[Any, ...], doing: str) -> list[Any]:
        self._check_open()
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _describe(self.path, exc, doing) from None

    def lookup(self, key: str) -> Response | None:
        """The stored response for a cache key, or None (counted as a hit or a miss)."""
        rows = self._read(_SELECT_CALL, (key,), "looking up a stored result")
        if not rows:
            self._misses += 1
            return None
        self._hits += 1
        text, model, finish, n_in, n_out, estimated, cost, latency, ttft, *cache = rows[0]
        return Response(
            text,
            usage=_usage(n_in, n_out, bool(estimated), cache),
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
        sql = (
            "SELECT idx, input_id, key, status, error_type, error, cached, input_tokens, "
            "output_tokens, cost, updated, requeues, note, cached_input_tokens, "
            "cache_write_input_tokens, cache_write_1h_input_tokens FROM items WHERE job = ?"
        )
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
                usage=_usage(r[7], r[8], False, r[13:16]),
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
        self._writer.submit(ops, _Waiter(loop=loop, future=future))
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
            row = _call_row(
                key, model, response, record.latency, len(record.attempts), now, _requeues(record)
            )
            ops.append((_INSERT_CALL, row))
        if item is not None:
            ops.append(_item_op(record, item, key, now))
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
            ops.append((_INSERT_CALL, _call_row(key, model, response, None, 1, now)))
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
        await self._commit([_item_op(record, item, None, time.time())])

    async def start_job(self, name: str, total: int | None) -> dict[int, tuple[Status, str | None]]:
        """Record a run of job ``name``; return its items' last status and cache key."""
        now = time.time()
        await self._commit([(_UPSERT_JOB, (name, total, now, now))])
        rows = self._read(
            "SELECT idx, status, key FROM items WHERE job = ?", (name,), f"reading job {name!r}"
        )
        return {idx: (Status(status), key) for idx, status, key in rows}

    async def finish_job(self, name: str, total: int) -> None:
        """Record that a run of job ``name`` saw all ``total`` inputs."""
        await self._commit([(_FINISH_JOB, (total, time.time(), name))])

    def flush(self) -> None:
        """Block until every write queued so far is committed.

        Raises:
            StoreError: a queued write failed.
        """
        if self._closed:
            return
        event = threading.Event()
        self._writer.submit([], _Waiter(event=event))
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
        writer = self._writer
        writer.queue.put(None)
        writer.thread.join()
        writer.conn.close()
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


def _call_row(
    key: str,
    model: str | None,
    response: Response,
    duration: float | None,
    attempts: int,
    now: float,
    requeues: int = 0,
) -> tuple[Any, ...]:
    usage = response.usage if response.usage is not None else Usage()
    return (
        key,
        model,
        response.text,
        response.model,
        response.finish_reason,
        usage.input_tokens,
        usage.output_tokens,
        int(usage.estimated),
        response.cost,
        response.latency,
        response.time_to_first_token,
        duration,
        attempts,
        now,
        requeues,
        *_cache_counts(usage),
    )


def _item_op(record: CallRecord[Any], item: ItemRef, key: str | None, now: float) -> Op:
    error = record.error
    message = None
    if error is not None:
        message = str(error)
        if len(message) > _MAX_ERROR_CHARS:
            message = message[:_MAX_ERROR_CHARS] + "..."
    return (
        _INSERT_ITEM,
        (
            item.job,
            item.index,
            item.input_id,
            key,
            record.status.value,
            type(error).__name__ if error is not None else None,
            message,
            int(record.cached),
            record.usage.input_tokens,
            record.usage.output_tokens,
            record.cost,
            now,
            _requeues(record),
            _last_note(record),
            *_cache_counts(record.usage),
        ),
    )


def _usage(n_in: int, n_out: int, estimated: bool, cache: Sequence[int]) -> Usage:
    """A row's usage: its token counts and the prompt cache's three columns."""
    read, written, hour = cache
    return Usage(
        n_in,
        n_out,
        estimated,
        cached_input_tokens=read,
        cache_write_input_tokens=written,
        cache_write_1h_input_tokens=hour,
    )


def _cache_counts(usage: Usage) -> tuple[int, int, int]:
    """The prompt cache's columns of a row."""
    return (
        usage.cached_input_tokens,
        usage.cache_write_input_tokens,
        usage.cache_write_1h_input_tokens,
    )


def _requeues(record: CallRecord[Any]) -> int:
    return sum(a.requeued for a in record.attempts)


def _last_note(record: CallRecord[Any]) -> str | None:
    """The latest attempt's note (why its wait was what it was), if any says one."""
    note = next((a.note for a in reversed(record.attempts) if a.note), None)
    return None if note is None else note[:_MAX_ERROR_CHARS]
