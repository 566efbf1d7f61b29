"""Local model benchmarks (issue 8), printed as ratios against baselines measured in this run.

    python benchmarks/local.py [--quick]

1. Throughput of ``fanflow.local()`` (SmolLM2-135M-Instruct Q4_1) with 1, 2 and 4
   instances of one thread each: output tokens per second over a map, as a ratio to one
   instance.
2. A map over 50 items: a plain loop calling llama-cpp-python one item after another
   (one model using every core, the natural way to write it) vs ``fanflow.map`` over
   ``fanflow.local()`` with its defaults.

Both run at temperature 0 with a fixed seed; the fanflow map's outputs are checked to
equal the plain loop's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import fanflow
from fanflow.providers.local import default_model_path

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


async def throughput(instances: int, n: int, max_tokens: int) -> tuple[float, float]:
    """Output tokens per second of a map over ``n`` items; also the makespan."""
    async with fanflow.local(instances=instances, threads=1) as llm:
        await llm.load()
        start = time.perf_counter()
        result = await fanflow.map(
            llm, PROMPT, items(n), temperature=0.0, seed=1, max_tokens=max_tokens
        )
        elapsed = time.perf_counter() - start
    assert result.ok, result.errors
    return result.summary.usage.output_tokens / elapsed, elapsed


def plain_loop(n: int, max_tokens: int, cores: int) -> tuple[list[str], float]:
    """What one would write without fanflow: one model, one item at a time."""
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


async def fanflow_map(n: int, max_tokens: int) -> tuple[list[str | None], float, str]:
    async with fanflow.local() as llm:
        await llm.load()
        start = time.perf_counter()
        result = await fanflow.map(
            llm, PROMPT, items(n), temperature=0.0, seed=1, max_tokens=max_tokens
        )
        elapsed = time.perf_counter() - start
        shape = f"{llm.instances} instances x {llm.threads} threads"
    return result.outputs, elapsed, shape


async def main(quick: bool) -> None:
    cores = len(os.sched_getaffinity(0))
    n_tp, max_tokens = (8, 24) if quick else (24, 48)
    print(f"machine: {cores} cores; model: {default_model_path().name}")
    print(f"\n1. throughput, map over {n_tp} items, max_tokens={max_tokens}")
    base: float | None = None
    for instances in (1, 2, 4):
        tps, elapsed = await throughput(instances, n_tp, max_tokens)
        base = base or tps
        print(
            f"   {instances} instance(s) x 1 thread: {tps:6.1f} tokens/s "
            f"({elapsed:.2f} s)  ratio {tps / base:.2f}"
        )

    n = 20 if quick else 50
    map_tokens = 16
    print(f"\n2. map over {n} items, max_tokens={map_tokens}")
    ff_out, ff_s, shape = await fanflow_map(n, map_tokens)
    print(f"   fanflow.map, fanflow.local() ({shape}): {ff_s:.2f} s")
    # Two baselines: a model on every core (what one would write), and on one core (llama.cpp's
    # threads spin-wait for each other, which costs a lot when other work shares the cores).
    for threads in sorted({cores, 1}, reverse=True):
        loop_out, loop_s = plain_loop(n, map_tokens, threads)
        print(f"   plain loop, 1 model x {threads} threads: {loop_s:.2f} s")
        print(f"   speedup {loop_s / ff_s:.2f}x; same outputs: {ff_out == loop_out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer items, for a smoke run")
    asyncio.run(main(parser.parse_args().quick))
