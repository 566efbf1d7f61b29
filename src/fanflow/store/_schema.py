"""The SQLite store's file: its tables, opening it in WAL mode, upgrading an older one.

A new file gets the whole schema; a file from an earlier fanflow gets the tables and
columns added since its version (``PRAGMA user_version``), so it opens and keeps its
rows (docs/decisions/0155-store-schema-upgrades-in-place.md).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from .._exceptions import StoreError

__all__ = ["SCHEMA_VERSION", "connect", "describe"]

SCHEMA_VERSION = 5

# The statements each version adds to a store of the version before it (the tables
# 2 and 5 added are in _SCHEMA, created if missing).
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
CREATE TABLE IF NOT EXISTS capacity (
    ident TEXT PRIMARY KEY,
    learnt TEXT NOT NULL,
    at REAL NOT NULL
) WITHOUT ROWID;
"""


def describe(path: Path, exc: BaseException, doing: str) -> StoreError:
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


class _Busy(Exception):
    """Another process held a lock SQLite would not wait for; opening is retried."""

    def __init__(self, error: sqlite3.Error) -> None:
        super().__init__(str(error))
        self.error = error


def connect(path: Path, timeout: float, synchronous: str, *, create: bool) -> sqlite3.Connection:
    """Open a connection in WAL mode (with ``create``: the folder, and the schema made
    or upgraded first), waiting up to ``timeout`` seconds for other processes.

    SQLite's busy timeout does not cover all of opening: switching a new file to WAL
    upgrades a read lock to a write lock, and SQLite answers "database is locked" at
    once there rather than risk a deadlock (its busy handler is not called for that
    upgrade). Two processes creating the same store at once hit exactly this, so the
    whole opening is retried here until the timeout.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            return _connect_once(path, timeout, synchronous, create=create)
        except _Busy as busy:
            left = deadline - time.monotonic()
            if left <= 0:
                raise describe(path, busy.error, "opening it") from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)


def _connect_once(
    path: Path, timeout: float, synchronous: str, *, create: bool
) -> sqlite3.Connection:
    conn: sqlite3.Connection | None = None
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
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
            _migrate(conn, path)
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
        raise describe(path, exc, "opening it") from None


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the fanflow store {path} was written by a newer fanflow (schema "
            f"{version}, this one knows {SCHEMA_VERSION}); upgrade fanflow or use "
            "another path",
            path=str(path),
        )
    if version == SCHEMA_VERSION:
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
        # Read again under the write lock: another process may have upgraded the
        # file meanwhile, and ALTER TABLE must run once.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            for sql in _SCHEMA.split(";"):  # CREATE TABLE IF NOT EXISTS: new tables only
                if sql.strip():
                    conn.execute(sql)
            for step, sqls in sorted(_ADDED_COLUMNS.items()):
                if 0 < version < step:  # a new file (version 0) has every column already
                    for sql in sqls:
                        conn.execute(sql)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
