"""One run of a job at a time, and a store that opens while another process creates it.

Issue 13 item 3: the same job from two processes duplicated every call, and a process
opening the store while another created it failed at once ("database is locked ...
while opening it") instead of waiting its 30 s timeout. Real processes, a real SQLite
file, the real CLI against SimServer over loopback (its held requests keep a run going
for as long as the test needs, without timing guesses).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fanflow.errors import StoreError
from fanflow.store import Store

FANFLOW = [sys.executable, "-m", "fanflow"]


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FANFLOW_") and k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
    }
    env["COLUMNS"] = "100"
    return env


def _map(tmp_path: Path, url: str, job: str, *extra: str) -> list[str]:
    return [
        *FANFLOW, "map", "in.txt", "-p", "{input}", "--base-url", url, "--model", "m",
        "--store", str(tmp_path / "store.db"), "--job", job, "--concurrency", "2",
        "-o", f"out-{os.urandom(3).hex()}.jsonl", *extra,
    ]  # fmt: skip


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _lock_info(tmp_path: Path, job: str) -> dict[str, Any]:
    """What the lock file of ``job`` says of its holder (decision 0095: a run holds
    ``<store file>-locks/<job>.lock``, for a job name that is a plain file name)."""
    path = tmp_path / "store.db-locks" / f"{job}.lock"
    try:
        text = path.read_text()
        return dict(json.loads(text)) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def test_a_second_run_of_a_running_job_is_refused_and_calls_nothing(
    tmp_path: Path, holding: Any
) -> None:
    sim = holding(answer_first=2)  # the first run answers 2 items, then hangs on the rest
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(6)))
    first = _start(_map(tmp_path, sim.url, "labels"), tmp_path)
    try:
        _wait(lambda: sim.stats().in_flight == 2, "2 calls held", first)
        holder = _lock_info(tmp_path, "labels")
        assert holder["pid"] == first.pid
        second = subprocess.run(
            _map(tmp_path, sim.url, "labels"),
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert f"job 'labels' is already running in process {first.pid} on host " in (second.stderr)
        assert "Wait for that run to finish" in second.stderr
        assert sim.stats().requests == 4  # 2 answered + 2 held: none from the second run
    finally:
        first.send_signal(signal.SIGINT)  # held calls never end: interrupt the first run
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    sim.release()
    # The first run released its lock: the job resumes, asking only what did not finish.
    again = subprocess.run(
        _map(tmp_path, sim.url, "labels"), cwd=tmp_path, env=_env(), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert sim.stats().requests == 4 + 4


def test_a_killed_runs_lock_is_taken_over(tmp_path: Path, holding: Any) -> None:
    sim = holding(answer_first=3)
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(5)))
    first = _start(_map(tmp_path, sim.url, "night"), tmp_path)
    _wait(lambda: sim.stats().in_flight == 2, "2 calls held", first)
    assert _lock_info(tmp_path, "night")["pid"] == first.pid
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    sim.release()
    again = subprocess.run(
        _map(tmp_path, sim.url, "night"), cwd=tmp_path, env=_env(), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"job 'night' was last run by process {first.pid} on host " in again.stderr
    assert "ended without finishing (killed?); this run takes over" in again.stderr
    assert _lock_info(tmp_path, "night") == {}  # released at the end of the run
    with Store(tmp_path / "store.db") as store:
        info = store.job("night")
        assert info is not None
        assert (info.total, info.succeeded) == (5, 5)


def test_the_lock_is_per_job_and_per_store(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as a, Store(tmp_path / "b.db") as b:
        held = a.lock_job("x/y")
        a.lock_job("x_y").release()  # another job: free
        b.lock_job("x/y").release()  # another store: free
        me = f"job 'x/y' is already running in process {os.getpid()} on host {socket.gethostname()}"
        with pytest.raises(StoreError, match=re.escape(me)):
            a.lock_job("x/y")  # a second run in this very process is refused too
        held.release()
        held.release()  # twice is fine
        a.lock_job("x/y")  # free again; close() releases it
    with Store(tmp_path / "a.db") as a:
        lock = a.lock_job("x/y")  # free again after close()
        assert lock.held
        lock.release()
        assert not lock.held


HOLD = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")  # what a process creating the store holds for a moment
conn.execute("CREATE TABLE IF NOT EXISTS other (x)")
print("held", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def _hold(db: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    return proc


def test_opening_waits_for_a_process_that_is_creating_the_store(tmp_path: Path) -> None:
    """SQLite does not wait (busy handler) when switching a new file to WAL would need
    to upgrade a read lock; before the fix this raised "database is locked" at once."""
    db = tmp_path / "store.db"
    holder = _hold(db)
    release = threading.Timer(0.5, lambda: holder.communicate("go\n", timeout=30))
    began = time.monotonic()
    release.start()
    try:
        with Store(db, timeout=30) as store:
            waited = time.monotonic() - began
            assert store.jobs() == []
    finally:
        release.join()
    assert holder.returncode == 0
    assert waited >= 0.4  # it waited for the other process instead of failing at once


def test_opening_gives_up_after_its_timeout_with_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    holder = _hold(db)
    try:
        began = time.monotonic()
        with pytest.raises(StoreError, match="is locked by another process") as caught:
            Store(db, timeout=0.3)
        assert time.monotonic() - began >= 0.3
        assert "while opening it" in str(caught.value)
    finally:
        holder.communicate("go\n", timeout=30)


OPEN = r"""
import pathlib, sys, time
from fanflow.store import Store
path, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.0005)
Store(path).close()
"""


def test_processes_creating_one_store_at_once_all_open_it(tmp_path: Path) -> None:
    for trial in range(2):
        go = tmp_path / f"go{trial}"
        db = tmp_path / f"store{trial}.db"
        ready = [tmp_path / f"ready{trial}-{i}" for i in range(6)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN, str(db), str(r), str(go)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in ready
        ]
        for proc, path in zip(procs, ready, strict=True):  # imported, waiting for the start
            _wait(path.exists, "ready", proc)
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
