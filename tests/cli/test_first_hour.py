"""Issue 15, a newcomer's first hour: provider choice, keys, messages in flag names, input
and output formats, pipes, empty input, ``--sim`` keys, the budget message.

Every test runs the real ``fanflow`` entry point in a subprocess; servers are SimServer on
loopback (run in a background thread by its sync context manager).
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fanflow.testing import FAULTS, SimServer

Run = Callable[..., subprocess.CompletedProcess[str]]

SIM = ["--provider", "sim", "--sim", "latency=0.01"]
KEY = "sk-newcomer-0123456789abcdef"


def rows(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def items(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"t": f"item {i}"}) + "\n" for i in range(n)))


@pytest.fixture
def server() -> Iterator[SimServer]:
    with SimServer(latency=0.001) as s:
        yield s


# -- which provider, which key --------------------------------------------------------------


def test_base_url_means_openai_even_with_an_anthropic_key(
    run: Run, tmp_path: Path, server: SimServer
) -> None:
    items(tmp_path / "in.jsonl", 3)
    done = run(
        "map", "in.jsonl", "-p", "{t}", "--base-url", server.url, "--model", "m", "-q",
        env={"ANTHROPIC_API_KEY": "sk-ant-not-for-this-server"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in rows(done.stdout)] == [f"echo: item {i}" for i in range(3)]
    assert {r.api for r in server.requests} == {"openai"}


def test_base_url_with_provider_anthropic_speaks_anthropic(
    run: Run, tmp_path: Path, server: SimServer
) -> None:
    items(tmp_path / "in.jsonl", 2)
    done = run(
        "map", "in.jsonl", "-p", "{t}", "--provider", "anthropic", "--base-url", server.root,
        "--model", "claude-x", "--api-key", KEY, "-q",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {r.api for r in server.requests} == {"anthropic"}


def test_openai_base_url_from_the_environment_needs_no_key(
    run: Run, tmp_path: Path, server: SimServer
) -> None:
    items(tmp_path / "in.jsonl", 2)
    done = run(
        "map", "in.jsonl", "-p", "{t}", "--model", "m", "-q", env={"OPENAI_BASE_URL": server.url}
    )
    assert done.returncode == 0, done.stderr
    assert len(server.requests) == 2


def test_api_key_flag_and_variable_are_sent_and_never_shown(run: Run, tmp_path: Path) -> None:
    items(tmp_path / "in.jsonl", 2)
    with SimServer(api_key=KEY) as server:
        base = ["map", "in.jsonl", "-p", "{t}", "--base-url", server.url, "--model", "m"]
        done = run(*base, "--api-key", KEY)
        assert done.returncode == 0, done.stderr
        done = run(*base, env={"FANFLOW_API_KEY": KEY})
        assert done.returncode == 0, done.stderr
        wrong = "sk-wrong-key-9876543210fedcba"
        done = run(*base, "--api-key", wrong)
    assert done.returncode == 1
    out = rows(done.stdout)
    assert all(str(r["error"]).startswith("AuthenticationError") for r in out)
    for text in (done.stdout, done.stderr):
        assert wrong not in text
        assert wrong[-8:] not in text
    # The fix is given as the flag a command-line user types, not the library's argument.
    assert "--api-key" in str(out[0]["error"])
    assert "api_key=" not in done.stdout + done.stderr


def test_no_key_for_openai_says_pass_api_key(run: Run, tmp_path: Path) -> None:
    items(tmp_path / "in.jsonl", 1)
    done = run("map", "in.jsonl", "-p", "{t}", "--provider", "openai", "--model", "gpt-4o")
    assert done.returncode == 2
    assert "pass --api-key or set OPENAI_API_KEY" in done.stderr
    assert "api_key=" not in done.stderr


def _interrupted(folder: Path, key_args: list[str], env: dict[str, str]) -> str:
    """The standard error of ``fanflow map ... KEY_ARGS --job j`` stopped with Ctrl-C
    once it has written its first row (the resume hint is printed then)."""
    import signal

    folder.mkdir()
    items(folder / "in.jsonl", 400)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanflow", "map", "in.jsonl", "-p", "{t}", "--provider", "sim",
         "--sim", "latency=0.1", "--concurrency", "4", "--progress", "none", *key_args,
         "--job", "j"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first row: the run is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    return err


@pytest.mark.timeout(120)
def test_resume_hint_never_repeats_the_key(tmp_path: Path, cli_env: Any) -> None:
    env = cli_env(None)
    hint = _interrupted(tmp_path / "spaced", ["--api-key", KEY], env)
    assert "to resume (with the API key in FANFLOW_API_KEY): fanflow map in.jsonl -p" in hint
    assert KEY not in hint
    assert "--job j --resume" in hint
    assert "FANFLOW_API_KEY" in hint
    assert KEY not in _interrupted(tmp_path / "joined", [f"--api-key={KEY}"], env)


def test_timeout_message_names_the_flag(run: Run, tmp_path: Path) -> None:
    items(tmp_path / "in.jsonl", 1)
    done = run(
        "map", "in.jsonl", "-p", "{t}", "--provider", "sim", "--sim", "latency=2",
        "--timeout", "0.05", "--retries", "0", "-q",
    )  # fmt: skip
    assert done.returncode == 1
    error = str(rows(done.stdout)[0]["error"])
    assert "raise --timeout" in error
    assert "timeout=" not in error


def test_budget_message_names_the_output_tokens_assumed_and_max_tokens(
    run: Run, tmp_path: Path
) -> None:
    items(tmp_path / "in.jsonl", 1)
    done = run("map", "in.jsonl", "-p", "{t}", *SIM, "--model", "gpt-4o", "--budget", "0.001", "-q")
    assert done.returncode == 1
    error = str(rows(done.stdout)[0]["error"])
    assert re.search(r"plus [\d,]+ output tokens, the max_tokens assumed per call", error), error
    assert "raise --budget or lower --max-tokens" in error
    done = run(
        "map", "in.jsonl", "-p", "{t}", *SIM, "--model", "gpt-4o", "--budget", "0.001",
        "--max-tokens", "50", "-q",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


# -- input and output -------------------------------------------------------------------------


def test_jsonl_on_stdin_is_read_as_jsonl(run: Run) -> None:
    lines = "".join(json.dumps({"name": n}) + "\n" for n in ("ann", "bob"))
    done = run("map", "-", "-p", "hi {name}", *SIM, "-q", stdin="\n" + lines)
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in rows(done.stdout)] == ["echo: hi ann", "echo: hi bob"]
    # Text stays text, and --input-format still decides when given.
    done = run("map", "-", "-p", "say {input}", *SIM, "-q", stdin="one\ntwo\n")
    assert [r["output"] for r in rows(done.stdout)] == ["echo: say one", "echo: say two"]
    done = run("map", "-", "-p", "say {input}", *SIM, "-q", "--input-format", "text", stdin=lines)
    assert rows(done.stdout)[0]["output"] == 'echo: say {"name": "ann"}'


def test_piped_into_head_ends_quietly(
    tmp_path: Path, cli_env: Callable[..., dict[str, str]]
) -> None:
    items(tmp_path / "in.jsonl", 3000)
    command = (
        f"{sys.executable} -m fanflow map in.jsonl -p '{{t}}' --provider sim "
        "--sim latency=0.001 --concurrency 200 | head -1; echo status=${PIPESTATUS[0]} >&2"
    )
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=cli_env(None), capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert len(done.stdout.splitlines()) == 1
    assert json.loads(done.stdout)["index"] == 0
    assert "Traceback" not in done.stderr
    assert "BrokenPipeError" not in done.stderr
    assert "status=141" in done.stderr


def test_output_format_follows_the_extension(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"t": "a, \\"b\\""}\n{"t": "c"}\n')
    done = run("map", "in.jsonl", "-p", "{t}", *SIM, "-o", "out.csv", "-q")
    assert done.returncode == 0, done.stderr
    table = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert [r["output"] for r in table] == ['echo: a, "b"', "echo: c"]
    assert list(table[0]) == ["index", "line", "input", "status", "output", "error"]
    assert json.loads(table[1]["input"]) == {"t": "c"}
    done = run("map", "in.jsonl", "-p", "{t}", *SIM, "-o", "out.txt")
    assert done.returncode == 2
    assert "-o out.txt: extension '.txt'" in done.stderr
    assert ".csv" in done.stderr
    assert not (tmp_path / "out.txt").exists()


def test_empty_input_warns_with_its_own_exit_code(run: Run, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    done = run("map", "empty.jsonl", "-p", "{t}", *SIM)
    assert done.returncode == 3
    assert "warning: empty.jsonl holds no items; nothing was run" in done.stderr
    done = run("map", "-", "-p", "{t}", *SIM, stdin="")
    assert done.returncode == 3
    assert "standard input holds no items" in done.stderr


def test_bad_json_line_reads_once(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"t": "ok"}\n{"t": "a\tb"}\n')
    done = run("map", "in.jsonl", "-p", "{t}", *SIM, "-q")
    assert done.returncode == 1
    assert "in.jsonl:2: not valid JSON (Invalid control character at column" in done.stderr
    assert "at at" not in done.stderr


# -- --sim -------------------------------------------------------------------------------------


def test_sim_help_lists_exactly_the_keys_the_parser_accepts(run: Run, tmp_path: Path) -> None:
    done = run("map", "--help", env={"COLUMNS": "1000"})
    match = re.search(r"--sim SPEC\s+(.*?)(?:\n  -|\n\n)", done.stdout, flags=re.S)
    assert match is not None, done.stdout
    help_text = " ".join(match.group(1).split())
    listed = re.findall(r"keys: (.*?), or a fault kind", help_text)[0].split(", ")
    faults = re.findall(r"probability \((.*?)\)", help_text)[0].split(", ")
    assert set(faults) == set(FAULTS)
    assert "failure_rate" not in help_text
    assert "rate_limit_rate" not in help_text
    items(tmp_path / "in.jsonl", 1)
    values = {"reply": "ok", "seed": "1", "rpm": "600", "tpm": "100000", "max_in_flight": "5"}
    spec = ",".join(f"{k}={values.get(k, '0')}" for k in [*listed, *faults])
    done = run("map", "in.jsonl", "-p", "{t}", "--provider", "sim", "--sim", spec, "-q")
    assert done.returncode == 0, done.stderr


def test_sim_unknown_key_is_reported_as_unknown(run: Run, tmp_path: Path) -> None:
    items(tmp_path / "in.jsonl", 1)
    done = run("map", "in.jsonl", "-p", "{t}", "--provider", "sim", "--sim", "failure_rate=0.05")
    assert done.returncode == 2
    assert "unknown key 'failure_rate'" in done.stderr
    assert "must be a number" not in done.stderr
    done = run("map", "in.jsonl", "-p", "{t}", "--provider", "sim", "--sim", "500=lots")
    assert "500 must be a number, got 'lots'" in done.stderr


# -- logging -----------------------------------------------------------------------------------


def test_verbose_logs_retries_and_attempts_never_the_key(run: Run, tmp_path: Path) -> None:
    items(tmp_path / "in.jsonl", 1)

    def go(*extra: str) -> subprocess.CompletedProcess[str]:
        # A server of its own each time: the scripted 429 is for the first request only.
        with SimServer(api_key=KEY, fault_on={"item": ["429"]}) as server:
            return run(
                "map", "in.jsonl", "-p", "{t}", "--base-url", server.url, "--model", "m",
                "--api-key", KEY, "--progress", "none", *extra,
            )  # fmt: skip

    quiet, info, debug = go(), go("-v"), go("--log-level", "debug")
    assert quiet.returncode == info.returncode == debug.returncode == 0
    assert "fanflow: info:" not in quiet.stderr
    assert "fanflow: info: item 0: attempt 1 got a 429 (rate limited)" in info.stderr
    assert "retrying in" in info.stderr
    assert "attempt 1 sent" not in info.stderr
    assert "fanflow: debug: item 0: attempt 1 sent (model m)" in debug.stderr
    assert "fanflow: debug: item 0: attempt 2 succeeded" in debug.stderr
    for done in (quiet, info, debug):
        assert KEY not in done.stderr + done.stdout
        assert "prompt:" not in done.stderr


# -- pipelines: --check finds fields that nothing provides ----------------------------------

PIPELINE = """\
input: items.jsonl
settings:
  provider: sim
steps:
  - name: summary
    prompt: "Summarize: {text}"
  - name: tone
    prompt: "Tone of: {summry}"
"""


def test_check_finds_a_field_nothing_provides_and_suggests_the_name(
    run: Run, tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    (tmp_path / "items.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    for extra in (("--check",), ("-q",)):  # and a run stops before any call
        done = run("run", "p.yaml", *extra, "--sim", "latency=0.01")
        assert done.returncode == 2, done.stderr
        assert "p.yaml:7: steps[1] (tone): the prompt's {summry} is not a field" in done.stderr
        assert "available: text, summary" in done.stderr
        assert "did you mean 'summary'?" in done.stderr
        assert done.stdout == ""
    fixed = PIPELINE.replace("{summry}", "{summary}")
    (tmp_path / "p.yaml").write_text(fixed)
    done = run("run", "p.yaml", "--check")
    assert done.returncode == 0, done.stderr
    assert "is valid: 2 steps (chain)" in done.stdout
    # In a chain a step sees only earlier steps; an input field typo is caught the same way.
    swapped = fixed.replace("{text}", "{tone}")
    (tmp_path / "p.yaml").write_text(swapped)
    done = run("run", "p.yaml", "--check")
    assert done.returncode == 2
    assert "the prompt's {tone} is not a field of the input nor the output of an earlier" in (
        done.stderr
    )
    (tmp_path / "p.yaml").write_text(fixed.replace("{text}", "{txt}"))
    assert "did you mean 'text'?" in run("run", "p.yaml", "--check").stderr


def test_check_suggests_a_mistyped_step_key(run: Run, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE.replace('prompt: "Tone', 'promt: "Tone'))
    (tmp_path / "items.jsonl").write_text('{"text": "a"}\n')
    done = run("run", "p.yaml", "--check")
    assert done.returncode == 2
    assert "steps[1].promt: unknown step field; did you mean 'prompt'?" in done.stderr


# -- prices ------------------------------------------------------------------------------------


def test_price_flag_prices_a_model(run: Run, tmp_path: Path) -> None:
    items(tmp_path / "in.jsonl", 4)
    dry = ("map", "in.jsonl", "-p", "{t}", "--provider", "sim", "--model", "my-model")
    done = run(*dry, "--dry-run")
    assert "cost           unknown: no price for model 'my-model'" in done.stdout
    assert "--price MODEL=IN/OUT" in done.stdout
    done = run(*dry, "--dry-run", "--price", "my-model=1000000/0")  # $1 per input token
    assert done.returncode == 0, done.stderr
    assert re.search(r"cost\s+at most \$\d+\.\d{4} \(model my-model\)", done.stdout)
    (tmp_path / "prices.toml").write_text('[models]\n"my-model" = { input = 1, output = 2 }\n')
    done = run(*dry, "--price", "prices.toml", "-q", "--sim", "latency=0.001")
    assert done.returncode == 0, done.stderr
    done = run(*dry, "--price", "my-model=cheap")
    assert done.returncode == 2
    assert "--price my-model=cheap: write MODEL=INPUT/OUTPUT" in done.stderr


def test_price_flag_feeds_the_budget(run: Run, tmp_path: Path) -> None:
    items(tmp_path / "in.jsonl", 2)
    done = run(
        "map", "in.jsonl", "-p", "{t}", *SIM, "--model", "my-model", "--budget", "1", "-q",
        "--price", "my-model=1000000/1000000",  # $1 a token: no call fits in $1
    )  # fmt: skip
    assert done.returncode == 1
    errors = [str(r["error"]) for r in rows(done.stdout)]
    # Priced by --price (without it: "the price of model 'my-model' is unknown").
    assert all(e.startswith("BudgetExceeded") and "needs an estimated $" in e for e in errors)


def test_sim_knobs_alone_choose_the_simulated_model(run: Run, tmp_path: Path) -> None:
    # Found trying the CLI as a new user: `--sim latency=0.5` without `--provider sim`
    # fell back to the local model (minutes of real generation, no word about --sim).
    items(tmp_path / "in.jsonl", 3)
    done = run("map", "in.jsonl", "-p", "{t}", "--sim", "reply=pong", "-o", "out.jsonl", "-q")
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in rows((tmp_path / "out.jsonl").read_text())] == ["pong"] * 3
    done = run("map", "in.jsonl", "-p", "{t}", "--provider", "openai", "--sim", "reply=pong")
    assert done.returncode == 2
    assert "--sim" in done.stderr
    assert "--provider sim" in done.stderr
