"""The SQLite result store: cache hits, keys, jobs, only_failed, errors, secrets."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

import fanflow
from fanflow import Request, Response, Status, Store
from fanflow.errors import StoreError
from fanflow.events import CallEnded
from fanflow.store import JobInfo
from fanflow.testing import ScriptedLLM


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "store.db") as s:
        yield s


def rows(path: Path, sql: str) -> list[Any]:
    """Read the file with a connection of its own, as another process would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def current_schema(directory: Path) -> int:
    """The schema version a new store is made with (``PRAGMA user_version``): the
    version an older store must be upgraded to, and one this fanflow opens as it is."""
    path = directory / "fresh.db"
    with Store(path):
        pass
    [(version,)] = rows(path, "PRAGMA user_version")
    with Store(path):  # the current version opens unchanged, not as newer or older
        pass
    assert rows(path, "PRAGMA user_version") == [(version,)]
    return int(version)


def read_all(folder: Path) -> bytes:
    """Every byte of every file under ``folder`` (the database, its WAL, job locks...)."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


ITEMS = [f"item {i}" for i in range(20)]


async def test_second_run_is_served_from_the_store_at_no_cost(store: Store) -> None:
    llm = ScriptedLLM()
    first = await fanflow.map(llm, "say {input}", ITEMS, store=store)
    assert llm.calls == 20
    second = await fanflow.map(llm, "say {input}", ITEMS, store=store)
    assert llm.calls == 20  # nothing was sent again
    assert second.outputs == first.outputs
    assert all(r.cached and not r.attempts for r in second.records)
    assert second.summary.usage.total_tokens == 0
    assert second.summary.cost == 0.0
    assert first.summary.usage.total_tokens > 0
    stats = store.statistics()
    assert (stats.hits, stats.misses) == (20, 20)
    assert stats.rows_written == 20  # the hits wrote nothing


async def test_cache_false_calls_the_model_again(store: Store) -> None:
    llm = ScriptedLLM()
    await fanflow.map(llm, "say {input}", ITEMS, store=store)
    again = await fanflow.map(llm, "say {input}", ITEMS, store=store, cache=False)
    assert llm.calls == 40
    assert not any(r.cached for r in again.records)


async def test_parse_runs_on_stored_responses(store: Store) -> None:
    llm = ScriptedLLM(reply="42")
    await fanflow.map(llm, "{input}", ["a"], store=store)
    result = await fanflow.map(llm, "{input}", ["a"], store=store, parse=lambda r: int(r.text))
    assert result.outputs == [42]
    assert result.records[0].cached


async def test_different_models_and_handles_do_not_share_entries(store: Store) -> None:
    a, b = ScriptedLLM(model="model-a"), ScriptedLLM(model="model-b")
    await fanflow.map(a, "{input}", ["x"], store=store)
    await fanflow.map(b, "{input}", ["x"], store=store)
    assert (a.calls, b.calls) == (1, 1)
    # Function models leave request.model unset: their names keep them apart.
    f = fanflow.function(lambda r: "from f", name="f")
    g = fanflow.function(lambda r: "from g", name="g")
    rf = await fanflow.map(f, "{input}", ["x"], store=store)
    rg = await fanflow.map(g, "{input}", ["x"], store=store)
    assert (rf.outputs, rg.outputs) == (["from f"], ["from g"])
    assert not rg.records[0].cached
    # The same model under another handle of the same class does share them.
    a2 = ScriptedLLM(model="model-a", reply="never asked")
    again = await fanflow.map(a2, "{input}", ["x"], store=store)
    assert again.records[0].cached
    assert a2.calls == 0


async def test_samples_are_different_calls(store: Store) -> None:
    llm = ScriptedLLM()
    requests = [Request.of("vote", sample=i) for i in range(3)]
    await fanflow.map(llm, lambda r: r, requests, store=store)
    again = await fanflow.map(llm, lambda r: r, requests, store=store)
    assert llm.calls == 3
    assert all(r.cached for r in again.records)


async def test_failures_are_not_cached(store: Store) -> None:
    llm = ScriptedLLM(fail_on={"bad": fanflow.errors.BadRequest("no")})
    first = await fanflow.map(llm, "{input}", ["good", "bad"], store=store)
    assert first.status == {0: Status.SUCCEEDED, 1: Status.FAILED}
    await fanflow.map(llm, "{input}", ["good", "bad"], store=store)
    assert [r.prompt for r in llm.requests] == ["good", "bad", "bad"]


async def test_a_record_is_committed_before_it_is_reported(store: Store) -> None:
    llm = ScriptedLLM()
    seen = 0
    async with fanflow.as_completed(llm, "{input}", ITEMS, store=store, job="j") as results:
        async for _record in results:
            seen += 1
            # Another connection (another process) already sees this call and item.
            assert rows(store.path, "SELECT count(*) FROM calls")[0][0] >= seen
            assert rows(store.path, "SELECT count(*) FROM items")[0][0] >= seen
    assert seen == 20


async def test_a_job_records_each_items_terminal_status(store: Store) -> None:
    llm = ScriptedLLM(fail_on={"item 3$": fanflow.errors.BadRequest("bad item")})
    items: list[Any] = [{"id": f"id-{i}", "text": f"item {i}"} for i in range(5)]
    items.append({"id": "id-5"})  # no text: the template fails for this item only
    result = await fanflow.map(llm, "{text}", items, store=store, job="labels")
    assert result.status[3] is Status.FAILED
    info = store.job("labels")
    assert isinstance(info, JobInfo)
    assert (info.total, info.succeeded, info.failed, info.pending) == (6, 4, 2, 0)
    assert not info.done
    failed = store.items("labels", status=Status.FAILED)
    assert [(i.index, i.input_id, i.error_type) for i in failed] == [
        (3, "id-3", "BadRequest"),
        (5, "id-5", "TemplateError"),
    ]
    assert "bad item" in (failed[0].error or "")
    assert [j.name for j in store.jobs()] == ["labels"]
    assert store.job("nope") is None
    assert "fanflow.JobInfo(name='labels'" in repr(info)


async def test_rerunning_a_job_reruns_only_what_did_not_succeed(store: Store) -> None:
    flaky = ScriptedLLM(fail_on={"item [37]$": fanflow.errors.BadRequest("no")})
    await fanflow.map(flaky, "{input}", ITEMS[:10], store=store, job="j")
    fixed = ScriptedLLM()
    # cache=False: only the job's own succeeded items are reused; the failures run again.
    result = await fanflow.map(fixed, "{input}", ITEMS[:10], store=store, job="j", cache=False)
    assert sorted(r.prompt for r in fixed.requests) == ["item 3", "item 7"]
    assert result.ok
    info = store.job("j")
    assert info is not None
    assert info.done
    assert info.runs == 2


async def test_only_failed_runs_the_failures_and_skips_what_never_started(store: Store) -> None:
    flaky = ScriptedLLM(fail_on={"item [25]$": fanflow.errors.ServerError("down")})
    await fanflow.map(
        flaky, "{input}", ITEMS[:8], store=store, job="j", retry=fanflow.RetryPolicy(attempts=1)
    )
    fixed = ScriptedLLM()
    result = await fanflow.map(fixed, "{input}", ITEMS[:10], store=store, job="j", only_failed=True)
    assert sorted(r.prompt for r in fixed.requests) == ["item 2", "item 5"]
    assert [result.status[i] for i in range(10)] == [Status.SUCCEEDED] * 8 + [Status.SKIPPED] * 2
    assert all(result.records[i].cached for i in (0, 1, 3, 4, 6, 7))
    assert "only_failed" in str(result.errors[8])


async def test_bad_option_combinations_say_what_to_do(store: Store) -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.ConfigError, match=r"store=fanflow.Store\(\)"):
        await fanflow.map(llm, "{input}", ["a"], job="j")
    with pytest.raises(fanflow.ConfigError, match="needs job="):
        await fanflow.map(llm, "{input}", ["a"], store=store, only_failed=True)
    with pytest.raises(fanflow.ConfigError, match="non-empty"):
        await fanflow.map(llm, "{input}", ["a"], store=store, job="")
    with pytest.raises(fanflow.ConfigError, match="durability"):
        Store(store.path, durability="sometimes")  # type: ignore[arg-type]


class KeyedLLM(fanflow.BaseLLM):
    """A handle holding an API key, as HTTP handles do."""

    def __init__(self, api_key: str) -> None:
        super().__init__(model="keyed", defaults={"temperature": 0.0})
        self.api_key = api_key

    async def complete(self, request: Request) -> Response:
        if "fail" in request.prompt:
            raise fanflow.errors.AuthenticationError("401: the API key was rejected")
        return Response(f"ok {request.prompt}", model="keyed")


async def test_no_secret_reaches_the_store_file(tmp_path: Path) -> None:
    secret = "sk-test-SECRET-0123456789abcdef"
    path = tmp_path / "store.db"
    with Store(path) as store:
        llm = KeyedLLM(secret)
        await fanflow.map(llm, "{input}", ["a", "fail", "c"], store=store, job="j")
        assert secret not in repr(store)
    data = read_all(tmp_path)
    assert b"ok a" in data  # the file does hold the results...
    assert secret.encode() not in data  # ...and never the key


def test_a_damaged_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(StoreError, match="damaged or not a SQLite database") as info:
        Store(path)
    assert str(path) in str(info.value)
    assert "move it aside" in str(info.value)
    assert info.value.path == str(path)


def test_a_file_that_is_not_writable_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    path = blocker / "store.db"  # its "folder" is a regular file
    with pytest.raises(StoreError, match="cannot be written") as info:
        Store(path)
    assert str(path) in str(info.value)


def test_a_store_from_a_newer_fanflow_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer fanflow"):
        Store(path)


async def test_a_locked_store_stops_the_run_instead_of_running_without_it(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with Store(path, timeout=0) as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process is writing and holds the lock
        try:
            with pytest.raises(StoreError, match="locked by another process") as info:
                await fanflow.map(ScriptedLLM(), "{input}", ["a", "b"], store=store)
            assert str(path) in str(info.value)
        finally:
            other.execute("ROLLBACK")
            other.close()
        # Once the lock is gone the same store works again.
        result = await fanflow.map(ScriptedLLM(), "{input}", ["a", "b"], store=store)
        assert result.ok


async def test_a_closed_store_says_so(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreError, match="is closed"):
        await fanflow.map(ScriptedLLM(), "{input}", ["a"], store=store)


async def test_store_defaults_and_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with Store() as store:
        assert repr(store) == "fanflow.Store('.fanflow/store.db')"
        await fanflow.map(ScriptedLLM(), "{input}", ["a"], store=store)
        store.flush()
        stats = store.statistics()
        assert (stats.misses, stats.rows_written, stats.queued) == (1, 1, 0)
    assert (tmp_path / ".fanflow" / "store.db").exists()


async def test_items_keep_their_input_ids_across_async_iterators(store: Store) -> None:
    async def items() -> Any:
        for i in range(4):
            yield {"id": f"row-{i}", "input": f"text {i}"}

    result = await fanflow.map(ScriptedLLM(), "{input}", items(), store=store, job="stream")
    assert result.ok
    info = store.job("stream")
    assert info is not None
    assert info.total == 4
    assert [i.input_id for i in store.items("stream")] == [f"row-{i}" for i in range(4)]


async def test_hooks_see_cache_hits(store: Store) -> None:
    events: list[Any] = []
    llm = ScriptedLLM()
    await fanflow.map(llm, "{input}", ["a"], store=store)
    await fanflow.map(llm, "{input}", ["a"], store=store, hooks=[events.append])
    ended = [e for e in events if isinstance(e, CallEnded)]
    assert len(ended) == 1
    assert ended[0].record.cached


async def test_cancelling_a_job_keeps_what_finished_and_says_how_to_resume(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    gate = asyncio.Event()

    async def answer(request: Request) -> str:
        if request.prompt.endswith(("0", "1", "2")):
            return "quick"
        await gate.wait()  # the rest hang until cancelled
        return "never"

    llm = fanflow.function(answer, name="hang")
    got = []
    stream = fanflow.as_completed(llm, "{input}", ITEMS[:6], store=store, job="stop")
    async with stream as results:
        async for record in results:
            got.append(record.index)
            if len(got) == 3:
                break  # leaving the block cancels the three calls still in flight
    assert sorted(got) == [0, 1, 2]
    assert [i.index for i in store.items("stop")] == [0, 1, 2]
    assert "job 'stop' was interrupted; 3 items finished" in caplog.text
    assert str(store.path) in caplog.text


def test_store_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(fanflow.ConfigError, match="timeout"):
        Store(tmp_path / "s.db", timeout=-1)
    with pytest.raises(fanflow.ConfigError, match="max_batch"):
        Store(tmp_path / "s.db", max_batch=0)
    with Store(tmp_path / "s.db", durability="full", max_batch=1) as store:
        assert store.jobs() == []


# The calls and items tables as schema 2 (the first store of the day) wrote them.
_SCHEMA_2 = """
CREATE TABLE calls (key TEXT PRIMARY KEY, model TEXT, text TEXT NOT NULL,
    response_model TEXT, finish_reason TEXT, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, usage_estimated INTEGER NOT NULL, cost REAL,
    latency REAL, time_to_first_token REAL, duration REAL, attempts INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE jobs (name TEXT PRIMARY KEY, total INTEGER, runs INTEGER NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE items (job TEXT NOT NULL, idx INTEGER NOT NULL, input_id TEXT, key TEXT,
    status TEXT NOT NULL, error_type TEXT, error TEXT, cached INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cost REAL,
    updated REAL NOT NULL, PRIMARY KEY (job, idx)) WITHOUT ROWID;
INSERT INTO jobs VALUES ('old', 1, 1, 0, 0);
INSERT INTO items VALUES ('old', 0, NULL, 'k0', 'succeeded', NULL, NULL, 0, 1, 1, NULL, 0);
INSERT INTO calls VALUES ('k0', 'm', 'old answer', NULL, NULL, 1, 1, 0, NULL, NULL, NULL,
    NULL, 1, 0);
PRAGMA user_version=2;
"""


async def test_requeues_and_the_last_note_persist_in_a_store_from_earlier_today(
    tmp_path: Path,
) -> None:
    from fanflow import CallRecord
    from fanflow.errors import RateLimited
    from fanflow.results import Attempt
    from fanflow.store import ItemRef

    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_2)
    conn.close()
    attempts = (
        Attempt(1, 0.0, 1.0, Status.FAILED, RateLimited("429"), requeued=True),
        Attempt(2, 2.0, 3.0, Status.FAILED, RateLimited("429"), note="waited 4 s: Retry-After"),
        Attempt(3, 7.0, 8.0, Status.SUCCEEDED),
    )
    record: CallRecord[Any] = CallRecord(
        Status.SUCCEEDED, attempts=attempts, response=Response("new answer"), index=1
    )
    with Store(path) as store:
        old = store.items("old")[0]  # the row written before the upgrade still reads
        assert (old.status, old.requeues, old.note) == (Status.SUCCEEDED, 0, None)
        await store.save(record, key="k1", item=ItemRef("old", 1))
        new = store.items("old")[1]
        assert (new.requeues, new.note) == (1, "waited 4 s: Retry-After")
    assert rows(path, "SELECT key, requeues FROM calls ORDER BY key") == [("k0", 0), ("k1", 1)]
    version = current_schema(tmp_path)
    assert version > 2  # newer than _SCHEMA_2's
    assert rows(path, "PRAGMA user_version") == [(version,)]
