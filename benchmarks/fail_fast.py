"""Fail fast (issue 13.2): requests a batch sends when every call must fail the same way,
with the handle's breaker against the same handle with its breaker off, in this run.

    python benchmarks/fail_fast.py [--items 300] [--concurrency 8]

SimServer counts the requests (connection attempts, for nothing listening, are counted
from the records' attempts). Virtual time (looptime): the retries' backoff costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import looptime

import fanflow
from fanflow.testing import SimServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wrong_key(items: list[str], c: int | None, breaker: bool) -> int:
    async with (
        SimServer(api_key="sk-right", latency=0.1) as server,
        fanflow.openai("m", base_url=server.url, api_key="sk-wrong") as llm,
    ):
        if not breaker:
            llm.breaker = None  # type: ignore[assignment]
        await fanflow.map(llm, "{input}", items, concurrency=c)
    return server.stats().requests


async def _wrong_key_no_limit(items: list[str], c: int, breaker: bool) -> int:
    return await _wrong_key(items, None, breaker)  # type: ignore[arg-type]


async def _quota(items: list[str], c: int, breaker: bool) -> int:
    async with (
        SimServer(fault_on={"": "quota"}) as server,
        fanflow.openai("m", base_url=server.url, api_key="k") as llm,
    ):
        if not breaker:
            llm.breaker = None  # type: ignore[assignment]
        await fanflow.map(llm, "{input}", items, concurrency=c)
    return server.stats().requests


async def _unknown_model(items: list[str], c: int, breaker: bool) -> int:
    async with (
        SimServer(models=["good"]) as server,
        fanflow.openai("missing", base_url=server.url, api_key="k") as llm,
    ):
        if not breaker:
            llm.breaker = None  # type: ignore[assignment]
        await fanflow.map(llm, "{input}", items, concurrency=c)
    return server.stats().requests


async def _nothing_listening(items: list[str], c: int, breaker: bool) -> int:
    llm = fanflow.openai("m", base_url=f"http://127.0.0.1:{_free_port()}/v1", api_key="k")
    async with llm:
        if not breaker:
            llm.breaker = None  # type: ignore[assignment]
        result = await fanflow.map(llm, "{input}", items, concurrency=c)
    return sum(len(r.attempts) for r in result.records)


async def _limit_zero(items: list[str], c: int, breaker: bool) -> int:
    # Every request refused with 429 (Retry-After 1 s), as for a key whose limit is 0.
    async with (
        SimServer(faults={"429": 1.0}, arrival_jitter=0.2, keep_requests=False) as server,
        fanflow.openai("m", base_url=server.url, api_key="k") as llm,
    ):
        if not breaker:
            llm.breaker = None  # type: ignore[assignment]
        await fanflow.map(llm, "{input}", items, concurrency=c)
    return server.stats().requests


async def _second_client(items: list[str], latency: float) -> tuple[int, int]:
    """Two handles on one key, no limits, a 12-in-flight server: the items each loses
    when both start at once (decision 0310)."""
    async with SimServer(latency=latency, max_in_flight=12, keep_requests=False) as server:
        handles = [fanflow.openai("m", base_url=server.url, api_key="k") for _ in range(2)]
        runs = [fanflow.map(llm, "{input}", items) for llm in handles]
        results = await asyncio.gather(*runs)
        for llm in handles:
            await llm.aclose()
    first, second = (r.summary.failed + r.summary.skipped for r in results)
    return first, second


SCENARIOS: dict[str, Callable[[list[str], int, bool], Awaitable[int]]] = {
    "wrong key (401)": _wrong_key,
    "wrong key, no concurrency limit": _wrong_key_no_limit,
    "quota spent (429 quota)": _quota,
    "unknown model (404)": _unknown_model,
    "nothing listening (refused)": _nothing_listening,
    "limit 0 (429 to everything)": _limit_zero,
    "limit 0, no concurrency limit": lambda items, c, on: _limit_zero(items, None, on),  # type: ignore[arg-type]
}


async def _cold_cost(items: list[str], latency: float, concurrency: int | None) -> float:
    """Makespan of a right-key batch on a new (cold) handle / on a warm one."""
    async with SimServer(latency=latency) as server:
        times = []
        for warm in (False, True):
            async with fanflow.openai("m", base_url=server.url, api_key="k") as llm:
                if warm:
                    llm.breaker.reset()  # ends the cold start
                loop = asyncio.get_running_loop()
                start = loop.time()
                result = await fanflow.map(llm, "{input}", items, concurrency=concurrency)
                assert result.ok
                times.append(loop.time() - start)
    return times[0] / times[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    items = [f"row {i}" for i in range(args.items)]
    print(f"{args.items} items, concurrency {args.concurrency}, default retry policy")
    print(f"{'scenario':30} {'breaker off':>12} {'breaker on':>11} {'ratio':>7}")
    for name, scenario in SCENARIOS.items():
        counts: list[Any] = []
        for breaker in (False, True):
            loop = looptime.new_event_loop(start=0.0)
            try:
                counts.append(loop.run_until_complete(scenario(items, args.concurrency, breaker)))
            finally:
                loop.close()
        off, on = counts
        print(f"{name:30} {off:>12} {on:>11} {on / off:>7.3f}")
    print("\ncost of the cold start, right key: makespan on a new handle / a warm one")
    for latency in (0.1, 2.0):
        for c in (args.concurrency, 100, None):
            loop = looptime.new_event_loop(start=0.0)
            try:
                ratio = loop.run_until_complete(_cold_cost(items, latency, c))
            finally:
                loop.close()
            print(f"  latency {latency:>4} s, concurrency {c!s:>4}: {ratio:.3f}")
    print("\na second client on a full server (12 in flight, 50 ms): items lost, each")
    loop = looptime.new_event_loop(start=0.0)
    try:
        lost = loop.run_until_complete(_second_client(items, 0.05))
    finally:
        loop.close()
    print(f"  first {lost[0]}, second {lost[1]} (of {len(items)} each)")


if __name__ == "__main__":
    main()
