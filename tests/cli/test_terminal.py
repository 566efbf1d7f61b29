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


def test_ctrl_c_stops_cleanly_and_keeps_finished_rows(tmp_path: Path, cli_env: Env) -> None:
    (tmp_path / "in.txt").write_text("".join(f"item {i}\n" for i in range(400)))
    child = spawn(
        tmp_path, cli_env(None), "map", "in.txt", "-p", "{input}", "--provider", "sim",
        "--sim", "latency=0.2", "--concurrency", "4", "-o", "out.jsonl",
    )  # fmt: skip
    child.expect(r"done [1-9]")  # some items have finished
    child.sendintr()
    child.expect(r"interrupted; (\d+) items finished")
    finished = int(child.match.group(1))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    tail = ANSI.sub("", child.before or "")
    assert "were not run" in tail
    assert "Run the command again" in tail
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    # Every finished item was written, and none twice; the ones in flight were cancelled.
    assert len({r["index"] for r in rows}) == len(rows)
    assert sum(r["status"] == "succeeded" for r in rows) >= 1
    assert len(rows) == finished
    assert finished < 400
