"""The open-file limit: never 'check that the server is up' for our own EMFILE (issue 13
item 8). The CLI runs in a subprocess whose limit is lowered in ``preexec_fn``, against
SimServer over loopback (SimServer itself runs in this process, under its own limit)."""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from fanflow.providers._http import connection_error
from fanflow.providers._openfiles import connection_cap, is_out_of_files, open_file_limits
from fanflow.testing import SimServer

Env = Callable[[Mapping[str, str] | None], dict[str, str]]

LIMIT = 128  # descriptors the CLI may have open
CONCURRENCY = 400  # calls asked for at once: far more connections than fit


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(latency=0.3) as server:
        yield server


def _run(
    tmp_path: Path, url: str, env: dict[str, str], hard: int
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(CONCURRENCY * 2)))

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, hard))

    return subprocess.run(
        [sys.executable, "-m", "fanflow", "map", "in.txt", "-p", "{input}", "--base-url", url,
         "--model", "m", "--concurrency", str(CONCURRENCY), "--retries", "0", "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, preexec_fn=lower,
    )  # fmt: skip


def _all_succeeded(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert "Too many open files" not in done.stdout + done.stderr
    assert "check that the server is up" not in done.stdout + done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == CONCURRENCY * 2
    assert {r["status"] for r in rows} == {"succeeded"}, done.stderr
    assert done.returncode == 0, done.stderr


def test_a_low_soft_limit_is_raised_to_the_hard_limit(
    tmp_path: Path, sim: SimServer, cli_env: Env
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < CONCURRENCY * 2:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves nothing to raise")
    done = _run(tmp_path, sim.url, cli_env(None), hard)
    _all_succeeded(done)
    assert "open-file limit" not in done.stderr  # raised quietly: nothing to say


def test_a_hard_limit_caps_the_concurrency_and_says_so_once(
    tmp_path: Path, sim: SimServer, cli_env: Env
) -> None:
    done = _run(tmp_path, sim.url, cli_env(None), LIMIT)
    _all_succeeded(done)
    notes = [line for line in done.stderr.splitlines() if "open-file limit" in line]
    assert len(notes) == 1, done.stderr
    assert f"the open-file limit (ulimit -n) is {LIMIT} and the hard limit ({LIMIT})" in notes[0]
    assert f"instead of {CONCURRENCY}; raise the hard limit to run more" in notes[0]
    assert sim.stats().max_in_flight < LIMIT


def test_emfile_is_reported_as_the_process_limit_not_the_server() -> None:
    key = SimpleNamespace(host="h", port=80, ssl=None, is_ssl=False)  # what str() reads
    exc = aiohttp.ClientConnectorError(key, OSError(errno.EMFILE, "Too many open files"))  # type: ignore[arg-type]
    assert is_out_of_files(aiohttp.ClientOSError(errno.ENFILE, "File table overflow"))
    assert is_out_of_files(exc)
    error = connection_error("openai", "http://h/v1/chat/completions", exc, None)
    text = str(error)
    assert "too many files open" in text
    assert f"ulimit -n, is {open_file_limits().soft}" in text
    assert "server is up" not in text
    assert not getattr(error, "unreachable", False)  # the breaker must not read "nothing listening"
    assert not is_out_of_files(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))


def test_the_connection_cap_leaves_room_below_the_limit() -> None:
    soft = open_file_limits().soft
    assert 1 <= connection_cap(soft) < soft
    assert connection_cap(128) <= 128 - 32
    assert connection_cap(10) == 1  # never zero: one connection at a time still works
