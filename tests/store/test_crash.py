"""Real processes: SIGKILL mid-run then resume, Ctrl-C, and two processes on one store.

The children run jobs with ``fanflow.openai`` against a SimServer on loopback (see
conftest.py). They wait on state (lines in the output file, the server's counts), never
on a guessed duration.
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
from typing import Any

import pytest

from fanflow import Status, Store

N = 40
ANSWER_FIRST = 15
PROMPTS = {f"prompt {i}" for i in range(N)}


def complete_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    data = path.read_text()
    return [json.loads(line) for line in data.splitlines(keepends=True) if line.endswith("\n")]


def wait_until(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early ({what}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


_children: list[subprocess.Popen[str]] = []


def start(cmd: list[str], *args: Any) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _children.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """Kill every child a test started that is still running when it ends (a failed
    assertion or a timeout must not leave a job running on the machine)."""
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_sigkill_mid_run_then_resume_repeats_no_completed_call(
    tmp_path: Path, child_script: list[str], holding: Any
) -> None:
    db, out = tmp_path / "store.db", tmp_path / "out.jsonl"
    sim = holding(answer_first=ANSWER_FIRST)
    proc = start(child_script, sim.url, db, out, N, "crash")
    # SimServer answered 15 calls and holds the next ones; wait until all 15 are
    # reported (a line is written only after its commit) and 6 more are in flight
    # (concurrency=6), then kill -9.
    wait_until(lambda: len(complete_lines(out)) >= ANSWER_FIRST, "15 lines", proc)
    wait_until(lambda: sim.stats().in_flight == 6, "6 calls in flight", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = sim.stats()
    done_before = set(before.prompt_completed)
    assert len(done_before) == ANSWER_FIRST
    in_flight = set(before.prompt_requests) - done_before
    assert len(in_flight) == 6  # calls were in flight when the process died
    # As if the kill had landed in the middle of writing a line:
    with out.open("a") as f:
        f.write('{"index": 39, "id": "id-39", "status": "succ')
    sim.release()
    proc = start(child_script, sim.url, db, out, N, "crash")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    after = sim.stats()
    # SimServer's own counts: no call it had answered (and the client had committed)
    # was asked again; the ones in flight at the kill were, and answered once.
    asked_again = {
        p for p, n in after.prompt_requests.items() if n > before.prompt_requests.get(p, 0)
    }
    assert not asked_again & done_before
    assert in_flight <= asked_again
    assert after.prompt_completed == dict.fromkeys(PROMPTS, 1)  # no reply was paid twice
    assert after.responses == {200: N}
    assert json.loads(stdout) == {"succeeded": N, "calls": N - ANSWER_FIRST}
    rows = complete_lines(out)
    assert sorted(r["index"] for r in rows) == list(range(N))  # each item exactly once
    assert all(r["status"] == "succeeded" for r in rows)
    assert {r["output"] for r in rows} == {f"echo: {p}" for p in PROMPTS}
    assert out.read_text().endswith("\n")
    with Store(db) as store:
        info = store.job("crash")
        assert info is not None
        assert (info.total, info.succeeded, info.runs) == (N, N, 2)


def test_fan_out_killed_mid_run_reruns_only_the_workers_that_did_not_finish(
    tmp_path: Path, fan_out_script: list[str], holding: Any
) -> None:
    db = tmp_path / "store.db"
    sim = holding(answer_first=2)  # 2 of 5 workers answer; 3 hang until the kill
    proc = start(fan_out_script, sim.url, db, 5)

    def two_committed() -> bool:
        if not db.exists():
            return False
        with Store(db) as store:
            info = store.job("launch")
            return info is not None and info.succeeded == 2

    wait_until(two_committed, "2 workers committed", proc)
    wait_until(lambda: sim.stats().in_flight == 3, "3 workers in flight", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = sim.stats()
    done_before = set(before.prompt_completed)
    assert len(done_before) == 2
    sim.release()
    proc = start(fan_out_script, sim.url, db, 5)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    cached = json.loads(stdout)["cached"]
    assert cached.count(True) == 2
    after = sim.stats()
    assert after.responses == {200: 5}  # 2 in the first process, 3 in the second
    asked_again = {
        p for p, n in after.prompt_requests.items() if n > before.prompt_requests.get(p, 0)
    }
    assert len(asked_again) == 3
    assert not asked_again & done_before
    with Store(db) as store:
        info = store.job("launch")
        assert info is not None
        assert (info.total, info.succeeded, info.runs) == (5, 5, 2)


def test_ctrl_c_commits_what_finished_and_says_how_to_resume(
    tmp_path: Path, child_script: list[str], holding: Any
) -> None:
    db, out = tmp_path / "store.db", tmp_path / "out.jsonl"
    sim = holding(answer_first=10)
    proc = start(child_script, sim.url, db, out, N, "interrupted")
    wait_until(lambda: len(complete_lines(out)) >= 10, "10 lines", proc)
    wait_until(lambda: sim.stats().in_flight == 6, "6 calls in flight", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)  # in-flight calls do not keep it alive
    assert proc.returncode != 0
    assert "job 'interrupted' was interrupted; 10 items finished" in stderr
    assert "To resume, run it again with the same job=" in stderr
    assert str(db) in stderr
    with Store(db) as store:
        items = store.items("interrupted")
        assert len(items) == 10  # what finished is committed; in-flight calls left no row
        assert {i.status for i in items} == {Status.SUCCEEDED}
    assert len(complete_lines(out)) == 10


TWO = r"""
import asyncio, sys, pathlib, time
import fanflow

store_path, tag, n, ready, other = sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:6]


async def main():
    items = [f"{tag} {i}" for i in range(n)] + [f"shared {i}" for i in range(n // 5)]
    with fanflow.Store(store_path) as store:
        pathlib.Path(ready).touch()
        while not pathlib.Path(other).exists():  # start writing together
            time.sleep(0.001)
        result = await fanflow.map(
            fanflow.function(lambda r: r.prompt.upper(), name="upper"), "{input}", items,
            concurrency=64, store=store, job=tag,
        )
    assert result.ok, result.errors


asyncio.run(main())
"""


def test_two_processes_share_one_store(tmp_path: Path) -> None:
    script = tmp_path / "two.py"
    script.write_text(TWO)
    db = tmp_path / "store.db"
    n = 3000
    a_ready, b_ready = tmp_path / "a.ready", tmp_path / "b.ready"
    procs = [
        start([sys.executable, str(script)], db, "a", n, a_ready, b_ready),
        start([sys.executable, str(script)], db, "b", n, b_ready, a_ready),
    ]
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr
    finally:
        # Whatever happened (a failure, a timeout, an interrupt), leave no child behind:
        # each waits for the other's ready file and would otherwise run on forever.
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM calls").fetchone() == (2 * n + n // 5,)
        texts = {t for (t,) in conn.execute("SELECT text FROM calls")}
        assert texts == {f"{tag} {i}".upper() for tag in "ab" for i in range(n)} | {
            f"SHARED {i}" for i in range(n // 5)
        }
        per_job = dict(conn.execute("SELECT job, count(*) FROM items GROUP BY job").fetchall())
        assert per_job == {"a": n + n // 5, "b": n + n // 5}
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def _posix_only() -> None:
    if sys.platform == "win32":  # pragma: no cover
        pytest.skip("signals are POSIX")
