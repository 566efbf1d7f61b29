"""End to end against a real OpenAI-compatible server that is not ours.

``python -m llama_cpp.server`` (from ``llama-cpp-python[server]``; started so that its
model loads with extra buffer types as ``fanflow.local()`` would) serves the same
SmolLM2 model on a free loopback port. fanflow's patterns (map, vote, fan_out) run
against it over HTTP, and their results must equal the same requests sent one by one,
at temperature 0 with a fixed seed: real replies and the server's own usage numbers.

The client is ``fanflow.openai(base_url=...)``, the same handle users point at any
OpenAI-compatible server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

import fanflow
from fanflow.providers._local import default_model_path

HOST = "127.0.0.1"
GREEDY = {"temperature": 0.0, "seed": 7}
# `python -m llama_cpp.server`, with llama.cpp's extra buffer types set as fanflow.local()
# sets them (off on CPUs with AMX, where they crash: docs/decisions/0080). The server has
# no option for them, so its model loads inside the same switch the workers use.
SERVER = (
    "import runpy, sys\n"
    "from fanflow.providers._llama import extra_buffer_types\n"
    "from fanflow.providers._local import extra_buffers_default\n"
    "sys.argv[0] = 'llama_cpp.server'\n"
    "with extra_buffer_types(extra_buffers_default()):\n"
    "    runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """Start llama_cpp.server with the default model; yield its port once it listens."""
    port = _free_port()
    command = [
        sys.executable,
        "-c",
        SERVER,
        "--model",
        str(default_model_path()),
        "--host",
        HOST,
        "--port",
        str(port),
        "--n_ctx",
        "1024",
        "--n_threads",
        "1",
        "--verbose",
        "False",
    ]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    log: list[bytes] = []
    # Uvicorn logs this line once the socket is listening: synchronise on it, not on time.
    for line in proc.stderr:
        log.append(line)
        if b"Uvicorn running on" in line:
            break
    else:
        proc.wait()
        pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {b''.join(log)!r}")
    drain = threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True)
    drain.start()
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        drain.join(timeout=30)
        proc.stderr.close()


@pytest.fixture
async def llm(server: int) -> AsyncIterator[fanflow.providers.OpenAILLM]:
    handle = fanflow.openai(
        "smollm2",
        base_url=f"http://{HOST}:{server}/v1",
        limits=fanflow.Limits(concurrency=4),
        max_tokens=8,
        temperature=0.0,
        seed=7,
    )
    async with handle:
        yield handle


async def one_by_one(
    llm: fanflow.providers.OpenAILLM, requests: list[fanflow.Request]
) -> list[fanflow.Response]:
    return [await llm.complete(llm.prepare(r)) for r in requests]


async def test_map_equals_sequential_calls_with_real_usage(
    llm: fanflow.providers.OpenAILLM,
) -> None:
    prompt = "Name a colour that rhymes with {word}."
    items = [{"word": w} for w in ("bed", "blue", "bright", "clean", "mellow", "stack")]
    result = await fanflow.map(llm, prompt, items, **GREEDY)  # type: ignore[arg-type]
    sequential = await one_by_one(
        llm, [fanflow.Request.of(prompt.format(**item)) for item in items]
    )
    assert result.ok
    assert result.outputs == [r.text for r in sequential]
    for record, response in zip(result.records, sequential, strict=True):
        assert record.usage.input_tokens == response.usage.input_tokens > 10
        assert record.usage.output_tokens == response.usage.output_tokens > 0
        assert not record.usage.estimated
    assert result.summary.usage.output_tokens == sum(r.usage.output_tokens for r in sequential)
    assert llm.statistics().concurrency.max_in_flight == 4


async def test_vote_equals_sequential_samples(llm: fanflow.providers.OpenAILLM) -> None:
    task = "What is 2 + 3? Answer with a number."
    result = await fanflow.vote(llm, task, n=3, temperature=0.0)
    [reference] = await one_by_one(llm, [fanflow.Request.of(task, temperature=0.0)])
    assert result.n_counted == 3
    assert result.count == 3  # greedy decoding with one seed: every sample agrees
    for sample in result.samples:
        assert sample.response is not None
        assert sample.response.text == reference.text
        assert sample.usage == reference.usage
    assert result.winner == result.samples[0].value
    assert reference.text.strip()


async def test_fan_out_equals_sequential_calls(llm: fanflow.providers.OpenAILLM) -> None:
    task = "Give one tip for writing clear code."
    focus = ["naming", "testing", "comments"]
    result = await fanflow.fan_out(
        llm, task, focus=focus, temperatures=None, aggregate="concat", worker_timeout=None
    )
    requests = [fanflow.Request.of(f"{task}\n\nFocus on: {f}") for f in focus]
    sequential = await one_by_one(llm, requests)
    assert [w.output for w in result.workers] == [r.text for r in sequential]
    assert [w.record.usage for w in result.workers] == [r.usage for r in sequential]
    assert result.answer is not None
    for response in sequential:
        assert response.text in result.answer
