"""Issue 23 through the command line (subprocesses against two real SimServers):
``--deployment`` (repeated) with ``--route``, or ``[[deployment]]`` tables in the config
file, spread one run over several deployments; keys come from ``key-env`` variables and
are never printed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from fanflow.testing import SimServer

Run = Callable[..., subprocess.CompletedProcess[str]]

KEY_A = "sk-east-Zq8vN3xLw5Tb7Kc1Rm9H"
KEY_B = "sk-west-y2Ud4Fs6Gj0PaEiOoQ77"
ROWS = 40


def rows(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"row {i}\n" for i in range(ROWS)))


def test_deployments_spread_a_map_and_the_records_name_them(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    with (
        SimServer(latency=0.01, api_key=KEY_A, reply="ok") as a,
        SimServer(latency=0.01, api_key=KEY_B, reply="ok") as b,
    ):
        done = run(
            "map", "in.txt", "-p", "{input}", "--records", "rec.jsonl",
            "--deployment", f"east={a.url},model=m,key-env=EAST_KEY,rpm=6000",
            "--deployment", f"west={b.url},model=m,key-env=WEST_KEY,concurrency=4",
            env={"EAST_KEY": KEY_A, "WEST_KEY": KEY_B},
        )  # fmt: skip
        served = (a.stats().requests, b.stats().requests)
    assert done.returncode == 0, done.stderr
    assert min(served) > 0
    assert sum(served) >= ROWS
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(out) == ROWS
    records = [json.loads(line) for line in (tmp_path / "rec.jsonl").read_text().splitlines()]
    names = {r["deployment"]["name"] for r in records if r.get("deployment")}
    assert names == {"east", "west"}
    assert "answered by east" in done.stderr  # the summary counts items per deployment
    text = done.stdout + done.stderr + (tmp_path / "rec.jsonl").read_text()
    for key in (KEY_A, KEY_B):
        assert key[:12] not in text


def test_a_config_file_names_the_deployments_and_the_route(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    with SimServer(latency=0.01, reply="ok") as a, SimServer(latency=0.01, reply="ok") as b:
        (tmp_path / "fanflow.toml").write_text(
            f'route = "fallback"\nmodel = "m"\n\n'
            f'[[deployment]]\nname = "primary"\nurl = "{a.url}"\n\n'
            f'[[deployment]]\nname = "backup"\nurl = "{b.url}"\n'
        )
        done = run("map", "in.txt", "-p", "{input}")
        served = (a.stats().requests, b.stats().requests)
    assert done.returncode == 0, done.stderr
    assert served == (ROWS, 0)


def test_bad_deployments_say_what_to_fix(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    no_url = run("map", "in.txt", "-p", "{input}", "--deployment", "east,model=m")
    assert no_url.returncode == 2
    assert "NAME=URL first" in no_url.stderr + no_url.stdout
    no_key = run(
        "map", "in.txt", "-p", "{input}",
        "--deployment", "east=http://127.0.0.1:9/v1,model=m,key-env=NOT_SET_HERE",
    )  # fmt: skip
    assert no_key.returncode == 2
    assert "NOT_SET_HERE" in no_key.stderr + no_key.stdout
    unknown = run(
        "map", "in.txt", "-p", "{input}", "--deployment", "east=http://127.0.0.1:9/v1,colour=red"
    )
    assert "unknown key 'colour'" in unknown.stderr + unknown.stdout
    for done in (no_url, no_key, unknown):
        assert "Traceback" not in done.stderr
