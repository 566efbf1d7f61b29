"""The SQLite store's writer: one thread that commits whatever has queued up in one
transaction (group commit) and then wakes each waiter, on its own loop or thread.

docs/decisions/0030-store-sqlite-writer-thread.md says why a thread of its own and
what group commit buys.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .._exceptions import StoreError
from ._schema import describe

__all__ = ["Op", "Waiter", "Writer"]

#: One statement and its parameters.
Op = tuple[str, tuple[Any, ...]]


class Waiter:
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


class Writer:
    """One thread that commits queued writes in batches and wakes their waiters."""

    def __init__(self, conn: sqlite3.Connection, path: Path, max_batch: int) -> None:
        self.conn = conn
        self.path = path
        self.max_batch = max_batch
        self.queue: queue.SimpleQueue[tuple[list[Op], Waiter] | None] = queue.SimpleQueue()
        self.rows = 0
        self.commits = 0
        self.largest = 0
        self.busy = 0.0
        self.error: StoreError | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"fanflow-store-writer:{path.name}", daemon=True
        )
        self.thread.start()

    def submit(self, ops: list[Op], waiter: Waiter) -> None:
        self.queue.put((ops, waiter))

    def stop(self) -> None:
        """Commit what is queued, end the thread and close its connection."""
        self.queue.put(None)
        self.thread.join()
        self.conn.close()

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

    def _commit(self, batch: list[tuple[list[Op], Waiter]]) -> None:
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
            error = describe(self.path, exc, f"committing {len(ops)} rows")
        else:
            self.rows += len(ops)
            self.commits += 1
            self.largest = max(self.largest, len(ops))
        self.busy += time.perf_counter() - began
        self._wake(batch, error)

    def _wake(self, batch: list[tuple[list[Op], Waiter]], error: StoreError | None) -> None:
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
