"""The Ray backend on a local Ray cluster (started here, 2 CPUs) against SimServer.

Ray workers are separate processes, so these tests run in real time (no looptime):
latencies are a few milliseconds, every wait is on state (SimServer's counters, the
batch's own completion) and bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

import fanflow
import fanflow.events
from fanflow import Limits
from fanflow.backends import RayBackend
from fanflow.backends._ray import worker_pids
from fanflow.testing import SimServer

from .._helpers import busiest_second

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(180)

ITEMS = [f"item {i}" for i in range(60)]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # This test module cannot be imported by the workers: send its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        ray.shutdown()


# The default retry policy without hedging: these tests count requests and attempts in
# real time at 2-10 ms latencies, where a loaded machine's hiccup passes the hedging
# policy's 99th percentile and adds a request on one side only (seen once in a full run).
NO_HEDGE = fanflow.RetryPolicy(hedge=False)


def _handle(server: SimServer, limits: Limits | None = None) -> fanflow.BaseLLM:
    return fanflow.openai(
        "sim", base_url=server.url, api_key="sk-test-SECRET", limits=limits, retry=NO_HEDGE
    )


def _shape(result: fanflow.MapResult[Any]) -> list[tuple[Any, ...]]:
    """What must be identical between backends: per item, status, output and error."""
    return [
        (
            r.index,
            r.status,
            r.value,
            type(r.error).__name__ if r.error else None,
            str(r.error) if r.error else None,
            r.usage,
            len(r.attempts),
        )
        for r in result.records
    ]


async def test_results_are_identical_to_the_local_backend() -> None:
    items: list[Any] = [{"text": t} for t in ITEMS]
    items[7] = {"wrong": "field"}  # a bad input: TemplateError, no call
    faults: Any = {"item 3$": "quota", "item 11$": ["500", "503"], "item 42$": "quota"}
    async with SimServer(latency=0.002, fault_on=faults) as server:
        llm = _handle(server)
        local = await fanflow.map(llm, "Say {text}", items, max_tokens=20)
        server.reset()  # the scripted faults of item 11 start again
        events: list[Any] = []
        remote = await fanflow.map(
            llm,
            "Say {text}",
            items,
            max_tokens=20,
            backend=RayBackend(workers=2, shard_size=7),
            hooks=[events.append],
        )
        await llm.aclose()
    assert _shape(remote) == _shape(local)
    assert remote.status[3] is fanflow.Status.FAILED
    assert remote.records[11].ok
    assert remote.records[11].retries == 2
    assert isinstance(remote.errors[3], fanflow.errors.QuotaExceeded)
    assert isinstance(remote.errors[7], fanflow.errors.TemplateError)
    assert remote.summary.succeeded == local.summary.succeeded == 57
    assert remote.summary.calls == local.summary.calls
    # Progress: the workers' events reach the caller's hooks, one CallEnded per item.
    ended = [e.record.index for e in events if isinstance(e, fanflow.events.CallEnded)]
    assert sorted(ended) == list(range(len(items)))
    assert "sk-test-SECRET" not in repr(remote.records) + repr(remote.errors)


@pytest.mark.parametrize("workers", [2, 4])
async def test_one_concurrency_limit_for_all_workers(workers: int) -> None:
    # The server refuses (429) a 4th request in flight. The handle's limit is 3: each
    # worker alone may run 3, so only a cluster-wide limit keeps the server at 3.
    async with SimServer(latency=0.01, max_in_flight=3) as server:
        llm = _handle(server, Limits(concurrency=3))
        result = await fanflow.map(
            llm, "Say {input}", ITEMS, backend=RayBackend(workers=workers, shard_size=5)
        )
        await llm.aclose()
        stats = server.stats()
    assert result.ok, [str(e) for e in result.errors.values()][:1]
    assert result.outputs == [f"echo: Say {t}" for t in ITEMS]
    assert stats.responses == {200: len(ITEMS)}  # zero 429s
    assert stats.max_in_flight == 3  # the limit was used, not undershot


@pytest.mark.parametrize("workers", [2, 4])
async def test_one_rate_limit_for_all_workers(workers: int) -> None:
    # The server allows 20 requests per second (a bucket of 20); so does the handle.
    # Each worker alone would send 20 at once and then 20/s: only one limit for the
    # cluster keeps the server from refusing.
    n = 50
    async with SimServer(latency=0.002, rpm=20, period=1.0) as server:
        llm = _handle(server, Limits(rpm=20, period=1.0))
        result = await fanflow.map(
            llm, "Say {input}", ITEMS[:n], backend=RayBackend(workers=workers, shard_size=5)
        )
        await llm.aclose()
        stats = server.stats()
    assert result.ok, [str(e) for e in result.errors.values()][:1]
    assert stats.responses == {200: n}  # zero 429s
    # The limit is used (not one lease window at a time): some second admits most of it.
    assert busiest_second(stats) >= 20 * 3 // 4


async def test_map_concurrency_is_split_between_workers() -> None:
    async with SimServer(latency=0.01) as server:
        llm = _handle(server)
        result = await fanflow.map(
            llm, "Say {input}", ITEMS, concurrency=5, backend=RayBackend(workers=2)
        )
        await llm.aclose()
        stats = server.stats()
    assert result.ok
    assert 1 <= stats.max_in_flight <= 5


@pytest.mark.parametrize("workers", [2, 4])
async def test_one_rate_limit_for_all_workers_draws_no_429_from_nginx(workers: int) -> None:
    # The test above against a limiter fanflow did not write (issue 17 found the Ray
    # backend at a 30/s cluster limit drawing a 429 from one): nginx's limit_req (30 r/s,
    # a burst of one second, nodelay) in front of SimServer, the handle's limit the same.
    # Each worker alone would send its burst at once: only one limit for the cluster,
    # with its margin, keeps nginx from refusing.
    from .._helpers import require_nginx
    from .._nginx import NginxLimitReq

    require_nginx()
    n, rate = 90, 30
    async with SimServer(latency=0.01, keep_requests=False) as server:
        port = int(server.url.split(":")[-1].split("/")[0])
        async with NginxLimitReq(port, f"{rate}r/s", burst=rate, nodelay=True) as nginx:
            llm = fanflow.openai(
                "sim",
                base_url=nginx.url,
                api_key="sk-test",
                limits=Limits(rpm=rate, period=1.0),
                retry=None,
            )
            result = await fanflow.map(
                llm,
                "Say {input}",
                [f"item {i}" for i in range(n)],
                backend=RayBackend(workers=workers, shard_size=5),
            )
            await llm.aclose()
            refused = nginx.refused()
        stats = server.stats()
    assert result.ok, [str(e) for e in result.errors.values()][:1]
    assert refused == 0
    # The limit is used, as in the SimServer test above.
    assert busiest_second(stats) >= rate * 3 // 4


async def test_a_field_no_item_has_is_found_before_any_call_on_ray_too() -> None:
    # The local backend's first-items check (issue 13), also before Ray sends a shard.
    async with SimServer(latency=0.01) as server:
        llm = _handle(server)
        rows = [{"id": i, "text": f"t{i}"} for i in range(50)]
        with pytest.raises(
            fanflow.errors.TemplateError, match=r"\{txt\}.*none of the first 8 items"
        ):
            await fanflow.map(llm, "Summarize: {txt}", rows, backend=RayBackend(workers=2))
        # Peeking consumes nothing: every item still runs, in order.
        result = await fanflow.map(llm, "{text}", iter(rows), backend=RayBackend(workers=2))
        await llm.aclose()
        requests = server.stats().requests
    assert requests == len(rows)  # none for the refused map
    assert result.outputs == [f"echo: t{i}" for i in range(50)]


async def test_a_primed_map_on_ray_misses_the_prompt_cache_once() -> None:
    # Priming (decision 0190) on Ray: the first item runs alone on one worker before
    # any shard is sent, so every other call, on either worker, reads the prefix it
    # cached. The server makes a prefix readable when a call's 0.5 s are over.
    system = " ".join(f"rule{i}" for i in range(2000))  # 2,000 SimServer tokens
    items = ITEMS[:30]
    async with SimServer(latency=0.5, prompt_cache=True) as server:
        llm = _handle(server)
        backend = RayBackend(workers=2, shard_size=7)
        primed = await fanflow.map(llm, "Say {input}", items, system=system, backend=backend)
        stats = server.stats()
        server.reset()  # counters and cache afresh
        naive = await fanflow.map(
            llm, "Say {input}", items, system=system, backend=backend, prime=False
        )
        unprimed = server.stats()
        await llm.aclose()
    assert primed.ok, [str(e) for e in primed.errors.values()][:1]
    assert (stats.cache_misses, stats.cache_hits) == (1, len(items) - 1)
    assert primed.records[0].usage.cached_input_tokens == 0
    assert all(r.usage.cached_input_tokens > 0 for r in primed.records[1:])
    # Unprimed, each worker sends its first shard's 7 calls at once: all of them miss.
    assert naive.ok
    assert unprimed.cache_misses >= 7


@pytest.mark.parametrize("prime", [None, True])
async def test_a_pool_on_ray_primes_its_model_steps(prime: bool | None) -> None:
    # A Pool's steps on Ray: each worker sends a step's first call alone and its other
    # calls of that step once it has ended: one miss per worker at most. Unprimed, each
    # worker sends its shard's calls at once and they all miss.
    system = " ".join(f"rule{i}" for i in range(2000))  # 2,000 SimServer tokens
    inputs = [{"text": f"doc {i}"} for i in range(30)]
    async with SimServer(latency=0.5, prompt_cache=True) as server:
        llm = _handle(server)
        skill = fanflow.Skill(llm, "Summarize {text}", system=system, name="summary")
        backend = RayBackend(workers=2, shard_size=7)
        primed = await fanflow.Pool(
            skill, inputs, max_flows=14, prime=prime, backend=backend
        ).arun()
        stats = server.stats()
        server.reset()
        naive = await fanflow.Pool(skill, inputs, max_flows=14, prime=False, backend=backend).arun()
        unprimed = server.stats()
        await llm.aclose()
    assert primed.ok
    assert naive.ok
    assert 1 <= stats.cache_misses <= 2  # the workers
    assert stats.cache_hits == len(inputs) - stats.cache_misses
    assert unprimed.cache_misses >= 7


async def _wait_for(condition: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        # Polls another process's state (the server's counters), not a local event.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("with_store", [False, True])
async def test_a_killed_worker_loses_nothing(tmp_path: Any, with_store: bool) -> None:
    n = 240
    items = [f"item {i}" for i in range(n)]
    async with SimServer(latency=0.01) as server:
        llm = _handle(server, Limits(concurrency=8))
        store = fanflow.Store(tmp_path / "store.db") if with_store else None
        task = asyncio.ensure_future(
            fanflow.map(
                llm,
                "Say {input}",
                items,
                backend=RayBackend(workers=2, shard_size=20),
                store=store,
                job="kill" if with_store else None,
            )
        )
        await _wait_for(lambda: server.stats().responses.get(200, 0) >= n // 4)
        pids = await asyncio.to_thread(worker_pids)
        assert len(pids) >= 2  # workers stay up between batches: earlier tests' too
        os.kill(pids[0], signal.SIGKILL)  # the first worker runs shards of every batch
        result = await asyncio.wait_for(task, 120)
        await llm.aclose()
        sent = collections.Counter(r.prompt for r in server.requests)
        if store is not None:
            info = store.job("kill")
            store.close()
    assert not task.cancelled()
    assert [r.index for r in result.records] == list(range(n))  # every item, once
    assert result.ok
    assert result.outputs == [f"echo: Say {t}" for t in items]
    assert set(sent) == {f"Say {t}" for t in items}
    repeated = [p for p, c in sent.items() if c > 1]
    # Only calls in flight on the killed worker (at most the limit, 8), or finished but
    # not yet streamed back when it died (a message's worth), can run twice.
    assert len(repeated) <= 2 * 8, repeated
    if with_store:
        assert info is not None
        assert info.succeeded == n


async def test_pool_runs_on_ray_like_locally() -> None:
    async with SimServer(latency=0.002) as server:
        llm = _handle(server, Limits(concurrency=4))
        chain = fanflow.Chain(
            [
                fanflow.Step(fanflow.Skill(llm, "Summarize {text}", name="summary"), output="s"),
                fanflow.Step(_shout, output="loud"),
            ]
        )
        inputs = [{"text": f"doc {i}"} for i in range(25)]
        local = await fanflow.Pool(chain, inputs, max_flows=4).arun()
        pool = fanflow.Pool(chain, inputs, max_flows=4, backend=RayBackend(workers=2))
        running: list[tuple[str, ...]] = []

        def watch(event: Any) -> None:  # pool.status while the workers run it
            running.extend(i.steps for i in pool.status.items if i.state == "running")

        pool.hooks = (watch,)
        remote = await pool.arun()
        await llm.aclose()
    assert ("s",) in running  # the steps the workers are on show in pool.status
    assert remote.outputs == local.outputs
    assert remote.outputs[3] == "ECHO: SUMMARIZE DOC 3"
    assert pool.status.succeeded == 25
    assert len(remote.records) == len(local.records)


def _shout(s: str) -> str:
    return s.upper()


@pytest.mark.parametrize("option", ["timeout", "deadline"])
async def test_a_pools_timing_options_hold_on_ray_too(option: str) -> None:
    # Pool(timeout=) and Pool(deadline=) reach the skills on the workers as they do
    # locally (they were dropped on Ray: every call ran to its 3 s answer).
    async with SimServer(latency=3.0) as server:
        llm = _handle(server)
        chain = fanflow.Chain(
            [fanflow.Step(fanflow.Skill(llm, "Summarize {text}", name="summary"), output="s")]
        )
        inputs = [{"text": f"doc {i}"} for i in range(4)]
        options: dict[str, Any] = {option: 0.5, "retry": fanflow.RetryPolicy(attempts=1)}
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await fanflow.Pool(
            chain, inputs, max_flows=4, backend=RayBackend(workers=2), **options
        ).arun()
        took = loop.time() - start
        await llm.aclose()
    assert not result.ok
    assert [r.status for r in result.records] == [fanflow.Status.TIMED_OUT] * len(inputs)
    assert took < 3.0 + 2.0  # the workers' start-up, not the 3 s answers


async def test_a_bad_prompt_function_fails_its_item_like_locally() -> None:
    async with SimServer() as server:
        llm = _handle(server)
        result = await fanflow.map(
            llm, _prompt_or_fail, ["a", "b", "boom"], backend=RayBackend(workers=1)
        )
        await llm.aclose()
    assert result.outputs[:2] == ["echo: A", "echo: B"]
    assert result.status[2] is fanflow.Status.FAILED
    assert "no boom" in str(result.errors[2])


def _prompt_or_fail(item: str) -> str:
    if item == "boom":
        raise ValueError("no boom please")
    return item.upper()


async def test_fail_fast_raises_the_first_failure() -> None:
    async with SimServer(fault_on={"item 5$": "quota"}) as server:
        llm = _handle(server)
        with pytest.raises(fanflow.errors.QuotaExceeded):
            await fanflow.map(llm, "{input}", ITEMS, fail_fast=True, backend=RayBackend(workers=1))
        await llm.aclose()


async def test_a_pool_job_on_ray_is_replayed_from_the_store(tmp_path: Any) -> None:
    async with SimServer(latency=0.002) as server:
        llm = _handle(server, Limits(concurrency=4))
        skill = fanflow.Skill(llm, "Summarize {text}", name="summary")
        inputs = [{"text": f"doc {i}"} for i in range(12)]
        with fanflow.Store(tmp_path / "pool.db") as store:
            first = await fanflow.Pool(
                skill, inputs, max_flows=4, store=store, job="p", backend=RayBackend(workers=2)
            ).arun()
            sent = server.stats().requests
            again = await fanflow.Pool(
                skill, inputs, max_flows=4, store=store, job="p", backend=RayBackend(workers=2)
            ).arun()
            info = store.job("p")
        await llm.aclose()
    assert first.outputs == again.outputs
    assert first.outputs[5] == "echo: Summarize doc 5"
    assert sent == 12
    assert server.stats().requests == 12  # the second run made no call
    assert all(r.cached for r in again.records)
    assert info is not None
    assert info.succeeded == 12


async def test_as_completed_streams_records_from_the_workers() -> None:
    async with SimServer(latency=0.002) as server:
        llm = _handle(server, Limits(concurrency=4))
        seen: list[int] = []
        async with fanflow.as_completed(
            llm, "Say {input}", ITEMS, backend=RayBackend(workers=2, shard_size=6)
        ) as stream:
            async for record in stream:
                assert record.ok
                assert record.value == f"echo: Say {ITEMS[record.index]}"
                seen.append(record.index)
        await llm.aclose()
    assert sorted(seen) == list(range(len(ITEMS)))


async def test_a_sink_gets_every_item_with_its_id(tmp_path: Any) -> None:
    items = [{"id": f"doc-{i}", "text": f"t{i}"} for i in range(30)]
    async with SimServer(latency=0.002) as server:
        llm = _handle(server, Limits(concurrency=4))
        await fanflow.map(
            llm,
            "Say {text}",
            items,
            sink=tmp_path / "out.jsonl",
            backend=RayBackend(workers=2, shard_size=4),
        )
        await llm.aclose()
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted((r["index"], r["id"], r["output"]) for r in rows) == [
        (i, f"doc-{i}", f"echo: Say t{i}") for i in range(30)
    ]


@pytest.mark.parametrize("workers", [2, 4])
async def test_one_budget_for_all_workers(workers: int) -> None:
    budget = fanflow.Budget(tokens=120)
    async with SimServer(latency=0.002) as server:
        llm = _handle(server, Limits(concurrency=4))
        result = await fanflow.map(
            llm,
            "Say {input}",
            ITEMS,
            max_tokens=6,
            budget=budget,
            backend=RayBackend(workers=workers, shard_size=4),
        )
        await llm.aclose()
        used = server.stats().tokens_in + server.stats().tokens_out
    ran = [r for r in result.records if r.ok]
    skipped = [r for r in result.records if r.status is fanflow.Status.SKIPPED]
    assert ran
    assert skipped
    assert len(ran) + len(skipped) == len(ITEMS)
    # One cap for the cluster: what the server counted fits in it, and the caller's
    # budget object shows what the workers spent together.
    assert used <= 120
    assert budget.spent == sum(r.usage.total_tokens for r in ran) <= 120
    assert budget.statistics().skipped == len(skipped)
    error = skipped[0].error
    assert type(error) is fanflow.BudgetExceeded  # the plain error, not Ray's wrapper
    assert "raise budget= or lower max_tokens= to run it" in str(error)


def test_the_cli_joins_the_cluster_with_ray_address(tmp_path: Any) -> None:
    items = [{"text": f"t{i}"} for i in range(20)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    address = ray.get_runtime_context().gcs_address
    # Ray's own settings (its auth mode) pass through; fanflow's do not.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANFLOW_")}
    args = ["map", "in.jsonl", "-p", "Say {text}", "--provider", "sim", "--sim", "latency=0.01"]
    done = subprocess.run(
        [sys.executable, "-m", "fanflow", *args, "--concurrency", "4", "--ray-address", address],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    out = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [r["output"] for r in out] == [f"echo: Say t{i}" for i in range(20)]
    assert "succeeded" in done.stderr  # the summary, from the workers' events


@pytest.mark.parametrize("pattern", ["map", "pool"])
async def test_the_workers_calls_are_spans_in_the_drivers_trace(pattern: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import fanflow.otel

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    fanflow.otel.instrument(tracer_provider=tracer_provider)
    backend = RayBackend(workers=2, shard_size=3)
    try:
        async with SimServer(latency=0.002) as server:
            llm = _handle(server)
            with tracer_provider.get_tracer("app").start_as_current_span("job") as job:
                if pattern == "map":
                    result: Any = await fanflow.map(llm, "Say {input}", ITEMS[:10], backend=backend)
                else:
                    skill = fanflow.Skill(llm, "Say {text}", name="say")
                    chain = fanflow.Chain([fanflow.Step(skill, output="s")])
                    inputs = [{"text": t} for t in ITEMS[:10]]
                    result = await fanflow.Pool(chain, inputs, max_flows=4, backend=backend).arun()
            await llm.aclose()
    finally:
        fanflow.otel.uninstrument()
    assert result.ok
    spans = exporter.get_finished_spans()
    [run] = [s for s in spans if s.name == f"fanflow.{pattern}"]
    chats = [s for s in spans if s.name == "chat sim"]
    assert sorted(s.attributes["fanflow.item.index"] for s in chats) == list(range(10))
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id for s in chats)
    assert {s.context.trace_id for s in chats} == {job.get_span_context().trace_id}
    assert {s.attributes["gen_ai.provider.name"] for s in chats} == {"openai"}
    assert {s.attributes["server.port"] for s in chats} == {server.port}
    assert {s.attributes["fanflow.status"] for s in chats} == {"succeeded"}


# A job's runs on Ray (decisions 0305, 0311): 240 inputs, 2 workers, no limits given.
_JOB_INPUTS = [f"item {i}" for i in range(240)]


async def _map_job(llm: fanflow.BaseLLM, store: fanflow.Store, job: str) -> None:
    result = await fanflow.map(
        llm,
        "Say {input}",
        _JOB_INPUTS,
        store=store,
        job=job,
        cache=False,
        backend=RayBackend(workers=2, shard_size=40),
    )
    assert result.ok, [str(e) for e in result.errors.values()][:1]


async def _pool_job(llm: fanflow.BaseLLM, store: fanflow.Store, job: str) -> None:
    skill = fanflow.Skill(llm, "Say {text}", name="say")
    result = await fanflow.Pool(
        skill,
        [{"text": text} for text in _JOB_INPUTS],
        max_flows=len(_JOB_INPUTS),  # each worker's half: its lane meets the server
        store=store,
        job=job,
        cache=False,
        backend=RayBackend(workers=2, shard_size=40),
    ).arun()
    assert result.ok, [str(r.error) for r in result.items if not r.ok][:1]


async def _first_and_next_refusals(
    tmp_path: Any, run: Callable[[fanflow.BaseLLM, fanflow.Store, str], Awaitable[None]]
) -> tuple[int, int]:
    """The 429s of a job's first run and of the next (a new handle, as a new driver
    process's; a new job name, the same store) against a 12-in-flight server."""
    store = fanflow.Store(tmp_path / "s.db")
    refusals = []
    async with SimServer(latency=0.05, max_in_flight=12, keep_requests=False) as server:
        for job in ("first", "next"):
            before = server.stats().responses.get(429, 0)
            async with _handle(server) as llm:
                await run(llm, store, job)
            refusals.append(server.stats().responses.get(429, 0) - before)
    store.close()
    return refusals[0], refusals[1]


@pytest.mark.parametrize("run", [_map_job, _pool_job], ids=["map", "pool"])
async def test_a_ray_jobs_next_run_starts_from_the_capacity_its_last_run_learnt(
    tmp_path: Any, run: Callable[[fanflow.BaseLLM, fanflow.Store, str], Awaitable[None]]
) -> None:
    # No limits given: each worker's lane meets the server and finds its share of a
    # 12-in-flight server with 429s; the job's next run starts there (decisions 0305,
    # 0311: a map's handle, a Pool's skill's). Before them, the next run drew a burst
    # again (map 24-59 429s in 3 runs; pool 20-69 in 6; now 0).
    first, second = await _first_and_next_refusals(tmp_path, run)
    assert first >= 10, (first, second)  # there was something to learn
    assert second * 4 <= first, (first, second)
