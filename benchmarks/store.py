"""The cost of durability: 10,000 calls with and without the SQLite store.

Scenario: a function model that answers each call after ``--latency`` seconds (real
time: the store's writer thread and SQLite's fsyncs are real, so virtual time would hide
them), ``--concurrency`` calls at once. Runs, in one process:

1. baseline: ``fanflow.map`` with no store;
2. store: the same map with ``store=`` and ``job=`` on a fresh file (every call is
   committed, with its item's status, before it is reported);
3. resume: the same job again: every item served from the store.
4. (``--aiosqlite``) the alternative design: aiosqlite with one commit per call.

Claim (issue 6): makespan(store) / makespan(baseline) <= 1.10.

    python benchmarks/store.py                   # 10,000 calls, 500 at once, 0.25 s each
    python benchmarks/store.py --aiosqlite       # also measure the aiosqlite design
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fanflow
from fanflow import CallRecord, Request, Response, Store
from fanflow.store import ItemRef


def make_llm(latency: float) -> fanflow.BaseLLM:
    async def answer(request: Request) -> Response:
        await asyncio.sleep(latency)
        return Response(f"answer to {request.prompt}", usage=fanflow.Usage(12, 4))

    return fanflow.function(answer, name="bench")


async def timed(coro: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await coro
    return time.perf_counter() - start, result


class AiosqliteStore:
    """The design not taken: aiosqlite, one awaited commit per call."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, path: Path) -> AiosqliteStore:
        import aiosqlite

        conn = await aiosqlite.connect(path)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("CREATE TABLE calls (key TEXT PRIMARY KEY, text TEXT, n INTEGER)")
        await conn.commit()
        return cls(conn)

    def lookup(self, key: str) -> Response | None:
        return None  # a fresh store: every lookup misses (and costs nothing here)

    async def save(self, record: CallRecord[Any], *, key: str, item: ItemRef | None) -> None:
        assert record.response is not None
        await self.conn.execute(
            "INSERT OR REPLACE INTO calls VALUES (?, ?, ?)",
            (key, record.response.text, record.index),
        )
        await self.conn.commit()


async def run_aiosqlite(args: argparse.Namespace, items: list[str], folder: Path) -> float:
    from fanflow._durable import execute_stored
    from fanflow._engine import CallOptions

    store = await AiosqliteStore.open(folder / "aiosqlite.db")
    llm = make_llm(args.latency)
    opts = CallOptions(concurrency=args.concurrency).start()
    try:

        async def one(i: int, text: str) -> None:
            await execute_stored(llm, Request.of(text), opts, store=store, index=i, item=None)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i, text in enumerate(items):
                tg.create_task(one(i, text))
        return time.perf_counter() - start
    finally:
        await store.conn.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    n, c, latency = args.calls, args.concurrency, args.latency
    items = [f"item {i}" for i in range(n)]
    lower_bound = -(-n // c) * latency
    out: dict[str, Any] = {"calls": n, "concurrency": c, "latency": latency}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        llm = make_llm(latency)
        base, result = await timed(fanflow.map(llm, "{input}", items, concurrency=c))
        assert result.ok
        with Store(folder / "store.db") as store:
            stored, result = await timed(
                fanflow.map(llm, "{input}", items, concurrency=c, store=store, job="bench")
            )
            assert result.ok
            stats = store.statistics()
            resumed, again = await timed(
                fanflow.map(llm, "{input}", items, concurrency=c, store=store, job="bench")
            )
            assert all(r.cached for r in again.records)
        out.update(
            lower_bound_s=round(lower_bound, 3),
            baseline_s=round(base, 3),
            store_s=round(stored, 3),
            ratio_store_over_baseline=round(stored / base, 4),
            rows_written=stats.rows_written,
            commits=stats.commits,
            largest_commit=stats.largest_commit,
            rows_per_commit=round(stats.rows_written / max(stats.commits, 1), 1),
            writer_busy_s=round(stats.writer_seconds, 3),
            rows_per_s_writer=round(stats.rows_written / max(stats.writer_seconds, 1e-9)),
            rows_per_s_run=round(stats.rows_written / stored),
            resume_all_cached_s=round(resumed, 3),
            cached_items_per_s=round(n / resumed),
        )
        if args.aiosqlite:
            aio = await run_aiosqlite(args, items, folder)
            out.update(
                aiosqlite_s=round(aio, 3), ratio_aiosqlite_over_baseline=round(aio / base, 4)
            )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--aiosqlite", action="store_true")
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result, indent=2))
    ok = result["ratio_store_over_baseline"] <= 1.10
    print(f"claim makespan(store)/makespan(none) <= 1.10: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)
