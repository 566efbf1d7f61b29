"""``--model-limits`` and the config file's ``[model-limits]``: the models a request file
names get their own limits (the ``fanflow`` command in a subprocess, SimServer on
loopback in this process)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fanflow.testing import SimServer

Run = Callable[..., subprocess.CompletedProcess[str]]


def requests_file(path: Path) -> None:
    lines = [
        {"model": model, "messages": [{"role": "user", "content": f"{model} {i}"}]}
        for i in range(3)
        for model in ("m1", "m2")
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["flag", "config"])
def test_a_model_named_runs_at_its_own_concurrency(run: Run, tmp_path: Path, where: str) -> None:
    requests_file(tmp_path / "r.jsonl")
    given = ["--model-limits", "m2:concurrency=3"]
    if where == "config":
        (tmp_path / "fanflow.toml").write_text('[model-limits]\n"m2" = { concurrency = 3 }\n')
        given = []
    with SimServer(latency=0.5, keep_requests=False) as server:
        done = run(
            "map", "r.jsonl", "--provider", "openai", "--model", "m1", "--base-url",
            server.url, "--concurrency", "1", *given, env={"OPENAI_API_KEY": "sk-test"},
        )  # fmt: skip
        stats = server.stats()
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 6
    # m1 (not named: --concurrency 1) one at a time beside m2's three.
    assert stats.max_in_flight == 4


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("gpt-4o", "write MODEL:key=value"),
        ("gpt-4o:rpm=fast", "rpm must be a whole number >= 1"),
        ("gpt-4o:qps=3", "unknown key 'qps'; use rpm, tpm, concurrency"),
    ],
)
def test_a_bad_model_limit_is_named_with_the_fix(
    run: Run, tmp_path: Path, given: str, says: str
) -> None:
    requests_file(tmp_path / "r.jsonl")
    done = run("map", "r.jsonl", "--provider", "sim", "--model-limits", given)
    assert done.returncode == 2
    assert says in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_a_model_name_with_a_colon_reads_as_written(run: Run, tmp_path: Path) -> None:
    """``llama3:8b:rpm=6000,concurrency=3`` gives model ``llama3:8b`` (split at the last colon
    before the first ``=``) its limit: read as ``llama3`` with a key ``8b:concurrency``,
    the command would refuse it, and read as any other model, the limit would not show."""
    lines = [
        {"model": model, "messages": [{"role": "user", "content": f"{model} {i}"}]}
        for i in range(3)
        for model in ("m1", "llama3:8b")
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with SimServer(latency=0.5, keep_requests=False) as server:
        done = run(
            "map", "r.jsonl", "--provider", "openai", "--model", "m1", "--base-url",
            server.url, "--concurrency", "1", "--model-limits", "llama3:8b:rpm=6000,concurrency=3",
            env={"OPENAI_API_KEY": "sk-test"},
        )  # fmt: skip
        stats = server.stats()
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 6
    # m1 (not named: --concurrency 1) one at a time beside llama3:8b's three.
    assert stats.max_in_flight == 4


def test_model_limits_with_deployments_is_refused_with_the_fix(run: Run, tmp_path: Path) -> None:
    requests_file(tmp_path / "r.jsonl")
    done = run(
        "map", "r.jsonl", "--deployment", "east=http://127.0.0.1:9/v1,model=m1",
        "--model-limits", "m1:rpm=5",
    )  # fmt: skip
    assert done.returncode == 2
    assert "give each deployment its own rpm=N, tpm=N or concurrency=N" in done.stderr
