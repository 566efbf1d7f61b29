"""SimServer's maximum request rate: it must never be the bottleneck of a benchmark.

SimServer runs in its own process with no latency; client processes (raw aiohttp,
keep-alive, a semaphore each) send small chat requests as fast as they can. The server
process's CPU time per request is measured too: rate = 1 / (server CPU per request) is
what one core can serve.

    python benchmarks/simserver.py [--requests 20000] [--clients 2] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import aiohttp


def start_server(*extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m fanflow.testing.sim`` on a free port; return it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanflow.testing.sim", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = json.loads(proc.stdout.readline())["url"]
    return proc, url


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _client(url: str, n: int, concurrency: int) -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    ).encode()
    sem = asyncio.Semaphore(concurrency)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with sem, session.post(url, data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200

        await asyncio.gather(*(one() for _ in range(n)))


def client_process(url: str, n: int, concurrency: int) -> None:
    asyncio.run(_client(url, n, concurrency))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    proc, url = start_server()
    try:
        per = args.requests // args.clients
        # warm up the server's code paths
        client_process(url + "/chat/completions", 200, 16)
        cpu0, t0 = cpu_of(proc.pid), time.perf_counter()
        workers = [
            mp.Process(
                target=client_process, args=(url + "/chat/completions", per, args.concurrency)
            )
            for _ in range(args.clients)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed, cpu = time.perf_counter() - t0, cpu_of(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait()
    total = per * args.clients
    print(f"SimServer: {total} requests from {args.clients} client processes")
    print(f"  observed rate       {total / elapsed:8.0f} req/s (clients share the 2 cores)")
    print(f"  server CPU/request  {cpu / total * 1e6:8.0f} us")
    print(f"  one-core capacity   {total / cpu:8.0f} req/s (1 / server CPU per request)")


if __name__ == "__main__":
    main()
