"""The command line's limits against a limiter fanflow did not write (issue 17).

nginx's ``limit_req`` (20 r/s, a burst of 20, nodelay, 429 without a Retry-After) in
front of SimServer, on loopback; the ``fanflow`` command in a subprocess. Real time: a
few seconds each, bounded by the rate.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fanflow.testing import SimServer

from .._helpers import require_nginx
from .._nginx import NginxLimitReq

Run = Callable[..., subprocess.CompletedProcess[str]]

require_nginx()  # skipped without nginx, an error in CI (.ci/run installs it)

N = 100


@pytest.fixture
def nginx() -> Iterator[str]:
    with SimServer(latency=0.2, keep_requests=False) as server:
        port = int(server.url.split(":")[-1].split("/")[0])
        with NginxLimitReq(port, "20r/s", burst=20, nodelay=True) as proxy:
            yield proxy.url


def _map(run: Run, tmp_path: Path, url: str, *extra: str) -> list[dict[str, object]]:
    (tmp_path / "in.txt").write_text("".join(f"row {i}\n" for i in range(N)))
    done = run(
        "map", "in.txt", "-p", "{input}", "--provider", "openai", "--model", "gpt-sim",
        "--base-url", url, "-o", "out.jsonl", "--records", "calls.jsonl", *extra,
        env={"OPENAI_API_KEY": "sk-test"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["succeeded"] * N
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def _refused(calls: list[dict[str, object]]) -> int:
    return sum(
        1
        for call in calls
        for attempt in call["attempts"]  # type: ignore[attr-defined]
        if attempt["rate_limited"]
    )


@pytest.mark.timeout(60)
def test_no_limits_given_adapts_instead_of_hammering(run: Run, tmp_path: Path, nginx: str) -> None:
    # Without --concurrency the command uses the library's default (adaptive): the first
    # wave may overshoot, then the in-flight limit holds near what nginx accepts. With
    # no limit at all, each 429 (answered at once) freed its slot for the next request:
    # 3,078 429s for 200 rows, found trying the CLI as a new user.
    refused = _refused(_map(run, tmp_path, nginx))
    assert refused < N, refused


@pytest.mark.timeout(60)
def test_rpm_alone_paces_without_429s(run: Run, tmp_path: Path, nginx: str) -> None:
    assert _refused(_map(run, tmp_path, nginx, "--rpm", "1200")) == 0
