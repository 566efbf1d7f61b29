"""Limits shared by several processes through one store (``Limits(shared=URL)``).

Each test runs real processes (``_shared_worker.py``) against one SimServer in this
process (a background thread): they wait on real events, bounded by the pacing itself
(a few seconds each), and assert counts, never times.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import fanflow
from fanflow import ConfigError, Limits
from fanflow.testing import SimServer

from .._helpers import require_redis

WORKER = Path(__file__).with_name("_shared_worker.py")
RATE = 40  # requests per second at the server, a burst of one second
TPM = 800  # tokens per second at the server, a burst of one second


def _start(
    shared: str, server: SimServer, tag: str, n: int, rpm: int, concurrency: int, tpm: int = 0
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
        str(tpm),
    ]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    """A real redis-server on a loopback ``port``, once it accepts connections."""
    args = [
        require_redis(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
    ]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A shared-limits URL (without query): a SQLite file, or a real redis-server on a
    free loopback port, started for the test and stopped after it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'limits.db'}"
        return
    with redis_url(tmp_path) as url:
        yield url


@contextlib.contextmanager
def redis_url(folder: Path) -> Iterator[str]:
    """The URL of a real redis-server on a free loopback port, running for the block."""
    port = _free_port()
    server = _start_redis(port, folder)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.timeout(90)
def test_processes_sharing_a_rate_draw_no_429(store: str) -> None:
    with SimServer(latency=0.02, rpm=RATE, period=1.0, keep_requests=False) as server:
        procs = [_start(store, server, f"p{i}", 40, RATE, 0) for i in range(3)]
        lines = [_finish(p) for p in procs]
        stats = server.stats()
    assert all('"ok": true' in line for line in lines), lines
    assert stats.responses.get(429, 0) == 0
    assert stats.responses.get(200, 0) == 120


@pytest.mark.timeout(90)
def test_processes_sharing_a_token_rate_draw_no_429(store: str) -> None:
    # Each call reserves its estimated prompt plus max_tokens=20 and settles to its
    # usage; the reply is long enough to use all 20.
    reply = "word " * 100
    with SimServer(latency=0.02, tpm=TPM, period=1.0, reply=reply, keep_requests=False) as server:
        procs = [_start(store, server, f"p{i}", 30, 0, 0, TPM) for i in range(3)]
        lines = [_finish(p) for p in procs]
        stats = server.stats()
    assert all('"ok": true' in line for line in lines), lines
    assert stats.responses.get(429, 0) == 0
    assert stats.responses.get(200, 0) == 90
    charged = sum(second.tokens for second in stats.timeline)
    assert charged > 2 * TPM  # more than two buckets' worth: the pacing was needed


@pytest.mark.timeout(90)
def test_processes_sharing_a_concurrency_never_exceed_it(store: str) -> None:
    with SimServer(latency=0.1, max_in_flight=3, keep_requests=False) as server:
        procs = [_start(store, server, f"p{i}", 15, 0, 3) for i in range(3)]
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
def test_a_killed_process_slots_come_back_within_the_ttl(store: str) -> None:
    url = f"{store}?ttl=1"
    with SimServer(latency=0.3, max_in_flight=2, keep_requests=False) as server:
        doomed = _start(url, server, "doomed", 1000, 0, 2)
        _wait_for(lambda: server.stats().requests >= 2)  # it holds both slots now
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate()
        # Both slots are the dead process's until their TTL runs out: the survivor
        # finishes only if they come back (else it waits for ever, and times out).
        survivor = _start(url, server, "survivor", 6, 0, 2)
        line = _finish(survivor)
        stats = server.stats()
    assert '"ok": true' in line
    assert stats.max_in_flight <= 2
    assert stats.responses.get(429, 0) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "limit",
    ["rate", "concurrency"],
)
def test_a_redis_that_dies_mid_run_leaves_a_local_share_and_is_rejoined(
    tmp_path: Path, limit: str
) -> None:
    redis = pytest.importorskip("redis")
    port = _free_port()
    redis_server = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        if limit == "rate":
            sim, (rpm, concurrency) = SimServer(latency=0.02, rpm=RATE, period=1.0), (RATE, 0)
        else:  # 1 slot each at the local share
            sim, (rpm, concurrency) = SimServer(latency=0.1, max_in_flight=2), (0, 2)
        with sim as server:
            procs = [_start(url, server, f"p{i}", 100, rpm, concurrency) for i in range(2)]
            # Both have declared at Redis (a process that never reached it fails its calls).
            client = redis.Redis(port=port)
            _wait_for(lambda: [client.hlen(k) for k in client.scan_iter("fanflow:*:d")] == [2])
            # More than a second: each has declared since the other did, and counts two.
            _wait_for(lambda: server.stats().requests >= 40)
            redis_server.terminate()
            redis_server.wait(10)
            down = server.stats().requests
            _wait_for(lambda: server.stats().requests >= down + 40)  # they go on without it
            redis_server = _start_redis(port, tmp_path)
            outs = [p.communicate(timeout=90) for p in procs]
            stats = server.stats()
        # The restarted Redis (empty, no persistence) was booked in again.
        served = redis.Redis(port=port).info("stats")["total_commands_processed"]
    finally:
        redis_server.terminate()
        redis_server.wait(10)
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert '"ok": true' in out.strip().splitlines()[-1], out  # nothing lost
        lost = [line for line in err.splitlines() if "cannot reach Redis" in line]
        # One warning each. Under a concurrency alone, a process that holds its slots
        # and reuses them may never ask the store during the outage, nor notice it.
        assert len(lost) == 1 or (limit == "concurrency" and not lost), err
        assert all("a local share" in line for line in lost)
        assert "Task was destroyed" not in err, err  # updates left pending at the end
    assert stats.responses.get(200, 0) == 200
    assert stats.responses.get(429, 0) == 0  # the shares together kept within the limit
    assert stats.max_in_flight <= 2 or limit == "rate"
    assert served > 10


@pytest.mark.timeout(150)
def test_a_concurrency_smaller_than_the_processes_holds_through_a_redis_outage(
    tmp_path: Path,
) -> None:
    # 1 slot, 3 processes: at a local share each would take 1 (3 in flight of 1).
    # Only the first process by rank keeps one; the others wait (decision 0309).
    redis = pytest.importorskip("redis")
    port = _free_port()
    redis_server = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0?ttl=3"
    try:
        with SimServer(latency=0.05, max_in_flight=1, keep_requests=False) as server:
            procs = [_start(url, server, f"p{i}", 100, 0, 1) for i in range(3)]
            client = redis.Redis(port=port)
            _wait_for(lambda: [client.hlen(k) for k in client.scan_iter("fanflow:*:d")] == [3])
            _wait_for(lambda: server.stats().requests >= 40)  # each has declared since
            redis_server.terminate()
            redis_server.wait(10)
            down = server.stats().requests
            # The outage outlasts the TTL in which no process takes a new local slot
            # (the holder at the outage may go on alone until then): a scenario's
            # length, not a time asserted. They go on without the store.
            time.sleep(7)
            assert server.stats().requests >= down + 20
            redis_server = _start_redis(port, tmp_path)
            outs = [p.communicate(timeout=120) for p in procs]
            stats = server.stats()
    finally:
        redis_server.terminate()
        redis_server.wait(10)
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert '"ok": true' in out.strip().splitlines()[-1], out  # nothing lost
        assert "now takes one" not in err, err  # nobody waited out ALONE_AFTER
    assert stats.responses.get(200, 0) == 300
    assert stats.max_in_flight <= 1
    assert stats.responses.get(429, 0) == 0


@pytest.mark.timeout(90)
def test_a_process_that_ends_gives_its_slots_back_at_redis_with_nothing_left_pending(
    tmp_path: Path,
) -> None:
    # The last calls' releases are fire and forget. A process that ends at once must
    # still send them: not cancel them when its loop ends ("Task was destroyed but it
    # is pending!"), nor leave its slots at Redis until their TTL runs out.
    redis = pytest.importorskip("redis")
    port = _free_port()
    redis_server = _start_redis(port, tmp_path)
    try:
        with SimServer(latency=0.02, keep_requests=False) as server:
            for rpm in (0, 400):  # the concurrency alone, and with a rate
                proc = _start(f"redis://127.0.0.1:{port}/0", server, f"r{rpm}", 10, rpm, 2)
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                assert '"ok": true' in out, out
                assert "Task was destroyed" not in err, err
                assert "Exception ignored" not in err, err
                client = redis.Redis(port=port)
                assert list(client.scan_iter("fanflow:*:sn"))  # slots were taken there
                slots = [client.zcard(k) for k in client.scan_iter("fanflow:*:s")]
                assert sum(slots) == 0, slots  # and every one given back
                client.flushall()
    finally:
        redis_server.terminate()
        redis_server.wait(10)


@pytest.mark.timeout(120)
def test_a_new_process_starts_from_the_capacity_another_learnt(store: str) -> None:
    # No limits given (the default adaptive concurrency) against an 8-in-flight server:
    # the first process finds its capacity when its first wave of 16 meets 8 refusals,
    # and keeps what it learnt in the store; the second starts from it. (Against 40 in
    # flight the first wave, split since decision 0313, overshoots by only 2-6.)
    with SimServer(latency=0.1, max_in_flight=8, keep_requests=False) as server:
        assert '"ok": true' in _finish(_start(store, server, "first", 300, 0, 0))
        first = server.stats().responses.get(429, 0)
        assert '"ok": true' in _finish(_start(store, server, "second", 300, 0, 0))
        second = server.stats().responses.get(429, 0) - first
    assert first >= 8  # the first wave overshot: there was something to learn
    assert second * 4 <= first


def test_an_unknown_scheme_lists_the_forms_allowed() -> None:
    with pytest.raises(ConfigError, match=r"unknown scheme 'memcached'.*sqlite:///.*redis://"):
        Limits(rpm=10, shared="memcached://localhost:11211")


def test_a_password_never_shows_in_the_limits_repr() -> None:
    limits = Limits(rpm=10, shared="redis://user:hunter2secret@localhost:6379/0")
    assert "hunter2secret" not in repr(limits)
    assert "redis://***@localhost:6379/0" in repr(limits)


@pytest.mark.timeout(30)
async def test_an_unreachable_redis_is_named_without_its_password() -> None:
    url = f"redis://someone:hunter2secret@127.0.0.1:{_free_port()}/0"  # nothing listens
    async with SimServer() as server:
        llm = fanflow.openai(
            "gpt-sim", base_url=server.url, api_key="sk-test", limits=Limits(rpm=60, shared=url)
        )
        async with llm:
            result = await fanflow.map(llm, "{input}", ["a", "b"])
    assert not result.ok
    messages = [str(e) for e in result.errors.values()]
    assert messages
    assert all("cannot reach Redis at 'redis://***@127.0.0.1:" in m for m in messages)
    assert not any("hunter2secret" in m for m in messages)
    assert server.stats().requests == 0  # nothing went out unmetered


@pytest.mark.timeout(30)
async def test_the_stricter_of_two_declared_limits_holds_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'limits.db'}"
    async with SimServer(rpm=10, period=1.0) as server:

        def handle(rpm: int) -> fanflow.BaseLLM:
            limits = Limits(rpm=rpm, period=1.0, shared=url)
            return fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-k", limits=limits)

        loose, strict = handle(1000), handle(10)
        await fanflow.map(strict, "{input}", ["0"])  # the strict one declares first
        with caplog.at_level(logging.WARNING, logger="fanflow"):
            result = await fanflow.map(loose, "{input}", [str(i) for i in range(30)])
        stats = server.stats()
    assert result.ok
    assert stats.responses.get(429, 0) == 0  # 30 at 1000/s would meet an empty bucket
    warnings = [r.getMessage() for r in caplog.records if "shared limits" in r.getMessage()]
    assert len(warnings) == 1
    assert "this process declares rpm=1000" in warnings[0]
    assert "another declares rpm=10" in warnings[0]
    assert "sk-k" not in warnings[0]
