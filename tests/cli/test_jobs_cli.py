"""``fanflow map --job``, ``fanflow jobs`` and ``fanflow report NAME`` against a real store."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_job_failures_listed_then_rerun_only_failed(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"x{i}\n" for i in range(30)))
    common = ("map", "in.txt", "-p", "{input}", "--provider", "sim", "--job", "j1", "-q")
    done = run(*common, "--sim", "latency=0.001,500=0.3,seed=7", "--retries", "0")
    assert done.returncode == 1
    first = [json.loads(x) for x in done.stdout.splitlines()]
    failed = [r["index"] for r in first if r["status"] != "succeeded"]
    assert 0 < len(failed) < 30

    done = run("jobs")
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.strip().startswith("j1"))
    assert line.split()[:6] == ["j1", "30", str(30 - len(failed)), str(len(failed)), "0", "1"]

    done = run("jobs", "show", "j1", "--limit", "2")
    assert done.returncode == 0
    assert f"job j1: {30 - len(failed)} of 30 succeeded, {len(failed)} failed" in done.stdout
    assert "ServerError" in done.stdout
    assert f"and {len(failed) - 2} more" in done.stdout

    done = run(*common, "--sim", "latency=0.001", "--only-failed", "--progress", "none")
    assert done.returncode == 0, done.stderr
    second = [json.loads(x) for x in done.stdout.splitlines()]
    assert all(r["status"] == "succeeded" for r in second)
    # The succeeded items came from the store: their outputs are the first run's.
    assert [r["output"] for r in second if r["index"] not in failed] == [
        r["output"] for r in first if r["index"] not in failed
    ]

    # The job's call records feed the report: both runs, retried items twice.
    done = run("report", "j1", "-o", "r.html")
    assert done.returncode == 0, done.stderr
    assert "<h2>Timeline</h2>" in (tmp_path / "r.html").read_text()
    records = (tmp_path / ".fanflow" / "records" / "j1.jsonl").read_text().splitlines()
    assert len(records) == 30 + len(failed)


def test_job_errors(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\n")
    done = run("map", "in.txt", "-p", "{input}", "--provider", "sim", "--job", "x", "--resume")
    assert done.returncode == 2
    assert "no job 'x'" in done.stderr
    assert "run without --resume" in done.stderr
    done = run("jobs")
    assert done.returncode == 0  # the failed --resume still created an empty store
    done = run("jobs", "show", "nope")
    assert done.returncode == 2
    assert "no job 'nope'" in done.stderr
    done = run("jobs", "--store", "elsewhere.db")
    assert done.returncode == 2
    assert "no store at elsewhere.db" in done.stderr
    done = run("report", "nope")
    assert done.returncode == 2
    assert "nope is neither a records file nor a job" in done.stderr
