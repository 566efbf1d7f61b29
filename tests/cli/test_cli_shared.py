"""``--shared-limits URL`` and ``FANFLOW_SHARED_LIMITS``: the command's handle shares its
limits through the store they name (the sharing itself: tests/limits/test_shared.py)."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

from fanflow.testing import SimServer

Run = Callable[..., subprocess.CompletedProcess[str]]


def _map(
    run: Run, tmp_path: Path, url: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "in.txt").write_text("".join(f"row {i}\n" for i in range(5)))
    return run(
        "map", "in.txt", "-p", "{input}", "--provider", "openai", "--model", "gpt-sim",
        "--base-url", url, "-o", "out.jsonl", "--rpm", "600", *extra,
        env={"OPENAI_API_KEY": "sk-test", **(env or {})},
    )  # fmt: skip


def _bookings(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM declared").fetchone()
    return int(n)


def test_the_flag_shares_the_limits_through_its_store(run: Run, tmp_path: Path) -> None:
    db = tmp_path / "limits.db"
    with SimServer() as server:
        done = _map(run, tmp_path, server.url, "--shared-limits", f"sqlite:///{db}")
    assert done.returncode == 0, done.stderr
    assert _bookings(db) == 1  # the run declared its limits there


def test_the_environment_variable_does_the_same(run: Run, tmp_path: Path) -> None:
    db = tmp_path / "env.db"
    with SimServer() as server:
        done = _map(run, tmp_path, server.url, env={"FANFLOW_SHARED_LIMITS": str(db)})
    assert done.returncode == 0, done.stderr
    assert _bookings(db) == 1


def test_an_unknown_scheme_names_the_flag_and_the_forms(run: Run, tmp_path: Path) -> None:
    with SimServer() as server:
        done = _map(run, tmp_path, server.url, "--shared-limits", "memcached://x:1")
    assert done.returncode != 0
    assert "--shared-limits" in done.stderr
    assert "sqlite:///" in done.stderr
    assert "redis://" in done.stderr
    assert "Traceback" not in done.stderr
