"""Deployments (issue 23): the makespan of one job spread by ``fanflow.router`` over 1, 2
and 4 rate-limited deployments, against the bound of their combined rate, in this run.

    python benchmarks/router.py [--items 2000] [--rate 50] [--nginx]

Each deployment is a SimServer on loopback allowing ``--rate`` requests per second (a
token bucket, as the hosted APIs do; 0.2 s latency), and its handle is given the same
limit. Virtual time (looptime): the makespans are the event loop's, exact and free of
the machine's load. The bound is ``items / (deployments x rate)``; the ratio is bound /
makespan (1.0: the combined limit is filled for the whole run), and 429s are counted at
the servers. ``--nginx`` adds a real-time run: one deployment direct, one behind nginx's
``limit_req`` (a limiter fanflow did not write), 240 items at 40/s each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

import looptime

import fanflow
from fanflow import Limits
from fanflow.testing import SimServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/_nginx.py


async def spread(items: int, deployments: int, rate: float) -> tuple[float, int, list[int]]:
    """(makespan, 429s, requests per server) of ``items`` over ``deployments``."""
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                SimServer(rpm=int(rate), period=1.0, latency=0.2, keep_requests=False)
            )
            for _ in range(deployments)
        ]
        handles = [
            fanflow.openai("m", base_url=s.url, api_key="k", limits=Limits(rpm=rate, period=1.0))
            for s in servers
        ]
        llm = fanflow.router(*handles)
        async with llm:
            result = await fanflow.map(llm, "{input}", [f"row {i}" for i in range(items)])
        assert result.ok, result.errors
        refused = sum(s.stats().responses.get(429, 0) for s in servers)
        return result.makespan, refused, [s.stats().requests for s in servers]


async def through_nginx(items: int = 240, rate: int = 40) -> tuple[float, int, int, list[int]]:
    """(bound / makespan, nginx 429s, SimServer 429s, requests per deployment), real time."""
    from tests._nginx import NginxLimitReq

    async with SimServer(latency=0.05, keep_requests=False) as a, SimServer(latency=0.05) as b:
        port = int(b.url.split(":")[-1].split("/")[0])
        with NginxLimitReq(port, f"{rate}r/s", burst=rate, nodelay=True) as nginx:
            limits = Limits(rpm=rate, period=1.0)
            direct = fanflow.openai("m", base_url=a.url, api_key="k", limits=limits)
            behind = fanflow.openai("m", base_url=nginx.url, api_key="k", limits=limits)
            async with fanflow.router(direct, behind) as llm:
                result = await fanflow.map(llm, "{input}", [str(i) for i in range(items)])
            refused = nginx.refused()
        assert result.ok, result.errors
    bound = items / (2 * rate)
    sim_429 = a.stats().responses.get(429, 0)
    return bound / result.makespan, refused, sim_429, [a.stats().requests, b.stats().requests]


async def broken(items: int, fault: str) -> tuple[int, int, float]:
    """(requests to the broken deployment, items answered, makespan) with one of two
    deployments broken from the start (concurrency 32, virtual time)."""
    async with (
        SimServer(
            latency=0.2,
            api_key="sk-right" if fault == "401" else None,
            faults={"503": 1.0} if fault == "503" else None,
            keep_requests=False,
        ) as bad,
        SimServer(latency=0.2, keep_requests=False) as good,
    ):
        url = bad.url
        if fault == "unreachable":
            await bad.aclose()  # nothing listens there any more
        llm = fanflow.router(
            fanflow.openai("m", base_url=url, api_key="sk-wrong"),
            fanflow.openai("m", base_url=good.url, api_key="k"),
        )
        async with llm:
            rows = [f"row {i}" for i in range(items)]
            result = await fanflow.map(llm, "{input}", rows, concurrency=32)
        # The good one answers every call it gets: every call that moved was on the
        # broken one (for nothing listening, its attempts are the connections tried).
        sent = sum(len(call.attempts) for r in result.records for call in r.routes)
        to_bad = bad.stats().requests if fault != "unreachable" else sent
        return to_bad, sum(r.ok for r in result.records), result.makespan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s per deployment")
    parser.add_argument("--nginx", action="store_true", help="also the real-time nginx run")
    args = parser.parse_args(argv)
    print(f"{args.items} items, {args.rate:g} requests/s per deployment, virtual time")
    print("| deployments | bound | makespan | bound / makespan | 429s | requests per deployment |")
    print("|---|---|---|---|---|---|")
    single: float | None = None
    for n in (1, 2, 4):
        loop = looptime.new_event_loop(start=0.0)
        try:
            makespan, refused, served = loop.run_until_complete(spread(args.items, n, args.rate))
        finally:
            loop.close()
        bound = args.items / (n * args.rate)
        single = makespan if single is None else single
        print(
            f"| {n} | {bound:.2f} s | {makespan:.2f} s (x{single / makespan:.2f} faster) | "
            f"**{bound / makespan:.3f}** | {refused} | {served} |"
        )
    print()
    print(f"one of two deployments broken from the start, {args.items} items, concurrency 32")
    print("| fault | requests to the broken one | items answered | makespan |")
    print("|---|---|---|---|")
    for fault in ("unreachable", "401", "503"):
        loop = looptime.new_event_loop(start=0.0)
        try:
            to_bad, ok, makespan = loop.run_until_complete(broken(args.items, fault))
        finally:
            loop.close()
        print(f"| {fault} | {to_bad} | {ok} | {makespan:.2f} s |")
    if args.nginx:
        result: Any = asyncio.run(through_nginx())
        ratio, refused, sim_429, served = result
        print(
            f"nginx (real time): bound / makespan **{ratio:.3f}**, 429s: nginx {refused}, "
            f"direct {sim_429}, requests {served}"
        )


if __name__ == "__main__":
    main()
