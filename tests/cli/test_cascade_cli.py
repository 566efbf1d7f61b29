"""Issue 23 through the command line: ``--cascade`` asks the ``--deployment``'s in tiers
with an ``--accept`` rule (decision 0271), and ``--dry-run`` prices a router's and a
cascade's items (decision 0270). Subprocesses against real SimServers on loopback.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from fanflow.testing import SimRequest, SimServer

Run = Callable[..., subprocess.CompletedProcess[str]]

ROWS = [f"easy {i}" for i in range(12)] + [f"hard {i}" for i in range(4)]


def rows(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"{row}\n" for row in ROWS))


def unsure_on_hard(request: SimRequest) -> str:
    return "unsure" if request.messages[-1][1].startswith("hard") else "fine"


def deployments(small: str, big: str) -> list[str]:
    return [
        "--deployment", f"small={small},model=small",
        "--deployment", f"big={big},model=big",
    ]  # fmt: skip


def test_the_big_tier_answers_only_what_the_accept_rule_rejects(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    with (
        SimServer(latency=0.01, reply=unsure_on_hard) as small,
        SimServer(latency=0.01, reply="sure") as big,
    ):
        done = run(
            "map", "in.txt", "-p", "{input}", "--records", "rec.jsonl",
            *deployments(small.url, big.url),
            "--cascade", "small,big", "--accept", "reject:^unsure$",
            "--price", "small=1/1", "--price", "big=10/10",
        )  # fmt: skip
        escalated = set(big.stats().prompt_completed)
        asked = set(small.stats().prompt_completed)
    assert done.returncode == 0, done.stderr
    assert escalated == {r for r in ROWS if r.startswith("hard")}, done.stderr
    assert asked == set(ROWS), done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["output"] for row in out] == ["fine"] * 12 + ["sure"] * 4, done.stderr
    records = [json.loads(line) for line in (tmp_path / "rec.jsonl").read_text().splitlines()]
    assert sorted(r["deployment"]["name"] for r in records) == ["big"] * 4 + ["small"] * 12
    assert "answered by big" in done.stderr, done.stderr
    assert "saved vs the last tier" in done.stderr  # priced: the cascade's saving shown


def test_a_tier_of_two_is_spread_over_them(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    with (
        SimServer(latency=0.01, reply="fine") as a,
        SimServer(latency=0.01, reply="fine") as b,
        SimServer(latency=0.01, reply="sure") as big,
    ):
        done = run(
            "map", "in.txt", "-p", "{input}",
            "--deployment", f"a={a.url},model=small,concurrency=2",
            "--deployment", f"b={b.url},model=small,concurrency=2",
            "--deployment", f"big={big.url},model=big",
            "--cascade", "a+b,big", "--accept", "match:fine",
        )  # fmt: skip
        served = (a.stats().requests, b.stats().requests, big.stats().requests)
    assert done.returncode == 0, done.stderr
    assert served[0] > 0
    assert served[1] > 0
    assert served[0] + served[1] == len(ROWS)
    assert served[2] == 0


def test_dry_run_prices_a_cascade_on_its_first_tier_with_a_range(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    done = run(
        "map", "in.txt", "-p", "{input}", "--dry-run", "--max-tokens", "10",
        *deployments("http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"),
        "--cascade", "small,big", "--accept", "agreement:3>=0.6",
        "--price", "small=1/1", "--price", "big=10/10",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "48 calls would be sent (3 per item" in out
    assert "(if the first tier's answers are all kept)" in out
    assert "cost range" in out
    assert "small: 48 calls" in out
    assert "unknown" not in out


def test_dry_run_prices_a_spread_by_its_weights(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    done = run(
        "map", "in.txt", "-p", "{input}", "--dry-run", "--max-tokens", "10",
        "--deployment", "east=http://127.0.0.1:9/v1,model=small,weight=3",
        "--deployment", "west=http://127.0.0.1:10/v1,model=big",
        "--price", "small=1/1", "--price", "big=10/10",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "16 calls would be sent (one per item" in done.stdout
    assert "spread over the deployments by weight" in done.stdout
    assert "east: 12 calls" in done.stdout
    assert "west: 4 calls" in done.stdout


def test_unclear_cascades_say_what_to_fix(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    base = ["map", "in.txt", "-p", "{input}", "--dry-run"]
    two = deployments("http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1")
    cases = {
        "no --deployment": (["--cascade", "small,big", "--accept", "json"], "--deployment"),
        "needs --accept": ([*two, "--cascade", "small,big"], "--cascade needs --accept RULE"),
        "unknown tier": ([*two, "--cascade", "small,huge", "--accept", "json"], "'huge' is no"),
        "one left out": ([*two, "--cascade", "small", "--accept", "json"], "big are in no tier"),
        "unknown rule": ([*two, "--cascade", "small,big", "--accept", "maybe"], "not a rule"),
        "bad regex": ([*two, "--cascade", "small,big", "--accept", "match:("], "not a regular"),
        "bad share": ([*two, "--cascade", "small,big", "--accept", "agreement>=2"], "share"),
        "with --route": (
            [*two, "--cascade", "small,big", "--accept", "json", "--route", "fallback"],
            "give one",
        ),
        "--accept alone": (["--accept", "json"], "give the tiers with --cascade"),
    }
    for case, (extra, said) in cases.items():
        done = run(*base, *extra)
        text = done.stderr + done.stdout
        assert done.returncode == 2, (case, text)
        assert said in text, (case, text)
        assert "Traceback" not in text, case


def test_a_config_file_names_the_tiers_and_the_rule(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    with (
        SimServer(latency=0.01, reply=unsure_on_hard) as small,
        SimServer(latency=0.01, reply="sure") as big,
    ):
        (tmp_path / "fanflow.toml").write_text(
            f'cascade = "small,big"\naccept = "match:^fine$"\n\n'
            f'[[deployment]]\nname = "small"\nurl = "{small.url}"\nmodel = "small"\n\n'
            f'[[deployment]]\nname = "big"\nurl = "{big.url}"\nmodel = "big"\n'
        )
        done = run("map", "in.txt", "-p", "{input}")
        escalated = set(big.stats().prompt_completed)
    assert done.returncode == 0, done.stderr
    assert escalated == {r for r in ROWS if r.startswith("hard")}, done.stderr


def test_a_pipeline_run_escalates_through_the_cascade_too(run: Run, tmp_path: Path) -> None:
    rows(tmp_path)
    (tmp_path / "pipe.yaml").write_text("steps:\n  - prompt: '{input}'\n")
    with (
        SimServer(latency=0.01, reply=unsure_on_hard) as small,
        SimServer(latency=0.01, reply="sure") as big,
    ):
        done = run(
            "run", "pipe.yaml", "in.txt", "-o", "out.jsonl",
            *deployments(small.url, big.url),
            "--cascade", "small,big", "--accept", "reject:^unsure$",
        )  # fmt: skip
        escalated = set(big.stats().prompt_completed)
    assert done.returncode == 0, done.stderr
    assert escalated == {r for r in ROWS if r.startswith("hard")}, done.stderr
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(answers) == len(ROWS)
    assert "unsure" not in json.dumps(answers)  # every hard row was answered by the big tier
