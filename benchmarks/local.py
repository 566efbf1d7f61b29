"""Local model benchmarks (issues 8 and 12), as ratios against baselines measured in this run.

    python benchmarks/local.py [--quick] [--parts 1,2,3,4] [--rounds N]

1. Throughput of ``fanflow.local()`` (SmolLM2-135M-Instruct Q4_1) with 1, 2 and 4
   instances of one thread each: output tokens per second over a map, as a ratio to one
   instance.
2. A map over 50 items: a plain loop calling llama-cpp-python one item after another
   (one model using every core, the natural way to write it) vs ``fanflow.map`` over
   ``fanflow.local()`` with its defaults.
3. Process isolation (issue 12): the in-process design (model instances in threads of
   this process, as fanflow ran them before; rebuilt here from ``_llama.Instance``) vs
   ``fanflow.local()``'s worker processes: same model, prompts and instances x threads,
   rounds alternated so load drift hits both. The isolated design must not be more than
   5% slower.
4. llama.cpp's extra buffer types (weight repacking) on vs off, in worker processes
   (docs/decisions/0080).

Everything runs at temperature 0 with a fixed seed; outputs are checked to be identical
where the designs should agree.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fanflow
from fanflow.providers._llama import Instance, Settings
from fanflow.providers._local import DEFAULT_N_CTX, default_model_path

TOPICS = [
    "rivers",
    "mountains",
    "the sea",
    "bread",
    "bicycles",
    "clocks",
    "owls",
    "rain",
    "libraries",
    "trains",
]
PROMPT = "Write two sentences about {topic}."


def items(n: int) -> list[dict[str, str]]:
    return [{"topic": f"{TOPICS[i % len(TOPICS)]} (note {i})"} for i in range(n)]


class InProcessLocal(fanflow.BaseLLM):
    """The in-process design: one llama.cpp instance per thread of this process (what
    ``fanflow.local()`` did before issue 12), for comparison only."""

    def __init__(self, instances: int, threads: int, extra_buffers: bool) -> None:
        super().__init__(
            model=default_model_path().stem, limits=fanflow.Limits(concurrency=instances)
        )
        self.instances = instances
        self._settings = Settings(default_model_path(), DEFAULT_N_CTX, threads, None, extra_buffers)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=instances)
        self._local = threading.local()
        self._loaded: list[Instance] = []

    def _instance(self) -> Instance:
        instance: Instance | None = getattr(self._local, "instance", None)
        if instance is None:
            instance = self._local.instance = Instance(self._settings)
            self._loaded.append(instance)
        return instance

    def _generate(self, request: fanflow.Request) -> fanflow.Response:
        return self._instance().generate(request, should_stop=lambda: False)

    async def complete(self, request: fanflow.Request) -> fanflow.Response:
        return await asyncio.wrap_future(self._pool.submit(self._generate, request))

    async def load(self) -> None:
        barrier = threading.Barrier(self.instances)

        def load_here() -> None:
            self._instance()
            barrier.wait(timeout=600)

        jobs = [self._pool.submit(load_here) for _ in range(self.instances)]
        await asyncio.gather(*(asyncio.wrap_future(j) for j in jobs))

    async def aclose(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        for instance in self._loaded:
            instance.close()


def cpu_seconds(llm: fanflow.BaseLLM) -> float:
    """CPU time used so far by this process and, for ``fanflow.local()``, its workers
    (from /proc: user + system time of each live worker)."""
    total = time.process_time()
    if isinstance(llm, fanflow.providers.LocalLLM):
        tick = os.sysconf("SC_CLK_TCK")
        for pid in llm.pool_statistics().pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


@dataclass
class Run:
    tokens: int
    seconds: float
    cpu: float
    outputs: list[str | None]

    @property
    def rate(self) -> float:
        """Output tokens per second of wall time."""
        return self.tokens / self.seconds

    @property
    def per_cpu(self) -> float:
        """Output tokens per CPU second (this process and its workers): what each token
        costs, which other work on the machine disturbs much less than wall time."""
        return self.tokens / self.cpu


async def timed_map(llm: fanflow.BaseLLM, n: int, max_tokens: int) -> Run:
    """A map over ``n`` items: output tokens, wall and CPU seconds, outputs."""
    cpu = cpu_seconds(llm)
    start = time.perf_counter()
    result = await fanflow.map(
        llm, PROMPT, items(n), temperature=0.0, seed=1, max_tokens=max_tokens
    )
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(llm) - cpu
    assert result.ok, result.errors
    return Run(result.summary.usage.output_tokens, elapsed, cpu, result.outputs)


async def throughput(instances: int, n: int, max_tokens: int) -> tuple[float, float]:
    async with fanflow.local(instances=instances, threads=1) as llm:
        await llm.load()
        run = await timed_map(llm, n, max_tokens)
    return run.rate, run.seconds


def plain_loop(n: int, max_tokens: int, cores: int) -> tuple[list[str], float]:
    """What one would write without fanflow: one model, one item at a time (in this
    process: it is the baseline, and this script is not a test)."""
    from llama_cpp import Llama

    model = Llama(
        model_path=str(default_model_path()),
        n_ctx=2048,
        n_threads=cores,
        n_threads_batch=cores,
        verbose=False,
    )
    try:
        start = time.perf_counter()
        out = []
        for item in items(n):
            reply = model.create_chat_completion(
                messages=[{"role": "user", "content": PROMPT.format(**item)}],
                temperature=0.0,
                seed=1,
                max_tokens=max_tokens,
            )
            out.append(str(reply["choices"][0]["message"]["content"]))
        return out, time.perf_counter() - start
    finally:
        model.close()


async def compare(
    name_a: str,
    make_a: Callable[[], fanflow.BaseLLM],
    name_b: str,
    make_b: Callable[[], fanflow.BaseLLM],
    *,
    rounds: int,
    n: int,
    max_tokens: int,
) -> None:
    """Tokens/s of two handles, loaded once each, over alternating rounds (A B B A ...)."""
    handles = {name_a: make_a(), name_b: make_b()}
    runs: dict[str, list[Run]] = {name_a: [], name_b: []}
    try:
        for llm in handles.values():
            await llm.load()  # type: ignore[attr-defined]
            await timed_map(llm, 4, 4)  # warm up: first decodes, page cache
        for r in range(rounds):
            order = [name_a, name_b] if r % 2 == 0 else [name_b, name_a]
            for name in order:
                run = await timed_map(handles[name], n, max_tokens)
                runs[name].append(run)
                print(
                    f"   round {r + 1} {name}: {run.rate:6.1f} tokens/s ({run.seconds:.2f} s), "
                    f"{run.per_cpu:6.1f} tokens per CPU-second ({run.cpu:.2f} CPU-s)"
                )
    finally:
        for llm in handles.values():
            await llm.aclose()
    a, b = runs[name_a], runs[name_b]
    for label, unit, key in (
        ("wall", "tokens/s", lambda run: run.rate),
        ("CPU", "tokens per CPU-second", lambda run: run.per_cpu),
    ):
        ma, mb = statistics.median(map(key, a)), statistics.median(map(key, b))
        # Each round ran both back to back, so a round's ratio sees the same machine load.
        paired = statistics.median(key(y) / key(x) for x, y in zip(a, b, strict=True))
        print(
            f"   median {label}: {name_a} {ma:6.1f}, {name_b} {mb:6.1f} {unit}; "
            f"ratio {name_b} / {name_a}: {mb / ma:.3f} (median of per-round ratios {paired:.3f})"
        )
    print(f"   same outputs: {a[-1].outputs == b[-1].outputs}")


async def main(quick: bool, parts: set[int], rounds: int | None) -> None:
    cores = len(os.sched_getaffinity(0))
    n_tp, max_tokens = (8, 24) if quick else (24, 48)
    rounds = rounds or (2 if quick else 8)
    default = fanflow.local()
    shape = (default.instances, default.threads)
    print(f"machine: {cores} cores; model: {default_model_path().name}; load: {os.getloadavg()}")
    if 1 in parts:
        print(f"\n1. throughput, map over {n_tp} items, max_tokens={max_tokens}")
        base: float | None = None
        for instances in (1, 2, 4):
            tps, elapsed = await throughput(instances, n_tp, max_tokens)
            base = base or tps
            print(
                f"   {instances} instance(s) x 1 thread: {tps:6.1f} tokens/s "
                f"({elapsed:.2f} s)  ratio {tps / base:.2f}"
            )
    if 2 in parts:
        n = 20 if quick else 50
        map_tokens = 16
        print(f"\n2. map over {n} items, max_tokens={map_tokens}")
        async with fanflow.local() as llm:
            await llm.load()
            ff = await timed_map(llm, n, map_tokens)
        ff_s, ff_out = ff.seconds, ff.outputs
        print(f"   fanflow.map, fanflow.local() ({shape[0]} x {shape[1]}): {ff_s:.2f} s")
        # Two baselines: a model on every core (what one would write), and on one core
        # (llama.cpp's threads spin-wait for each other, which costs a lot when other work
        # shares the cores).
        for threads in sorted({cores, 1}, reverse=True):
            loop_out, loop_s = plain_loop(n, map_tokens, threads)
            print(f"   plain loop, 1 model x {threads} threads: {loop_s:.2f} s")
            print(f"   speedup {loop_s / ff_s:.2f}x; same outputs: {ff_out == loop_out}")
    if 3 in parts:
        print(
            f"\n3. in-process vs worker processes, {shape[0]} instances x {shape[1]} threads, "
            f"{rounds} rounds of a map over {n_tp} items, max_tokens={max_tokens}"
        )
        extra = default.extra_buffers
        await compare(
            "in-process",
            lambda: InProcessLocal(*shape, extra),
            "isolated",
            lambda: fanflow.local(instances=shape[0], threads=shape[1], extra_buffers=extra),
            rounds=rounds,
            n=n_tp,
            max_tokens=max_tokens,
        )
    if 4 in parts:
        print(
            f"\n4. extra buffer types on vs off (worker processes, {shape[0]} x {shape[1]}), "
            f"{rounds} rounds of a map over {n_tp} items, max_tokens={max_tokens}"
        )
        await compare(
            "extra buffers on",
            lambda: fanflow.local(instances=shape[0], threads=shape[1], extra_buffers=True),
            "extra buffers off",
            lambda: fanflow.local(instances=shape[0], threads=shape[1], extra_buffers=False),
            rounds=rounds,
            n=n_tp,
            max_tokens=max_tokens,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer items, for a smoke run")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run, e.g. 3,4")
    parser.add_argument("--rounds", type=int, help="rounds of parts 3 and 4 (default 8)")
    args = parser.parse_args()
    asyncio.run(main(args.quick, {int(p) for p in args.parts.split(",")}, args.rounds))
