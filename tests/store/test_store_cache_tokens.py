"""The SQLite store keeps the prompt cache's counts: a stored response and a job's items
have the tokens read from and written to the cache, and a store from before reads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import fanflow
from fanflow import Request, Response, Store, Usage
from fanflow.testing import ScriptedLLM

from .test_store import _SCHEMA_2, current_schema, rows

USAGE = Usage(
    3010,
    5,
    cached_input_tokens=1000,
    cache_write_input_tokens=2000,
    cache_write_1h_input_tokens=1500,
)


def _reply(request: Request) -> Response:
    return Response("ok", usage=USAGE, model="claude-sonnet-4-5")


async def test_stored_responses_and_items_keep_the_cache_counts(tmp_path: Path) -> None:
    with Store(tmp_path / "store.db") as store:
        await fanflow.map(ScriptedLLM(_reply), "{input}", ["a", "b"], store=store, job="j")
        items = store.items("j")
        assert [item.usage for item in items] == [USAGE, USAGE]
        key = items[0].key
        assert key is not None
        stored = store.lookup(key)
        assert stored is not None
        assert stored.usage == USAGE


async def test_a_store_from_before_the_cache_columns_upgrades(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_2)
    conn.close()
    with Store(path) as store:
        old = store.lookup("k0")
        assert old is not None
        assert old.usage == Usage(1, 1)
        assert store.items("old")[0].usage == Usage(1, 1)
        await fanflow.map(ScriptedLLM(_reply), "{input}", ["a"], store=store, job="new")
        assert store.items("new")[0].usage == USAGE
    version = current_schema(tmp_path)
    assert version > 2  # newer than _SCHEMA_2's
    assert rows(path, "PRAGMA user_version") == [(version,)]
