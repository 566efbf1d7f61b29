"""``fanflow map FILE`` without ``-p``: Batch API input files and the cookbook's request
files run as written, answered in their own shape (a subprocess through the real entry
point, a simulated model; the answers read back with the official openai package)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]

SIM = ["--provider", "sim", "--sim", "latency=0.01"]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def lines_of(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def sdk_bodies() -> list[dict[str, Any]]:
    """Chat-completions bodies as the official openai client writes them (captured at a
    SimServer): tools, a tool turn, max_completion_tokens, stop, response_format."""
    openai = pytest.importorskip("openai")
    from fanflow.testing import SimServer

    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    with SimServer() as server:
        client = openai.OpenAI(base_url=server.url, api_key="sk-sdk", max_retries=0)
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            ],
            tools=TOOLS,
            max_completion_tokens=12,
            temperature=0.3,
        )
        client.chat.completions.create(
            model="gpt-4.1-mini",
            messages=[{"role": "user", "content": "Name a colour."}],
            stop=["\n"],
            response_format={"type": "json_object"},
            max_tokens=8,
        )
        bodies = [r.body for r in server.requests]
        client.close()
    return bodies


def batch_file(path: Path, bodies: list[dict[str, Any]]) -> Path:
    return write(
        path,
        [
            {"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
            for i, b in enumerate(bodies)
        ],
    )


def check_batch_output(line: dict[str, Any]) -> Any:
    """One line of the Batch API's output format; its body read by the openai package."""
    from openai.types.chat import ChatCompletion

    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["id"].startswith("batch_req_")
    response = line["response"]
    assert set(response) == {"status_code", "request_id", "body"}
    if response["status_code"] != 200:
        return response["body"]["error"]
    assert line["error"] is None
    return ChatCompletion.model_validate(response["body"])


def test_a_batch_input_file_written_by_the_sdk_runs_as_written(run: Run, tmp_path: Path) -> None:
    batch_file(tmp_path / "batch_input.jsonl", sdk_bodies())
    done = run("map", "batch_input.jsonl", *SIM)
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    assert [line["custom_id"] for line in out] == ["task-0", "task-1"]
    first, second = (check_batch_output(line) for line in out)
    assert first.model == "gpt-4o-mini"  # each line's own model
    assert second.model == "gpt-4.1-mini"
    assert first.choices[0].message.content.startswith("echo: ")
    assert first.usage is not None
    assert first.usage.prompt_tokens > 0


def test_an_error_answer_keeps_the_status_code(run: Run, tmp_path: Path) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
    batch_file(tmp_path / "b.jsonl", [body])
    done = run("map", "b.jsonl", *SIM)
    assert done.returncode == 1
    (line,) = lines_of(done.stdout)
    assert line["response"]["status_code"] == 400
    error = check_batch_output(line)
    assert "max_tokens" in error["message"]
    assert error["type"] == "bad_request"


def test_a_cookbook_file_is_answered_as_the_cookbook_writes(run: Run, tmp_path: Path) -> None:
    from openai.types.chat import ChatCompletion

    bodies = [
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "a"}],
            "metadata": {"n": 1},
        },
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "b"}]},
    ]
    write(tmp_path / "requests.jsonl", bodies)
    done = run("map", "requests.jsonl", *SIM)
    assert done.returncode == 0, done.stderr
    first, second = lines_of(done.stdout)
    request, response, metadata = first
    assert request == {k: v for k, v in bodies[0].items() if k != "metadata"}
    assert metadata == {"n": 1}
    assert ChatCompletion.model_validate(response).choices[0].message.content == "echo: a"
    assert len(second) == 2  # no metadata: [request, response], as the cookbook writes


def test_mixed_shapes_are_each_answered_in_their_own(run: Run, tmp_path: Path) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    write(
        tmp_path / "mixed.jsonl",
        [body, {"custom_id": "b1", "method": "POST", "url": "/v1/chat/completions", "body": body}],
    )
    done = run("map", "mixed.jsonl", *SIM)
    assert done.returncode == 0, done.stderr
    cookbook, batch = lines_of(done.stdout)
    assert isinstance(cookbook, list)
    assert batch["custom_id"] == "b1"


def test_bad_lines_are_named_and_the_others_run(run: Run, tmp_path: Path) -> None:
    ok = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "fine"}]}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": ok}
    write(
        tmp_path / "b.jsonl",
        [
            "{broken",  # a first line that is not JSON does not make it an item file
            line,
            {**line, "url": "/v1/embeddings", "custom_id": "e"},
            {**line, "method": "GET", "custom_id": "g"},
            {**line, "body": {"model": "m"}, "custom_id": "n"},
            line,  # the custom_id again
            {**line, "custom_id": "z"},
        ],
    )
    done = run("map", "b.jsonl", *SIM)
    assert done.returncode == 1
    assert [x["custom_id"] for x in lines_of(done.stdout)] == ["a", "z"]
    for number, reason in [
        (1, "is not valid JSON"),
        (3, "is for '/v1/embeddings'"),
        (4, "has method 'GET'"),
        (5, "has no 'messages'"),
        (6, "custom_id 'a' was already used on line 2"),
    ]:
        assert re.search(rf"b\.jsonl:{number}: .*{re.escape(reason)}.*; skipped", done.stderr)
    assert "5 malformed input lines were skipped" in done.stderr


def test_an_empty_file_is_as_today_and_items_need_a_template(run: Run, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    done = run("map", "empty.jsonl", *SIM)
    assert "holds no items; nothing was run" in done.stderr
    with_template = run("map", "empty.jsonl", "-p", "{input}", *SIM)
    assert done.returncode == with_template.returncode
    write(tmp_path / "items.jsonl", [{"text": "x"}])
    done = run("map", "items.jsonl", *SIM)
    assert done.returncode == 2
    assert "-p/--prompt is needed: the lines of items.jsonl are items, not requests" in done.stderr
    assert "Traceback" not in done.stderr


def test_options_are_defaults_where_a_line_leaves_them_out(run: Run, tmp_path: Path) -> None:
    # --max-tokens 1 cuts the line that sets none to one word; the other keeps its 50.
    long = "one two three four five"
    bodies = [
        {"model": "m", "messages": [{"role": "user", "content": long}], "max_tokens": 50},
        {"model": "m", "messages": [{"role": "user", "content": long}]},
    ]
    write(tmp_path / "r.jsonl", bodies)
    done = run("map", "r.jsonl", *SIM, "--max-tokens", "1")
    assert done.returncode == 0, done.stderr
    kept, cut = (x[1]["choices"][0] for x in lines_of(done.stdout))
    assert kept["message"]["content"] == f"echo: {long}"
    assert cut["finish_reason"] == "length"
    done = run("map", "r.jsonl", *SIM, "--system", "be brief")
    assert done.returncode == 2
    assert "--system applies to a template" in done.stderr


def test_parquet_rows_keep_the_line_as_written(run: Run, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    batch_file(
        tmp_path / "b.jsonl", [{"model": "m", "messages": [{"role": "user", "content": "x"}]}]
    )
    done = run("map", "b.jsonl", *SIM, "-o", "out.parquet")
    assert done.returncode == 0, done.stderr
    (row,) = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert row["output"] == "echo: x"
    assert json.loads(row["input"])["custom_id"] == "task-0"


def test_dry_run_prices_each_model(run: Run, tmp_path: Path) -> None:
    bodies = [
        {"model": model, "messages": [{"role": "user", "content": "x " * 100}], "max_tokens": 10}
        for model in ("cheap", "dear", "dear")
    ]
    batch_file(tmp_path / "b.jsonl", bodies)
    prices = ["--price", "cheap=100/100", "--price", "dear=10000/10000"]
    done = run("map", "b.jsonl", *SIM, "--dry-run", *prices)
    assert done.returncode == 0, done.stderr
    assert "dry run: 3 calls would be sent" in done.stdout
    cheap = re.search(r"cheap: 1 call, at most \$([0-9.]+)", done.stdout)
    dear = re.search(r"dear: 2 calls, at most \$([0-9.]+)", done.stdout)
    assert "(model of each line, below)" in done.stdout
    assert cheap is not None
    assert dear is not None
    assert float(dear[1]) == pytest.approx(200 * float(cheap[1]), rel=0.01)


def test_a_job_names_lines_by_custom_id_and_reruns_only_failures(run: Run, tmp_path: Path) -> None:
    good = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    bad = {**good, "max_tokens": 0}
    batch_file(tmp_path / "b.jsonl", [good, bad, {**good, "seed": 3}])
    store = ["--store", str(tmp_path / "s.db"), "--job", "j"]
    first = run("map", "b.jsonl", *SIM, *store)
    assert first.returncode == 1
    again = run("map", "b.jsonl", *SIM, *store, "--only-failed")
    assert again.returncode == 1
    out = lines_of(again.stdout)
    assert [x["response"]["status_code"] for x in out] == [200, 400, 200]
    import fanflow

    with fanflow.Store(tmp_path / "s.db") as s:
        items = s.items("j")
    assert [i.input_id for i in items] == ["task-0", "task-1", "task-2"]
    assert sum(i.cached for i in items) == 2  # the second run sent only the failure
    report = run("report", "j", "--store", str(tmp_path / "s.db"))
    assert report.returncode == 0, report.stderr


def test_batch_sends_the_lines_through_the_batch_api(run: Run, tmp_path: Path) -> None:
    bodies = [
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}], "tools": TOOLS}
        for i in range(5)
    ]
    batch_file(tmp_path / "batch_input.jsonl", bodies)
    sim = ["--provider", "sim", "--sim", "latency=0.01,batch_time=0.2"]
    done = run("map", "batch_input.jsonl", *sim, "--batch")
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    assert [x["custom_id"] for x in out] == [f"task-{i}" for i in range(5)]
    assert re.search(r"batched +5 \(0 other\)", done.stderr)
    for line in out:
        assert check_batch_output(line).choices[0].message.content.startswith("echo: q")
    # The request_id of the provider batch's own result lines.
    assert all(line["response"]["request_id"].startswith("req_sim") for line in out)


def test_each_line_is_priced_at_its_models_price_and_named_by_the_providers_id(
    run: Run, tmp_path: Path
) -> None:
    bodies = [
        {"model": model, "messages": [{"role": "user", "content": "x " * 100}], "max_tokens": 10}
        for model in ("cheap", "dear", "dear")
    ]
    batch_file(tmp_path / "b.jsonl", bodies)
    prices = ["--price", "cheap=100/100", "--price", "dear=10000/10000"]
    done = run("map", "b.jsonl", *SIM, *prices)
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    # Each line 100 tokens in, 10 out: 110 at $100/M, then 220 at $10,000/M.
    assert re.search(r"tokens\s+330 \(300 in, 30 out\)", done.stderr)
    assert re.search(r"cost\s+\$2\.2110", done.stderr)
    # The simulated API's x-request-id header, as OpenAI's names each request.
    ids = [line["response"]["request_id"] for line in out]
    assert all(i.startswith("req_sim") for i in ids)
    assert len(set(ids)) == 3
