"""Ready-made requests: ``fanflow.read_requests`` (Batch API input lines and the cookbook's
bare bodies) and ``fanflow.map(llm, requests)``, over loopback HTTP against SimServer."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import fanflow
from fanflow import Request, Status
from fanflow.testing import ScriptedLLM, SimServer

pytestmark = pytest.mark.looptime

TOOL_TURNS = [
    {"role": "system", "content": "You look up the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    {"role": "user", "content": [{"type": "text", "text": "Say it in French."}]},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def batch_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-a", "messages": [{"role": "user", "content": content}], **body},
    }


def write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def request_of(directory: Path, body: dict[str, Any]) -> Request:
    """The request ``read_requests`` makes of a request file's one line ``body``."""
    path = write(directory / f"line{len(list(directory.iterdir()))}.jsonl", [body])
    [line] = fanflow.read_requests(path)
    return line.request


def input_tokens(request: Request) -> int:
    """The input tokens fanflow expects ``request`` to use (``fanflow.estimate``, the
    estimate rate limits book)."""
    return fanflow.estimate(ScriptedLLM(), lambda r: r, [request]).input_tokens


def test_both_shapes_are_read_with_their_identity(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.jsonl",
        [
            batch_line("req-1", "hi", temperature=0.2, max_completion_tokens=7, stop="END"),
            "",
            {"model": "gpt-b", "messages": TOOL_TURNS, "metadata": {"row": 3}, "seed": 4},
        ],
    )
    first, second = list(fanflow.read_requests(path))
    assert (first.shape, first.custom_id, first.line, first.metadata) == ("batch", "req-1", 1, None)
    r = first.request
    assert (r.model, r.temperature, r.max_tokens, r.stop) == ("gpt-a", 0.2, 7, ("END",))
    assert (second.shape, second.custom_id, second.line) == ("body", None, 3)
    assert second.metadata == {"row": 3}
    assert second.request.body is not None
    assert "metadata" not in second.request.body
    roles = [m.role for m in second.request.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert second.request.prompt == "Say it in French."  # the text of content parts


BAD_LINES: list[tuple[Any, str]] = [
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object, got list"),
    ({"model": "gpt-a"}, "neither a Batch API line"),
    ({**batch_line("x1", "a"), "url": "/v1/embeddings"}, "is for '/v1/embeddings'"),
    ({**batch_line("x2", "a"), "method": "GET"}, "has method 'GET'"),
    ({"custom_id": "x3", "body": {"model": "m"}}, "the body has no 'messages'"),
    ({"custom_id": "", "body": {}}, "'custom_id' is ''"),
    (batch_line("req-1", "again"), "custom_id 'req-1' was already used on line 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "message 0 has role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "'temperature'"),
]


def test_bad_lines_are_named_by_file_and_line_and_skipped(tmp_path: Path) -> None:
    lines = [batch_line("req-1", "first"), *(bad for bad, _ in BAD_LINES), batch_line("z", "ok")]
    path = write(tmp_path / "r.jsonl", lines)
    bad: list[Any] = []  # read_requests' BadLine (not a public name)
    good = list(fanflow.read_requests(path, on_bad=bad.append))
    assert [g.custom_id for g in good] == ["req-1", "z"]
    assert [b.line for b in bad] == list(range(2, 2 + len(BAD_LINES)))
    for b, (_, reason) in zip(bad, BAD_LINES, strict=True):
        assert reason in b.reason
        assert str(b).startswith(f"{path}:{b.line}: ")
        assert str(b).endswith("; skipped")


def test_a_line_over_the_size_limit_is_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", [batch_line("a", "x" * 500), batch_line("b", "y")])
    bad: list[Any] = []  # read_requests' BadLine (not a public name)
    good = list(fanflow.read_requests(path, on_bad=bad.append, max_bytes=300))
    assert [g.custom_id for g in good] == ["b"]
    assert bad[0].line == 1
    assert "over the provider's 300" in bad[0].reason


def test_bad_lines_go_to_the_fanflow_logger_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "r.jsonl", ["[]", batch_line("a", "x")])
    assert len(list(fanflow.read_requests(path))) == 1
    assert f"{path}:1: expected a JSON object" in caplog.text


def test_a_missing_file_is_a_config_error_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(fanflow.ConfigError, match="cannot be read"):
        fanflow.read_requests(tmp_path / "nope.jsonl")


MODELS = ["gpt-a", "gpt-b", "gpt-c"]


def big_file(path: Path) -> Path:
    """10,000 Batch API lines over three models, about 3.5 MB."""
    with path.open("w") as f:
        for i in range(10_000):
            line = batch_line(f"r{i}", f"question {i} " + "pad " * 40, model=MODELS[i % 3])
            f.write(json.dumps(line) + "\n")
    return path


def test_the_reader_is_lazy_and_its_memory_flat(tmp_path: Path) -> None:
    models = MODELS
    path = big_file(tmp_path / "big.jsonl")
    reader = fanflow.read_requests(path)
    first = next(reader)
    assert first.custom_id == "r0"  # one line read, not 10,000
    tracemalloc.start()
    try:
        seen = dict.fromkeys(models, 0)
        for line in reader:
            seen[line.request.model or ""] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == {"gpt-a": 3333, "gpt-b": 3333, "gpt-c": 3333}
    # The file is ~3.5 MB and its parsed lines far more; the reader holds one line and
    # the custom ids it has seen (for duplicates): well under 2 MB.
    assert path.stat().st_size > 3_000_000
    assert peak < 2_000_000


async def test_ten_thousand_lines_stream_through_a_map_in_flat_memory(tmp_path: Path) -> None:
    path = big_file(tmp_path / "big.jsonl")
    llm = fanflow.function(lambda request: request.model or "", name="echo-model")
    answered = dict.fromkeys(MODELS, 0)
    tracemalloc.start()
    try:
        requests = fanflow.read_requests(path)
        async with fanflow.as_completed(llm, requests, concurrency=50) as results:
            async for record in results:
                answered[record.value] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answered == {"gpt-a": 3334, "gpt-b": 3333, "gpt-c": 3333}  # each line's model
    # Parsed whole, the file's lines take about 16 MB; streamed, the batch holds the
    # lines in flight and the custom ids seen (measured: about 1.8 MB).
    assert peak < 5_000_000


async def test_map_sends_each_request_as_written() -> None:
    written = {
        "model": "gpt-tools",
        "messages": TOOL_TURNS,
        "tools": TOOLS,
        "tool_choice": "auto",
        "max_completion_tokens": 9,
        "response_format": {"type": "text"},
        "logit_bias": {"50256": -100},
        "stream": True,  # the handle decides whether to stream
    }
    async with SimServer() as server:
        llm = fanflow.openai("gpt-default", base_url=server.url, api_key="sk-t", max_tokens=50)
        async with llm:
            result = await fanflow.map(llm, [written, Request.of("plain")])
    assert result.ok
    sent = {r.model: r.body for r in server.requests}
    tools = sent["gpt-tools"]
    expected = {k: v for k, v in written.items() if k != "stream"}
    assert tools == expected  # no max_tokens added: the line has max_completion_tokens
    assert sent["gpt-default"]["max_tokens"] == 50  # the handle's default where none is set


async def test_handle_defaults_fill_only_what_a_line_leaves_out(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.jsonl",
        [batch_line("a", "x", temperature=0.9, max_tokens=5), batch_line("b", "y")],
    )
    async with SimServer() as server:
        llm = fanflow.openai("gpt-d", base_url=server.url, api_key="sk-t", temperature=0.1)
        async with llm:
            result = await fanflow.map(llm, fanflow.read_requests(path), max_tokens=33)
    assert result.ok
    a, b = sorted(server.requests, key=lambda r: r.prompt)
    assert (a.body["temperature"], a.body["max_tokens"]) == (0.9, 5)
    assert (b.body["temperature"], b.body["max_tokens"]) == (0.1, 33)
    assert a.model == b.model == "gpt-a"  # each line's own model


async def test_a_bad_item_fails_alone_and_no_call_is_made() -> None:
    async with SimServer() as server:
        llm = fanflow.openai("gpt-d", base_url=server.url, api_key="sk-t")
        async with llm:
            items = [{"model": "gpt-d"}, {"messages": [{"role": "user", "content": "x"}]}, 3]
            result = await fanflow.map(llm, items)
    assert [r.status for r in result.records] == [Status.FAILED, Status.SUCCEEDED, Status.FAILED]
    assert "nor a chat-completions body (messages)" in str(result.records[0].error)
    assert "not a request" in str(result.records[2].error)
    assert len(server.requests) == 1


async def test_the_cache_key_tells_bodies_apart_and_keeps_old_keys(tmp_path: Path) -> None:
    plain = Request.of("x")
    assert "body" not in plain.canonical()  # keys of requests built as before are unchanged
    line = {"messages": [{"role": "user", "content": "x"}]}
    with_tools = {**line, "tools": TOOLS}
    a = request_of(tmp_path, line)
    b = request_of(tmp_path, with_tools)
    assert a.key != b.key


async def test_the_job_names_items_by_custom_id(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", [batch_line("alpha", "x"), batch_line("beta", "y")])
    store = fanflow.Store(tmp_path / "s.db")
    async with SimServer() as server:
        llm = fanflow.openai("gpt-d", base_url=server.url, api_key="sk-t")
        async with llm:
            await fanflow.map(llm, fanflow.read_requests(path), store=store, job="j")
            again = await fanflow.map(llm, fanflow.read_requests(path), store=store, job="j")
    assert again.ok
    assert len(server.requests) == 2
    assert [i.input_id for i in store.items("j")] == ["alpha", "beta"]
    store.close()


async def test_a_rerun_finds_each_line_by_custom_id_not_position(tmp_path: Path) -> None:
    ok, bad = batch_line("ok", "x"), batch_line("bad", "y", max_tokens=0)  # a 400
    store = fanflow.Store(tmp_path / "s.db")
    async with SimServer() as server:
        llm = fanflow.openai("gpt-d", base_url=server.url, api_key="sk-t")
        async with llm:
            path = write(tmp_path / "r.jsonl", [ok, bad])
            first = await fanflow.map(llm, fanflow.read_requests(path), store=store, job="j")
            # The file edited: a new line first, the failed line fixed, "ok" moved last.
            fixed = batch_line("bad", "y", max_tokens=5)
            path = write(tmp_path / "r.jsonl", [batch_line("new", "z"), fixed, ok])
            again = await fanflow.map(
                llm, fanflow.read_requests(path), store=store, job="j", only_failed=True,
                cache=False,
            )  # fmt: skip
    assert [r.status for r in first.records] == [Status.SUCCEEDED, Status.FAILED]
    assert [r.status for r in again.records] == [Status.SKIPPED, Status.SUCCEEDED, Status.SUCCEEDED]
    assert not again.records[1].cached  # the failure, sent again
    assert again.records[2].cached  # "ok" succeeded before, wherever its line is now
    assert [r.prompt for r in server.requests] == ["x", "y"]
    store.close()


async def test_anthropic_refuses_what_it_cannot_send_as_written(tmp_path: Path) -> None:
    async with SimServer() as server:
        llm = fanflow.anthropic("claude-d", base_url=server.root, api_key="sk-ant")
        async with llm:
            bodies = [
                {"messages": TOOL_TURNS[1:2], "tools": TOOLS},
                {"messages": TOOL_TURNS[1:2], "max_completion_tokens": 8},
            ]
            lines = list(fanflow.read_requests(write(tmp_path / "r.jsonl", bodies)))
            result = await fanflow.map(llm, lines)
    first, second = result.records
    assert first.status is Status.FAILED
    assert "tools" in str(first.error)
    assert second.status is Status.SUCCEEDED
    assert server.requests[0].body["max_tokens"] == 8


def test_tools_and_tool_calls_count_in_the_token_estimate(tmp_path: Path) -> None:
    plain = {"messages": TOOL_TURNS}
    tools = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "description": "w " * 400}}]
    bare = input_tokens(request_of(tmp_path, {"messages": TOOL_TURNS[1:2]}))
    with_calls = input_tokens(request_of(tmp_path, plain))
    with_tools = input_tokens(request_of(tmp_path, {**plain, "tools": tools}))
    assert with_calls > bare
    assert with_tools > with_calls + 150  # 800 characters of description


def test_map_without_items_needs_requests() -> None:
    llm = fanflow.testing.ScriptedLLM()
    with pytest.raises(fanflow.ConfigError, match="needs items"):
        fanflow.run(fanflow.map(llm, "Say {input}"))
    with pytest.raises(fanflow.ConfigError, match="system= applies to a template"):
        fanflow.run(fanflow.map(llm, [Request.of("x")], system="be brief"))
