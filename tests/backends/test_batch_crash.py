"""A real process killed with SIGKILL while its batch runs resumes by polling the same
batch: no item is submitted twice (SimServer counts every batched request by prompt).

SimServer runs in this process on a background thread (real time); the children run
``fanflow.map(..., mode="batch", store=..., job=...)`` against it. The test waits on
state (the batch committed in the store, the child's exit), never on a guessed time.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fanflow.testing import SimBatches, SimServer

N = 30

CHILD = """
import asyncio, json, sys
import fanflow

url, path, api = sys.argv[1], sys.argv[2], sys.argv[4]

async def main():
    if api == "openai":
        llm = fanflow.openai("gpt-sim", base_url=url, api_key="sk-test")
    else:
        llm = fanflow.anthropic("claude-sim", base_url=url, api_key="sk-test")
    store = fanflow.Store(path)
    opts = fanflow.backends.BatchOptions(poll=0.05, max_poll=0.2, linger=0.05)
    items = [f"prompt {i}" for i in range(int(sys.argv[3]))]
    result = await fanflow.map(
        llm, "{input}", items, mode="batch", store=store, job="nightly", batch=opts
    )
    await llm.aclose()
    store.close()
    print(json.dumps({
        "outputs": result.outputs,
        "batches": sorted({r.batch_id for r in result.records if r.batch_id}),
        "cached": sum(r.cached for r in result.records),
    }))

asyncio.run(main())
"""


_children: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _start(url: str, db: Path, api: str = "openai") -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(db), str(N), api],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _children.append(proc)
    return proc


def _wait(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early ({what}): {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _committed_batches(db: Path) -> list[str]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT id FROM batches WHERE id NOT LIKE 'intent:%'")
            return [r[0] for r in rows]
    except sqlite3.OperationalError:  # the table is not there yet
        return []


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_sigkill_while_a_batch_runs_then_resume_polls_the_same_batch(
    tmp_path: Path, api: str
) -> None:
    db = tmp_path / "store.db"
    # The batch takes 10 minutes until the child is dead; then 1 s (the resumed run
    # finds it ended at its first poll).
    with SimServer(batches=SimBatches(time=600.0)) as server:
        url = server.url if api == "openai" else server.root
        proc = _start(url, db, api)
        _wait(lambda: len(_committed_batches(db)) == 1, "the batch committed", proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        before = server.stats()
        assert (before.batches, before.batch_requests) == (1, N)
        assert before.prompt_completed == {}  # nothing answered yet
        server.set_batches(SimBatches(time=1.0))
        proc = _start(url, db, api)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        after = server.stats()
    out = json.loads(stdout)
    assert out["outputs"] == [f"echo: prompt {i}" for i in range(N)]
    assert out["batches"] == _committed_batches(db)  # the one batch of the first run
    # The server's own counts: one batch, each prompt submitted once, answered once.
    assert (after.batches, after.batch_requests) == (1, N)
    assert set(after.batch_prompts.values()) == {1}
    assert after.prompt_completed == {f"prompt {i}": 1 for i in range(N)}
    assert after.requests == 0  # and no real-time call


def test_a_finished_job_runs_again_from_the_store(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    with SimServer(batches=SimBatches(time=0.2)) as server:
        for _ in range(2):
            proc = _start(server.url, db)
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
        stats = server.stats()
    assert json.loads(stdout)["cached"] == N
    assert (stats.batches, stats.batch_requests) == (1, N)
