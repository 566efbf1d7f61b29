"""Shared limits benchmark: several processes on one request rate, through one store.

Run: ``python benchmarks/shared.py`` (about a minute; ``--quick`` for a smoke run).
``--capacity``: capacity learnt once instead (decision 0282). Two processes run one after
the other, with no limits given, against a 40-in-flight server. It reports the 429s
each drew; "unshared" learns nothing across processes.

P worker processes (this file, ``--worker``) each map N/P items through
``fanflow.openai`` against one SimServer in this process, whose token bucket holds
exactly one second of RATE requests (``SimServer(rpm=RATE, period=1.0)``). Each handle
declares the same ``Limits(rpm=RATE, period=1.0)``:

- unshared (the baseline, today): every process paces itself as if it were alone;
- ``shared="sqlite:///..."`` and ``shared="redis://..."`` (a redis-server on loopback,
  started here): one budget for all.

The workers start together at an agreed time (their imports excluded). Counted at the
server: 429s. Throughput: the items over the time from the first worker's start to the
last one's end, against RATE (>= 0.9 is the target). Round trips: store calls (SQLite
transactions, Redis scripts) per call, summed over the workers. CPU: the workers'
process time (``time.process_time()``, their threads included) over the map, per call;
the unshared row is the local meter's, the baseline for the shared meter's cost.

``--stores redis,sqlite`` runs only those stores; ``--commandstats`` prints, after each
Redis run, Redis's own time per command (``INFO commandstats``, then reset): the grant
script's cost at the server, which all the processes share (decision 0295).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import fanflow
from fanflow import Limits, RetryPolicy
from fanflow.limits import DEFAULT_LIMITS
from fanflow.testing import SimServer


async def _work(shared: str, base: str, tag: str, n: int, rate: float, start_at: float) -> dict:
    if rate:
        limits = Limits(rpm=rate, period=1.0, shared=shared or None)
    else:  # no limits given: the default adaptive concurrency (as the CLI makes it)
        limits = Limits(controller=DEFAULT_LIMITS.controller, shared=shared or None)
    llm = fanflow.openai(
        "gpt-sim", base_url=base, api_key="sk-bench", limits=limits, retry=RetryPolicy(seed=1)
    )
    await asyncio.sleep(max(0.0, start_at - time.time()))
    start, cpu = time.time(), time.process_time()
    async with llm:
        result = await fanflow.map(llm, "{input}", [f"{tag}-{i}" for i in range(n)])
    cpu = time.process_time() - cpu
    trips = 0
    if shared:
        from fanflow._shared import open_store
        from fanflow._shared._url import parse_url

        trips = open_store(parse_url(shared), shared).round_trips
    return {"ok": result.ok, "start": start, "end": time.time(), "trips": trips, "cpu": cpu}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(shared: str, rate: float, procs: int, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with SimServer(latency=0.05, rpm=int(rate), period=1.0, keep_requests=False) as server:
        start_at = time.time() + 8.0  # the workers' imports take seconds on a loaded machine
        args = [sys.executable, __file__, "--worker", shared, server.url]
        workers = [
            subprocess.Popen(
                [*args, f"p{i}", str(n // procs), str(rate), str(start_at)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(procs)
        ]
        outs = [json.loads(w.communicate(timeout=300)[0].strip().splitlines()[-1]) for w in workers]
        stats = server.stats()
    elapsed = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    return {
        "ok": all(o["ok"] for o in outs),
        "429": stats.responses.get(429, 0),
        "ratio": n / elapsed / rate,
        "trips_per_call": sum(o["trips"] for o in outs) / n,
        "cpu_ms_per_call": 1000 * sum(o["cpu"] for o in outs) / n,
    }


def _capacity(shared: str, n: int) -> list[tuple[int, float]]:
    """Two processes one after the other, no limits given, against a 40-in-flight
    server: (429s, makespan) of each. The second starts from what the first learnt."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = []
    with SimServer(latency=0.3, max_in_flight=40, keep_requests=False) as server:
        for tag in ("first", "second"):
            args = [sys.executable, __file__, "--worker", shared, server.url, tag, str(n), "0"]
            worker = subprocess.run(
                [*args, str(time.time())], stdout=subprocess.PIPE, text=True, env=env, check=True
            )
            o = json.loads(worker.stdout.strip().splitlines()[-1])
            before = sum(refused for refused, _ in out)
            out.append((server.stats().responses.get(429, 0) - before, o["end"] - o["start"]))
    return out


def _commandstats(url: str) -> None:
    """Print Redis's own time per command since the last call, then reset it."""
    import redis

    client = redis.Redis.from_url(url)
    stats = client.info("commandstats")
    client.config_resetstat()
    client.close()
    for name, row in sorted(stats.items(), key=lambda kv: -int(kv[1]["usec"])):
        if name.startswith("cmdstat_") and row["calls"]:
            per = row["usec"] / row["calls"]
            print(
                f"{'':>9} {name[8:]:>16} {row['calls']:>8} calls "
                f"{row['usec'] / 1000:>9.1f} ms {per:>9.1f} us/call"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rates", default="50,200", help="requests per second, comma-separated")
    parser.add_argument(
        "--stores", default="unshared,sqlite,redis", help="which stores, comma-separated"
    )
    parser.add_argument(
        "--commandstats",
        action="store_true",
        help="after each Redis run, Redis's own time per command (INFO commandstats)",
    )
    parser.add_argument("--worker", nargs=6)
    parser.add_argument(
        "--capacity", action="store_true", help="capacity learnt once (decision 0282) instead"
    )
    args = parser.parse_args()
    if args.worker:
        shared, base, tag, n, rate, start_at = args.worker
        out = asyncio.run(_work(shared, base, tag, int(n), float(rate), float(start_at)))
        print(json.dumps(out))
        return
    procs, seconds = 4, 2 if args.quick else 6
    redis_bin = shutil.which("redis-server")
    with tempfile.TemporaryDirectory() as tmp:
        redis = None
        stores = [("unshared", ""), ("sqlite", f"sqlite:///{tmp}/limits.db")]
        if redis_bin:
            port = _free_port()
            redis = subprocess.Popen(
                [
                    redis_bin,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp,
                ],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            stores.append(("redis", f"redis://127.0.0.1:{port}/0"))
        stores = [(name, url) for name, url in stores if name in args.stores.split(",")]
        try:
            if args.capacity:
                print("400 items, no limits given, SimServer(max_in_flight=40, latency=0.3)")
                print(f"{'store':>9} {'429s 1st':>9} {'429s 2nd':>9} {'time 1st':>9} {'2nd':>6}")
                for name, url in stores:
                    (r1, t1), (r2, t2) = _capacity(url, 400)
                    print(f"{name:>9} {r1:>9} {r2:>9} {t1:>8.1f}s {t2:>5.1f}s")
                return
            print(f"{procs} processes, {seconds} s of items at the rate, SimServer bucket of 1 s")
            head = f"{'store':>9} {'rate/s':>7} {'429s':>6} {'of bound':>9} {'trips/call':>11}"
            print(f"{head} {'CPU ms/call':>12} ok")
            for rate in (float(r) for r in args.rates.split(",")):
                for name, url in stores:
                    r = _run(url, rate, procs, int(rate * seconds))
                    print(
                        f"{name:>9} {rate:>7g} {r['429']:>6} {r['ratio']:>9.2f} "
                        f"{r['trips_per_call']:>11.3f} {r['cpu_ms_per_call']:>12.2f} {r['ok']}"
                    )
                    if args.commandstats and name == "redis":
                        _commandstats(url)
        finally:
            if redis is not None:
                redis.terminate()
                redis.wait(10)


if __name__ == "__main__":
    main()
