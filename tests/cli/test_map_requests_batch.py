"""``fanflow map batch_input.jsonl --batch`` killed while its batch runs, then rerun: the
provider's batch holds the file's custom_ids, and the rerun polls that batch.

SimServer runs on a background thread (real time); the test waits on state (the batch
committed in the store), never on a guessed time.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from fanflow.testing import SimBatches, SimServer

N = 6


def batch_file(path: Path) -> None:
    with path.open("w") as f:
        for i in range(N):
            body = {"model": "gpt-sim", "messages": [{"role": "user", "content": f"q{i}"}]}
            row = {"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**row, "body": body}) + "\n")


def committed(db: Path) -> list[str]:
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT id FROM batches WHERE id NOT LIKE 'intent:%'")
            return [r[0] for r in rows]
    except sqlite3.OperationalError:  # not created yet
        return []


def input_ids(url: str, batch_id: str) -> list[str]:
    def get(path: str) -> bytes:
        request = urllib.request.Request(url + path, headers={"Authorization": "Bearer sk-t"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            data: bytes = reply.read()
        return data

    file_id = json.loads(get(f"/batches/{batch_id}"))["input_file_id"]
    return [json.loads(row)["custom_id"] for row in get(f"/files/{file_id}/content").splitlines()]


def test_a_killed_batch_run_resumes_with_the_files_custom_ids_in_the_batch(
    tmp_path: Path, cli_env: Callable[[Mapping[str, str] | None], dict[str, str]]
) -> None:
    batch_file(tmp_path / "batch_input.jsonl")
    env = cli_env({"OPENAI_API_KEY": "sk-t"})
    db = tmp_path / "s.db"
    with SimServer(batches=SimBatches(time=600.0)) as server:
        args = [sys.executable, "-m", "fanflow", "map", "batch_input.jsonl", "--batch"]
        args += ["--base-url", server.url, "--job", "b", "--store", str(db), "-o", "out.jsonl"]
        first = subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not committed(db):
                assert first.poll() is None, first.communicate()
                assert time.monotonic() < deadline, "the batch was never committed"
                time.sleep(0.02)
            first.send_signal(signal.SIGKILL)
        finally:
            first.communicate()
        (batch_id,) = committed(db)
        assert sorted(input_ids(server.url, batch_id)) == [f"task-{i}" for i in range(N)]
        server.set_batches(SimBatches(time=1.0))
        second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        stats = server.stats()
    assert second.returncode == 0, second.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out] == [f"task-{i}" for i in range(N)]
    assert [x["response"]["status_code"] for x in out] == [200] * N
    # One batch for both runs: the rerun polled it and submitted nothing.
    assert (stats.batches, stats.batch_requests, stats.requests) == (1, N, 0)
