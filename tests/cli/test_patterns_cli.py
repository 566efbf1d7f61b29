"""``fanflow vote / fanout / best-of / run`` through the entry point, on the simulated model."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]
SIM = ["--provider", "sim", "--sim", "latency=0.01"]


def test_vote_prints_the_majority(run: Run) -> None:
    done = run("vote", "What is 2+2?", "-n", "5", *SIM, "--sim", "latency=0.01,reply=4", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["winner"] == "4"
    assert (data["count"], data["counted"], data["confidence"]) == (5, 5, 1.0)
    assert "fanflow vote" in done.stderr
    assert "calls" in done.stderr


def test_vote_all_failed_exits_1(run: Run) -> None:
    done = run(
        "vote", "q", "-n", "3", "--provider", "sim",
        "--sim", "latency=0,500=1", "--retries", "0",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert "AllFailed" in done.stderr


def test_fanout_workers_and_concat(run: Run) -> None:
    done = run(
        "fanout", "Plan a trip", "--focus", "cost", "--focus", "time",
        "--aggregate", "concat", "--json", *SIM,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["aggregation"] == "concat"
    assert [w["status"] for w in data["workers"]] == ["succeeded", "succeeded"]
    assert "Focus on: cost" in data["answer"]
    assert "Focus on: time" in data["answer"]


def test_best_of_reads_the_task_from_stdin(run: Run) -> None:
    done = run("best-of", "-", "-n", "3", *SIM, "-q", stdin="Write a haiku\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "echo: Write a haiku"
    assert done.stderr == ""


def test_empty_task_is_a_usage_error(run: Run) -> None:
    done = run("vote", "-", *SIM, stdin="  \n")
    assert done.returncode == 2
    assert "the task is empty" in done.stderr


PIPELINE = """\
input: items.jsonl
settings:
  provider: sim
  concurrency: 4
max_flows: 3
steps:
  - name: summary
    prompt: "Summarize: {text}"
  - name: tone
    prompt: "Tone of: {summary}"
    max_tokens: 5
"""


def test_run_pipeline_chain(run: Run, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    (tmp_path / "items.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n{"text": "c"}\n')
    done = run("run", "p.yaml", "-o", "out.jsonl", "--sim", "latency=0.01")
    assert done.returncode == 1  # item 1 has no 'text'
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["succeeded", "failed", "succeeded"]
    assert rows[0]["steps"] == {
        "summary": "echo: Summarize: a",
        "tone": "echo: Tone of: echo: Summarize:",  # max_tokens: 5 (SimServer counts words)
    }
    assert rows[0]["output"] == "echo: Tone of: echo: Summarize:"
    assert rows[1]["failed_step"] == "summary"
    assert "needs key 'text'" in rows[1]["error"]
    assert "1 of 3 items did not succeed" in done.stderr


def test_run_pipeline_flow_with_named_model(run: Run, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "kind: flow\nsettings: {provider: sim}\nmodels:\n  judge: {model: big}\nsteps:\n"
        "  - {name: a, prompt: 'A {input}'}\n"
        "  - {name: b, prompt: 'B {input}', model: judge}\n"
        "  - {name: both, prompt: '{a} + {b}'}\n"
    )
    (tmp_path / "lines.txt").write_text("x\ny\n")
    done = run("run", "p.yaml", "lines.txt", "--sim", "latency=0.01", "-q")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in done.stdout.splitlines()]
    assert rows[1]["output"]["both"] == "echo: echo: A y + echo: B y"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: []\n", "p.yaml:1: steps: is empty"),
        ("stepz: []\n", "p.yaml:1: stepz: unknown top-level field"),
        ("steps:\n  - name: a\n", "p.yaml:2: steps[0]: missing 'prompt:'"),
        (
            "steps:\n  - prompt: x\n    temperature: hot\n",
            "p.yaml:3: steps[0].temperature: must be a number",
        ),
        (
            "steps:\n  - prompt: x\n    model: judge\n",
            "p.yaml:3: steps[0].model: unknown model 'judge'",
        ),
        (
            "settings:\n  provider: sim\n  concurrency: 0\nsteps:\n  - prompt: x\n",
            "p.yaml:3: settings.concurrency: concurrency must be >= 1",
        ),
        (
            "steps:\n  - {prompt: x, name: a}\n  - {prompt: y, name: a}\n",
            "p.yaml:3: steps[1]: output 'a' is already written by step 1",
        ),
        ("steps:\n  - prompt: x\n    after: [a]\n", "only a flow has 'after:'"),
        ("steps:\n  - prompt: '{x'\n", "steps[0].prompt: not a valid template"),
        ("steps: [\n", "p.yaml:2: not valid YAML"),
        (
            "steps: [a, b\n\n",
            "p.yaml:1: not valid YAML: while parsing a flow sequence that is never",
        ),
    ],
)
def test_pipeline_errors_name_line_and_field(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    from fanflow.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(text)
    code = main(["run", "p.yaml", "in.txt", "--provider", "sim", "--check"], env={})
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err


def test_pipeline_check(run: Run, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    done = run("run", "p.yaml", "--check")
    assert done.returncode == 0, done.stderr
    assert "p.yaml is valid: 2 steps (chain)" in done.stdout


def test_run_pipeline_job_replays_from_the_store(run: Run, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    (tmp_path / "items.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    first = run("run", "p.yaml", "--job", "pj", "--sim", "latency=0.01")
    assert first.returncode == 0, first.stderr
    assert re.search(r"requests +4\b", first.stderr)
    again = run("run", "p.yaml", "--job", "pj", "--resume", "--sim", "latency=0.01")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout  # same rows, every call served from the store
    assert re.search(r"requests +0\b", again.stderr)


def test_vote_budget_too_small_skips_every_sample(run: Run) -> None:
    done = run(
        "vote", "Q", "-n", "3", "--provider", "sim", "--sim", "latency=0.01",
        "--model", "gpt-4o-mini", "--max-tokens", "100", "--budget", "0.00001",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert re.search(r"BudgetExceeded +3", done.stderr)
    assert re.search(r"requests +0\b", done.stderr)
    assert re.search(r"speed-up +n/a", done.stderr)
    assert "AllFailed" in done.stderr
