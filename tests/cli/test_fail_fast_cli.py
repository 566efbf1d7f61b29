"""Issue 13 through the command line (subprocesses against a real SimServer): one store
never serves one server's answers for another (13.1), a wrong key stops early with exit
2 and one message (13.2), a template field no row has is found before any call (13.2),
an unsafe template is refused (13.7), and no piece of an echoed key reaches the output,
the store or the terminal (13.4).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fanflow.testing import SimServer

Run = Callable[..., subprocess.CompletedProcess[str]]

KEY = "sk-proj-Zq8vN3xLw5Tb7Kc1Rm9Hy2Ud4Fs6Gj0PaEiOoQ"


def pieces(key: str) -> set[str]:
    return {key[i : i + 8] for i in range(len(key) - 7)}


def openai_args(url: str, *extra: str) -> list[str]:
    return ["--provider", "openai", "--base-url", url, "--model", "m", *extra]


def test_a_wrong_key_stops_early_with_exit_2_and_one_message(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"row {i}\n" for i in range(300)))
    with SimServer(api_key="sk-right") as server:
        done = run(
            "map", "in.txt", "-p", "{input}", *openai_args(server.url, "--concurrency", "4"),
            "--job", "j", env={"OPENAI_API_KEY": "sk-wrong-key-123456"},
        )  # fmt: skip
        sent = server.stats().requests
    assert done.returncode == 2, done.stderr
    assert sent <= 4 + 3, sent  # not 300
    out = done.stdout + done.stderr
    assert out.count("stopped early") == 1
    assert "check the API key" in out
    assert "Traceback" not in out
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 300  # every row ends with one status
    assert sum(r["status"] == "skipped" for r in rows) == 300 - sent


@pytest.mark.parametrize(
    "command",
    [["vote", "2+2?", "-n", "20"], ["fanout", "plan a trip"], ["best-of", "a haiku", "-n", "3"]],
    ids=["vote", "fanout", "best-of"],
)
def test_a_wrong_key_stops_every_pattern_command_with_exit_2_and_one_message(
    run: Run, command: list[str]
) -> None:
    """As map and run do: the breaker's message, once, and the usage exit code."""
    wrong = "sk-wrong-key-123456"
    with SimServer(api_key="sk-right") as server:
        done = run(*command, *openai_args(server.url), env={"OPENAI_API_KEY": wrong})
    assert done.returncode == 2, done.stderr
    out = done.stdout + done.stderr
    assert out.count("fanflow: stopped early") == 1, out
    assert "check the API key" in out
    assert "the remaining calls were not sent" in out
    assert "Traceback" not in out
    assert wrong not in out


def test_a_field_no_row_has_is_found_before_any_call(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(50))
    )
    with SimServer() as server:
        done = run("map", "in.jsonl", "-p", "Summarize: {txt}", *openai_args(server.url))
        assert server.stats().requests == 0
    assert done.returncode == 2
    assert "{txt}" in done.stderr
    assert "none of the first 8 items" in done.stderr
    assert "'id', 'text'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("template", ["{text.__class__.__mro__}", "{text!r:>99999999}"])
def test_unsafe_templates_are_refused(run: Run, tmp_path: Path, template: str) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    with SimServer() as server:
        done = run("map", "in.jsonl", "-p", template, *openai_args(server.url))
        assert server.stats().requests == 0
    assert done.returncode == 2
    assert "--prompt is not a valid template" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("echo", ["json", "text", "partial"])
def test_an_echoed_key_leaves_no_piece_in_cli_output_or_store(
    run: Run, tmp_path: Path, echo: str
) -> None:
    (tmp_path / "in.txt").write_text("a\nb\n")
    with SimServer(api_key="sk-right", echo_key=echo) as server:  # type: ignore[arg-type]
        done = run(
            "map", "in.txt", "-p", "{input}", *openai_args(server.url, "--retries", "0"),
            "-o", "out.jsonl", "--job", "leak", env={"OPENAI_API_KEY": KEY},
        )  # fmt: skip
    assert done.returncode in (1, 2)
    rows = (tmp_path / "out.jsonl").read_text()
    assert "AuthenticationError" in rows
    texts = [done.stdout, done.stderr, rows]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()]
    for text in texts:
        assert not [p for p in pieces(KEY) if p in text]


def test_one_store_two_base_urls_each_server_answers(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("alpha\nbeta\ngamma\n")

    def cli(url: str, job: str) -> list[str]:
        done = run(
            "map", "in.txt", "-p", "{input}", *openai_args(url), "--job", job, "-q",
            env={"OPENAI_API_KEY": "sk-cli"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return [json.loads(line)["output"] for line in done.stdout.splitlines()]

    with SimServer(reply="from A") as a, SimServer(reply="from B") as b:
        assert cli(a.url, "first") == ["from A"] * 3
        assert cli(b.url, "second") == ["from B"] * 3  # not A's answers from the store
        assert cli(a.url, "third") == ["from A"] * 3  # A's own answers: from the store
        assert (a.stats().requests, b.stats().requests) == (3, 3)


def test_a_pipeline_key_no_row_has_is_found_before_any_call(run: Run, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("steps:\n  - {name: summary, prompt: 'Summarize: {txt}'}\n")
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with SimServer() as server:
        done = run("run", "p.yaml", "in.jsonl", *openai_args(server.url))
        assert server.stats().requests == 0
    assert done.returncode == 2, done.stderr
    # Found by the pipeline's own field check (before the run opens a handle).
    assert "{txt}" in done.stderr
    assert "did you mean 'text'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_wrong_key_with_the_default_limits(run: Run, tmp_path: Path) -> None:
    """No --concurrency: the handle's cold start keeps the first wave small."""
    (tmp_path / "in.txt").write_text("".join(f"row {i}\n" for i in range(300)))
    with SimServer(api_key="sk-right") as server:
        done = run(
            "map", "in.txt", "-p", "{input}", *openai_args(server.url), "-o", "out.jsonl",
            env={"OPENAI_API_KEY": "sk-wrong-key-123456"},
        )  # fmt: skip
        sent = server.stats().requests
    assert done.returncode == 2, done.stderr
    assert sent <= 16, sent  # docs/errors.md: a new handle's first 16 calls, not 300
