"""Provider overhead: fanflow.map + fanflow.openai vs bare HTTP loops vs the openai SDK.

The same N chat calls (default N=2000, concurrency 100) against SimServer with a fixed
100 ms latency, running in its own process so its CPU does not count against the
client. Each variant runs in a fresh process; we report the makespan (and its ratio to
the lower bound ceil(N/C) x latency) and the client's CPU time per call (and its ratio to
the bare aiohttp loop, the baseline measured in the same run).

    python benchmarks/providers.py [--n 2000] [--concurrency 100] [--latency 0.1]
                                   [--repeat 3] [--only fanflow,aiohttp]

Targets (docs/architecture.md, "Performance targets"): makespan within 5% of the bound;
fanflow's CPU per call at most 1.25x the bare loop's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

PROMPT = "Summarise the plot of a short story about a lighthouse keeper."


def start_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanflow.testing.sim", "--port", "0", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())["url"]


def _body(i: int) -> bytes:
    return json.dumps(
        {"model": "sim", "messages": [{"role": "user", "content": f"{PROMPT} #{i}"}]}
    ).encode()


# --------------------------------------------------------------------------- variants
# Each variant: ``await setup(url, c)`` returns (run, close); ``await run(n)`` makes n calls.

Run = Callable[[int], Awaitable[None]]
Close = Callable[[], Awaitable[None]]


async def bare_aiohttp(url: str, c: int) -> tuple[Run, Close]:
    """The baseline: a semaphore and one pooled aiohttp session."""
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c))
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    endpoint = f"{url}/chat/completions"

    async def run(n: int) -> None:
        sem = asyncio.Semaphore(c)

        async def one(i: int) -> str:
            async with sem, session.post(endpoint, data=_body(i), headers=headers) as r:
                data = json.loads(await r.read())
            return str(data["choices"][0]["message"]["content"])

        await asyncio.gather(*(one(i) for i in range(n)))

    return run, session.close


def bare_httpx(keepalive: int | None) -> Callable[[str, int], Awaitable[tuple[Run, Close]]]:
    async def setup(url: str, c: int) -> tuple[Run, Close]:
        import httpx

        limits = httpx.Limits(max_connections=c, max_keepalive_connections=keepalive or c)
        client = httpx.AsyncClient(limits=limits, timeout=60.0)
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
        endpoint = f"{url}/chat/completions"

        async def run(n: int) -> None:
            sem = asyncio.Semaphore(c)

            async def one(i: int) -> str:
                async with sem:
                    r = await client.post(endpoint, content=_body(i), headers=headers)
                    data = json.loads(r.content)
                return str(data["choices"][0]["message"]["content"])

            await asyncio.gather(*(one(i) for i in range(n)))

        return run, client.aclose

    return setup


async def fanflow_map(
    url: str,
    c: int,
    hedge: bool | None = None,
    batch_gc: bool = True,
    fresh: bool = False,
    cold: bool = True,
) -> tuple[Run, Close]:
    """fanflow.map over N items with a fanflow.openai handle (its defaults).

    ``fresh``: the measured run gets a new handle (as a user's first batch does: the
    breaker's cold start, decision 0175), the warm-up another one; ``cold=False``: that
    new handle without a cold start (the reference for what the cold start costs).
    """
    import fanflow
    from fanflow._breaker import Breaker

    if not batch_gc:  # the A/B of decision 0150: the GC threshold as the process has it
        import fanflow._gc

        fanflow._gc.BATCH_GC_THRESHOLD = 0

    retry = None if hedge is None else fanflow.RetryPolicy(hedge=hedge)
    llm = fanflow.openai("sim", base_url=url, api_key="sk-bench", retry=retry)

    handles = [llm]
    runs = 0

    async def run(n: int) -> None:
        nonlocal runs
        runs += 1
        handle = llm
        if fresh and runs > 1:
            handle = fanflow.openai("sim", base_url=url, api_key="sk-bench", retry=retry)
            if not cold:
                handle.breaker = Breaker()
            handles.append(handle)
        items = [{"i": i} for i in range(n)]
        result = await fanflow.map(handle, PROMPT + " #{i}", items, concurrency=c)
        assert result.ok, result.errors

    async def close() -> None:
        for handle in handles:
            await handle.aclose()

    return run, close


async def openai_sdk(url: str, c: int) -> tuple[Run, Close]:
    """The official openai SDK (its default pool) with a semaphore."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=0)

    async def run(n: int) -> None:
        sem = asyncio.Semaphore(c)

        async def one(i: int) -> str:
            async with sem:
                r = await client.chat.completions.create(
                    model="sim", messages=[{"role": "user", "content": f"{PROMPT} #{i}"}]
                )
            return r.choices[0].message.content or ""

        await asyncio.gather(*(one(i) for i in range(n)))

    return run, client.close


VARIANTS: dict[str, tuple[str, Callable[[str, int], Awaitable[tuple[Run, Close]]]]] = {
    "aiohttp": ("bare aiohttp + semaphore (baseline)", bare_aiohttp),
    "fanflow": ("fanflow.map + fanflow.openai", fanflow_map),
    "nohedge": (
        "... with RetryPolicy(hedge=False)",
        lambda url, c: fanflow_map(url, c, hedge=False),
    ),
    "nogc": (
        "... without the batch GC threshold (decision 0150)",
        lambda url, c: fanflow_map(url, c, batch_gc=False),
    ),
    "fresh": (
        "... a new handle (cold start, decision 0175)",
        lambda url, c: fanflow_map(url, c, fresh=True),
    ),
    "nocold": (
        "... a new handle without a cold start",
        lambda url, c: fanflow_map(url, c, fresh=True, cold=False),
    ),
    "httpx20": ("bare httpx + semaphore, keep-alive 20", bare_httpx(20)),
    "httpx": ("bare httpx + semaphore, keep-alive = C", bare_httpx(None)),
    "sdk": ("official openai SDK + semaphore", openai_sdk),
}


def _measure(name: str, url: str, n: int, c: int, warmup: int, out: Any) -> None:
    setup = VARIANTS[name][1]

    async def main() -> tuple[float, float]:
        run, close = await setup(url, c)
        try:
            await run(warmup)  # open the pool, load code paths
            cpu0, t0 = time.process_time(), time.perf_counter()
            await run(n)
            return time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            await close()

    out.send(asyncio.run(main()))


def measure(name: str, url: str, n: int, c: int, warmup: int) -> tuple[float, float]:
    recv, send = mp.Pipe(duplex=False)
    proc = mp.get_context("spawn").Process(target=_measure, args=(name, url, n, c, warmup, send))
    proc.start()
    result: tuple[float, float] = recv.recv()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--only", default=",".join(VARIANTS))
    args = parser.parse_args()
    names = [v for v in args.only.split(",") if v]
    if "aiohttp" not in names:
        names.insert(0, "aiohttp")
    bound = math.ceil(args.n / args.concurrency) * args.latency
    server, url = start_server(args.latency)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    try:
        for _ in range(args.repeat):  # interleaved, so drifting load hits every variant
            for name in names:
                results[name].append(measure(name, url, args.n, args.concurrency, args.warmup))
    finally:
        server.terminate()
        server.wait()
    print(
        f"N={args.n} concurrency={args.concurrency} latency={args.latency * 1000:.0f} ms; "
        f"lower bound {bound:.2f} s; median of {args.repeat} runs; SimServer in its own process"
    )
    base_cpu = statistics.median(cpu for _, cpu in results["aiohttp"]) / args.n
    print(f"{'variant':42} {'makespan':>9} {'/bound':>7} {'CPU/call':>9} {'/bare':>6}")
    for name in names:
        makespan = statistics.median(m for m, _ in results[name])
        cpu = statistics.median(c for _, c in results[name]) / args.n
        print(
            f"{VARIANTS[name][0]:42} {makespan:8.2f}s {makespan / bound:7.3f} "
            f"{cpu * 1000:7.3f}ms {cpu / base_cpu:6.2f}"
        )


if __name__ == "__main__":
    main()
