"""The live display in a real pseudo-terminal (pexpect), and Ctrl-C stopping cleanly."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pexpect = pytest.importorskip("pexpect")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def spawn(tmp_path: Path, env: dict[str, str], *args: str) -> Any:
    env = {**env, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    return pexpect.spawn(
        sys.executable,
        ["-m", "fanflow", *args],
        cwd=str(tmp_path),
        env=env,
        dimensions=(30, 100),
        encoding="utf-8",
        timeout=30,
    )


Env = Callable[[Any], dict[str, str]]


def test_live_display_on_a_terminal(tmp_path: Path, cli_env: Env) -> None:
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(40)))
    child = spawn(
        tmp_path, cli_env(None), "map", "in.txt", "-p", "{input}", "--provider", "sim",
        "--sim", "latency=0.1", "--concurrency", "4", "-o", "out.jsonl",
    )  # fmt: skip
    # The panel: a bar with the count and ETA, the counters, the rates; redrawn in place.
    child.expect(r"\d+/40 +\d+%  ETA")
    child.expect("in flight")
    child.expect(r"req/s .* tok/s")
    child.expect("fanflow summary")
    child.expect(pexpect.EOF)
    child.close()
    summary = ANSI.sub("", child.before or "")
    assert child.exitstatus == 0
    assert "speed-up" in summary
    assert re.search(r"succeeded +40", summary)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 40


def test_ctrl_c_stops_cleanly_and_the_job_resumes(tmp_path: Path, cli_env: Env) -> None:
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(120)))
    args = (
        "map", "in.txt", "-p", "{input}", "--provider", "sim", "--sim", "latency=0.1",
        "--concurrency", "4", "-o", "out.jsonl", "--job", "demo",
    )  # fmt: skip
    child = spawn(tmp_path, cli_env(None), *args)
    child.expect(r"done [1-9]")  # some items have finished
    child.sendintr()
    child.expect(r"interrupted; (\d+) items finished")
    finished = int(child.match.group(1))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    tail = " ".join(ANSI.sub("", child.before or "").split())
    assert "were not run" in tail
    assert "Finished items are saved in job 'demo'; to resume: fanflow map in.txt" in tail
    assert tail.rstrip().endswith("--job demo --resume")
    assert "Traceback" not in tail
    assert "Task was destroyed" not in tail
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    # Every finished item was written, none twice; the ones in flight were cancelled.
    assert len(rows) == finished < 120
    assert len({r["index"] for r in rows}) == len(rows)

    # Resuming repeats no finished call and completes the rest.
    child = spawn(tmp_path, cli_env(None), *args, "--resume")
    child.expect("fanflow summary")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    summary = ANSI.sub("", child.before or "")
    requests = int(re.search(r"requests +(\d+)", summary).group(1))  # type: ignore[union-attr]
    assert requests <= 120 - sum(r["status"] == "succeeded" for r in rows)
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(120))
    assert all(r["status"] == "succeeded" for r in rows)


def test_rows_to_the_same_terminal_print_above_the_panel(tmp_path: Path, cli_env: Env) -> None:
    import io

    (tmp_path / "in.txt").write_text("".join(f"{i}\n" for i in range(30)))
    child = spawn(
        tmp_path, cli_env(None), "map", "in.txt", "-p", "n {input}", "--provider", "sim",
        "--sim", "latency=0.1", "--concurrency", "4",
    )  # fmt: skip
    child.logfile_read = io.StringIO()
    child.expect("fanflow summary")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    screen = ANSI.sub("", child.logfile_read.getvalue()).replace("\r", "\n")
    rows = [line for line in screen.split("\n") if '"index"' in line]
    # Each result row is a whole line of its own, never glued to the panel's lines.
    assert all(line.startswith("{") for line in rows), rows
    assert sorted({json.loads(line)["index"] for line in rows}) == list(range(30))
