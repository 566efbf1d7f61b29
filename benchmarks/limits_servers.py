"""Limits against servers fanflow did not write (issue 17), SimServer and nginx limit_req.

Run: ``python benchmarks/limits_servers.py`` (a few minutes; ``--quick`` for less).

Every point runs against SimServer (on a virtual-time loop: minutes of traffic take
seconds, exact) and against nginx's ``limit_req`` as a reverse proxy in front of
SimServer (real time, loopback; started and stopped here, config in a temp dir). It
prints, per run: 429s the server sent, items lost (not succeeded), extra calls (requests
that reached the server beyond one per item: retries, requeues, hedges, 429s), and the
makespan over the bound (N / rate for a rate limit, ceil(N / C) x latency for a
concurrency), plus what the point needs (throughput, 429s per minute, hedges).

1. Margin: ``Limits(rpm=R)`` against a one-second token bucket of R/s whose requests
   arrive late (150 ms on a new connection, up to 20 ms each), and against nginx
   ``rate=R r/s`` with ``burst=R`` (nodelay, delay), ``burst=R/2`` and ``burst=0``.
2. Defaults: no Limits at all against a 10-in-flight cap, a 50/s bucket, nginx 50 r/s.
3. Adaptive: ``Limits.adaptive()`` against a concurrency cap and a rate cap at 50 ms,
   100 ms and 1 s latency, and against nginx.
4. Tails: 1,000 items at concurrency 50 with 5% 500s, 2% 503s and 1% hangs (timeout
   2 s), hedging policy on and off; the same without faults (extra calls).
5. First wave (issue 27 part 3, issue 28 section 5): a new handle with no limits given
   against generous servers (2,000 items at 100 in flight and 100 ms; 5,000 at 1,000
   and 1 s), a 10-in-flight cap, a 50/s bucket with and without rate-limit headers and
   nginx; "first wave" counts the 429s that came back before the first answer.
   ``--cold off`` runs the same with the cold start off (a breaker without one).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import looptime

import fanflow
from fanflow import Limits, RetryPolicy
from fanflow._breaker import Breaker
from fanflow._exceptions import RateLimited
from fanflow.testing import SimServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/_nginx.py
from tests._nginx import NginxLimitReq, nginx_path


@dataclass
class Outcome:
    n: int
    ok: int
    makespan: float
    requests: int  # that reached the server (SimServer), plus nginx's refusals
    refused: int  # 429s sent by the limiter (SimServer or nginx)
    hedges: int
    timeline: list[Any]
    first_wave: int = 0  # 429s that came back before the first success


def _port(url: str) -> int:
    return int(url.split(":")[-1].split("/")[0])


async def _map(
    url: str, n: int, limits: Limits | None, retry: RetryPolicy, **map_kw: Any
) -> tuple[fanflow.MapResult[Any], int]:
    llm = fanflow.openai("gpt-sim", base_url=url, api_key="sk-bench", limits=limits, retry=retry)
    if not COLD:
        llm.breaker = Breaker()  # the A/B of decision 0175: no cold start at all
    async with llm:
        result = await fanflow.map(llm, "{input}", [str(i) for i in range(n)], **map_kw)
        hedges = llm.statistics().hedges
    return result, hedges


async def _sim(
    server_kw: dict[str, Any],
    n: int,
    limits: Limits | None,
    retry: RetryPolicy,
    nginx: tuple[str, int, bool] | None = None,
    **map_kw: Any,
) -> Outcome:
    async with SimServer(keep_requests=False, **server_kw) as server:
        if nginx is None:
            result, hedges = await _map(server.url, n, limits, retry, **map_kw)
            refused_at_nginx = 0
        else:
            rate, burst, nodelay = nginx
            async with NginxLimitReq(
                _port(server.url), rate, burst=burst, nodelay=nodelay
            ) as proxy:
                result, hedges = await _map(proxy.url, n, limits, retry, **map_kw)
                refused_at_nginx = proxy.refused()
        stats = server.stats()
    attempts = [a for r in result.records for a in r.attempts]
    first = min((a.end for a in attempts if a.status is fanflow.Status.SUCCEEDED), default=0.0)
    first_wave = sum(1 for a in attempts if isinstance(a.error, RateLimited) and a.end <= first)
    return Outcome(
        n=n,
        ok=result.summary.succeeded,
        makespan=result.makespan,
        requests=stats.requests + refused_at_nginx,
        refused=stats.responses.get(429, 0) + refused_at_nginx,
        hedges=hedges,
        timeline=list(stats.timeline),
        first_wave=first_wave,
    )


def virtual(coro: Callable[[], Awaitable[Outcome]]) -> Outcome:
    loop = looptime.new_event_loop(start=0)
    try:
        return loop.run_until_complete(coro())
    finally:
        loop.close()


def real(coro: Callable[[], Awaitable[Outcome]]) -> Outcome:
    return asyncio.run(coro())


def row(label: str, server: str, out: Outcome, bound: float, extra: str = "") -> None:
    print(
        f"| {label} | {server} | {out.refused} | {out.n - out.ok} | "
        f"{out.requests - out.n} ({(out.requests - out.n) / out.n:.1%}) | "
        f"{out.makespan / bound:.3f} | {extra} |",
        flush=True,
    )


def header(title: str) -> None:
    print(f"\n## {title}\n")
    print("| run | server | 429s | lost | extra calls | makespan / bound | notes |")
    print("|---|---|---|---|---|---|---|")


RETRY = RetryPolicy(attempts=10, seed=1)
COLD = True  # --cold off: handles without the breaker's cold start


def margin(quick: bool, have_nginx: bool) -> None:
    rate = 50
    header(f"1. Margin: Limits(rpm={rate}, period=1) against limiters of {rate}/s")
    n = 500 if quick else 1000
    bucket = {
        "rpm": rate,
        "period": 1.0,
        "latency": 0.2,
        "connect_delay": 0.15,
        "arrival_jitter": 0.02,
        "rate_headers": False,
    }
    for label, limits in (
        ("default (burst 0.5 s, margin 3%)", Limits(rpm=rate, period=1.0)),
        ("old rule (burst 1 s, margin 0)", Limits(rpm=rate, period=1.0, burst=1.0, margin=0.0)),
    ):
        out = virtual(lambda limits=limits: _sim(bucket, n, limits, RETRY))  # type: ignore[misc]
        row(label, "SimServer 1-s bucket + jitter", out, n / rate)
    if not have_nginx:
        return
    n = 150 if quick else 300
    for label, limits, burst, nodelay in (
        ("default", Limits(rpm=rate, period=1.0), rate, True),
        ("default", Limits(rpm=rate, period=1.0), rate, False),
        ("burst=0.25", Limits(rpm=rate, period=1.0, burst=0.25), rate // 2, True),
        ("default", Limits(rpm=rate, period=1.0), rate // 2, True),
        ("burst=0, margin=0.1", Limits(rpm=rate, period=1.0, burst=0, margin=0.1), 0, False),
        ("old rule", Limits(rpm=rate, period=1.0, burst=1.0, margin=0.0), rate, True),
    ):
        kind = f"nginx {rate}r/s burst={burst}{' nodelay' if nodelay else ''}"
        out = real(
            lambda limits=limits, burst=burst, nodelay=nodelay: _sim(  # type: ignore[misc]
                {"latency": 0.05}, n, limits, RETRY, nginx=(f"{rate}r/s", burst, nodelay)
            )
        )
        row(label, kind, out, n / rate)


def defaults(quick: bool, have_nginx: bool) -> None:
    header("2. Defaults: no Limits given, default retry policy (4 attempts)")
    n = 300
    default_retry = RetryPolicy(seed=1)
    out = virtual(lambda: _sim({"latency": 0.1, "max_in_flight": 10}, n, None, default_retry))
    row("no limits", "SimServer 10 in flight, 100 ms", out, math.ceil(n / 10) * 0.1)
    out = virtual(lambda: _sim({"latency": 0.1, "rpm": 50, "period": 1.0}, n, None, default_retry))
    row("no limits", "SimServer 50/s bucket", out, n / 50)
    if have_nginx:
        out = real(
            lambda: _sim({"latency": 0.1}, n, None, default_retry, nginx=("50r/s", 50, True))
        )
        row("no limits", "nginx 50r/s burst=50 nodelay", out, n / 50)


def _throughput(out: Outcome, capacity: float) -> str:
    done = {s.second: s.completed for s in out.timeline}
    refused = {s.second: s.rate_limited for s in out.timeline}
    last = max(done) if done else 0
    reach = next(
        (t for t in range(last) if sum(done.get(t + k, 0) for k in range(3)) >= 2.7 * capacity),
        None,
    )
    steady = [done.get(t, 0) for t in range(10, last - 1)]
    share = sum(steady) / len(steady) / capacity if steady else float("nan")
    late = sum(refused.get(t, 0) for t in range(10, last + 1)) * 60 / max(1, last - 10)
    return f"0.9 C by {reach} s; after 10 s: {share:.3f} C, {late:.1f} 429s/min"


def adaptive(quick: bool, have_nginx: bool) -> None:
    header("3. Limits.adaptive(): capacity unknown to fanflow")
    seconds = 30 if quick else 60
    for latency in (0.05, 0.1, 1.0):
        c = 20 / latency
        n = int(c * seconds)
        out = virtual(
            lambda latency=latency, n=n: _sim(  # type: ignore[misc]
                {"latency": latency, "max_in_flight": 20}, n, Limits.adaptive(), RETRY
            )
        )
        row(
            "adaptive",
            f"SimServer 20 in flight, {latency * 1000:g} ms",
            out,
            n / c,
            _throughput(out, c),
        )
    for latency in (0.05, 0.1, 1.0):
        n = 100 * seconds
        out = virtual(
            lambda latency=latency, n=n: _sim(  # type: ignore[misc]
                {"latency": latency, "rpm": 100, "period": 1.0}, n, Limits.adaptive(), RETRY
            )
        )
        row(
            "adaptive",
            f"SimServer 100/s bucket, {latency * 1000:g} ms",
            out,
            n / 100,
            _throughput(out, 100),
        )
    if have_nginx:
        n = 600 if quick else 1200
        out = real(
            lambda: _sim({"latency": 0.1}, n, Limits.adaptive(), RETRY, nginx=("50r/s", 50, True))
        )
        row("adaptive", "nginx 50r/s burst=50 nodelay, 100 ms", out, n / 50, _throughput(out, 50))


def tails(quick: bool, have_nginx: bool) -> None:
    header("4. Tails: 1,000 items, concurrency 50, timeout 2 s (bound ceil(N/C) x latency)")
    n, c, latency = 1000, 50, 1.0
    faults = {"500": 0.05, "503": 0.02, "hang": 0.01}
    bound = math.ceil(n / c) * latency
    # The tail retry (decision 0151) is always on; its A/B row was dropped with the
    # switch that turned it off (decision 0240).
    for label, retry in (
        ("hedging policy (default)", RetryPolicy(seed=1)),
        ("hedging off", RetryPolicy(seed=1, hedge=False)),
    ):
        for name, kw in (
            ("faults", {"latency": latency, "faults": faults, "seed": 7}),
            ("plain", {"latency": latency, "jitter": 0.1, "seed": 7}),
        ):
            out = virtual(
                lambda kw=kw, retry=retry: _sim(  # type: ignore[misc]
                    kw, n, Limits(), retry, concurrency=c, timeout=2.0
                )
            )
            row(label, f"SimServer {name}", out, bound, f"{out.hedges} hedges")
    if have_nginx and not quick:
        for label, retry in (
            ("hedging policy (default)", RetryPolicy(seed=1)),
            ("hedging off", RetryPolicy(seed=1, hedge=False)),
        ):
            out = real(
                lambda retry=retry: _sim(  # type: ignore[misc]
                    {"latency": 0.5, "faults": faults, "seed": 7},
                    n,
                    Limits(),
                    retry,
                    nginx=("1000r/s", 1000, True),
                    concurrency=c,
                    timeout=2.0,
                )
            )
            row(
                label,
                "nginx (not binding) + SimServer faults, 500 ms",
                out,
                math.ceil(n / c) * 0.5,
                f"{out.hedges} hedges",
            )


def first_wave(quick: bool, have_nginx: bool) -> None:
    header("5. First wave: a new handle, no limits given")
    default_retry = RetryPolicy(seed=1)
    for n, c, latency in ((2000, 100, 0.1), (5000, 1000, 1.0)):
        out = virtual(
            lambda n=n, c=c, latency=latency: _sim(  # type: ignore[misc]
                {"latency": latency}, n, None, default_retry, concurrency=c
            )
        )
        bound = math.ceil(n / c) * latency
        row("no limits", f"SimServer generous, {c} in flight, {latency:g} s", out, bound)
    n = 300
    for label, kw, bound in (
        ("SimServer 10 in flight, 100 ms", {"max_in_flight": 10}, math.ceil(n / 10) * 0.1),
        ("SimServer 50/s bucket, headers", {"rpm": 50, "period": 1.0}, n / 50),
        (
            "SimServer 50/s bucket, no headers",
            {"rpm": 50, "period": 1.0, "rate_headers": False},
            n / 50,
        ),
    ):
        out = virtual(
            lambda kw=kw: _sim({"latency": 0.1, **kw}, n, None, default_retry)  # type: ignore[misc]
        )
        row("no limits", label, out, bound, f"first wave {out.first_wave}")
    if have_nginx:
        out = real(
            lambda: _sim({"latency": 0.1}, n, None, default_retry, nginx=("50r/s", 50, True))
        )
        row(
            "no limits", "nginx 50r/s burst=50 nodelay", out, n / 50, f"first wave {out.first_wave}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", default="margin,defaults,adaptive,tails,first_wave")
    parser.add_argument("--cold", default="on", choices=["on", "off"])
    args = parser.parse_args()
    global COLD
    COLD = args.cold == "on"
    have_nginx = nginx_path() is not None
    load = os.getloadavg()[0]
    print(
        f"# fanflow limits against other servers (cores: {os.cpu_count()}, load {load:.1f}, "
        f"nginx: {'yes' if have_nginx else 'missing'})"
    )
    t0 = time.monotonic()
    for name in args.only.split(","):
        sections = {
            "margin": margin,
            "defaults": defaults,
            "adaptive": adaptive,
            "tails": tails,
            "first_wave": first_wave,
        }
        sections[name](args.quick, have_nginx)
    print(f"\n(took {time.monotonic() - t0:.0f} s of wall time)")


if __name__ == "__main__":
    main()
