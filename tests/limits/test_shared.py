"""Limits shared by several processes through one store (``Limits(shared=URL)``).

Each test runs real processes (``_shared_worker.py``) against one SimServer in this
process (a background thread): they wait on real events, bounded by the pacing itself
(a few seconds each), and assert counts, never times.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fanflow import ConfigError, Limits
from fanflow.testing import SimServer

WORKER = Path(__file__).with_name("_shared_worker.py")
RATE = 40  # requests per second at the server, a burst of one second


def _start(
    shared: str, server: SimServer, tag: str, n: int, rpm: int, concurrency: int
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [
        sys.executable,
        str(WORKER),
        shared,
        server.url,
        tag,
        str(n),
        str(rpm),
        str(concurrency),
    ]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip().splitlines()[-1]


def _sqlite(tmp_path: Path, query: str = "") -> str:
    return f"sqlite:///{tmp_path / 'limits.db'}{query}"


@pytest.mark.timeout(90)
def test_processes_sharing_a_rate_through_sqlite_draw_no_429(tmp_path: Path) -> None:
    with SimServer(latency=0.02, rpm=RATE, period=1.0, keep_requests=False) as server:
        procs = [_start(_sqlite(tmp_path), server, f"p{i}", 40, RATE, 0) for i in range(3)]
        lines = [_finish(p) for p in procs]
        stats = server.stats()
    assert all('"ok": true' in line for line in lines), lines
    assert stats.responses.get(429, 0) == 0
    assert stats.responses.get(200, 0) == 120


@pytest.mark.timeout(90)
def test_processes_sharing_a_concurrency_through_sqlite_never_exceed_it(tmp_path: Path) -> None:
    with SimServer(latency=0.1, max_in_flight=3, keep_requests=False) as server:
        procs = [_start(_sqlite(tmp_path), server, f"p{i}", 15, 0, 3) for i in range(3)]
        lines = [_finish(p) for p in procs]
        stats = server.stats()
    assert all('"ok": true' in line for line in lines), lines
    assert stats.max_in_flight <= 3
    assert stats.responses.get(429, 0) == 0


def _wait_for(condition: object, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


@pytest.mark.timeout(90)
def test_a_killed_process_slots_come_back_within_the_ttl(tmp_path: Path) -> None:
    url = _sqlite(tmp_path, "?ttl=1")
    with SimServer(latency=0.3, max_in_flight=2, keep_requests=False) as server:
        doomed = _start(url, server, "doomed", 1000, 0, 2)
        _wait_for(lambda: server.stats().requests >= 2)  # it holds both slots now
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate()
        survivor = _start(url, server, "survivor", 6, 0, 2)
        line = _finish(survivor)
        stats = server.stats()
    assert '"ok": true' in line
    assert stats.max_in_flight <= 2
    assert stats.responses.get(429, 0) == 0
    with sqlite3.connect(tmp_path / "limits.db") as db:
        (left,) = db.execute(
            "SELECT COUNT(*) FROM slots WHERE expires > ?", (time.time(),)
        ).fetchone()
    assert left == 0  # the survivor gave its slots back; the dead one's expired


def test_an_unknown_scheme_lists_the_forms_allowed() -> None:
    with pytest.raises(ConfigError, match=r"unknown scheme 'memcached'.*sqlite:///.*redis://"):
        Limits(rpm=10, shared="memcached://localhost:11211")


def test_a_password_never_shows_in_the_limits_repr() -> None:
    limits = Limits(rpm=10, shared="redis://user:hunter2secret@localhost:6379/0")
    assert "hunter2secret" not in repr(limits)
    assert "redis://***@localhost:6379/0" in repr(limits)
