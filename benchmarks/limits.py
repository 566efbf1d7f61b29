"""Limits benchmark: known limits used to the full without a 429; unknown ones found.

Run: ``python benchmarks/limits.py`` (about a minute; ``--quick`` for a smoke run).

A simulated server in this process (real event loop, real time) enforces its limits the
way hosted APIs do, over short periods: a token bucket per limit holding one second of
budget ("6,000 RPM may be enforced as 100 per second"), answering 429 with Retry-After
(the time until the bucket has room) when a request does not fit. Every number below is
counted *at the server*. Tokens are charged when the request arrives: its prompt plus
``max_tokens`` (as OpenAI counts), and each reply uses all of ``max_tokens``.

Scenarios (N calls, 100 ms latency, concurrency 100, as in issue 4):

1. RPM-bound, limits known: ``Limits(rpm=...)`` vs a naive semaphore + retry-on-429 loop.
   Target: makespan / (N / rate) <= 1.05 with zero 429s.
2. TPM-bound, limits known: ``Limits(tpm=...)`` vs the same naive loop. Same target.
3. Limits unknown, server capacity C requests/s: ``Limits.adaptive()`` vs the naive loop.
   Target: throughput after warm-up >= 0.9 C; 429s counted.

``--only headers`` (issue 28 section 5, S2/S3): the same on the wire against a server that
enforces 6,000 RPM (or a TPM) as a one-second bucket and says what is left in its
rate-limit headers; the bound is the server's full bucket at once, then its rate.

Then the same claims on the wire: ``fanflow.openai`` against ``fanflow.testing.SimServer``
over loopback HTTP, on a virtual-time loop (looptime), so minutes of traffic take a second
and the CPU of the machine does not blur the ratios. SimServer's buckets hold a whole
minute of budget (a burst of ``rpm`` at once), so a naive loop gets a head start there;
``Limits(burst=60)`` tells fanflow a server allows that.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time

import looptime

import fanflow
from fanflow import Limits, Request, Response, RetryPolicy, Usage
from fanflow._tokens import request_tokens
from fanflow.testing import SimServer as WireServer

LATENCY = 0.1
CONCURRENCY = 100
MAX_TOKENS = 50


class _Bucket:
    """The server's token bucket: ``rate`` per second, one second of capacity."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = self.rate  # one second of budget
        self.level = self.capacity
        self.at = time.monotonic()

    def take(self, now: float, cost: float) -> float:
        """Take ``cost`` if it fits and return 0; else return seconds until it would."""
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        if cost <= self.level + 1e-9:
            self.level -= cost
            return 0.0
        return (cost - self.level) / self.rate


class SimServer(fanflow.BaseLLM):
    """An in-process server with RPM/TPM buckets, 100 ms latency, and 429s."""

    def __init__(self, *, rpm: float | None, tpm: float | None, limits: Limits) -> None:
        super().__init__(model="sim", limits=limits, retry=RetryPolicy(attempts=100, seed=1))
        self.requests = _Bucket(rpm) if rpm else None
        self.tokens = _Bucket(tpm) if tpm else None
        self.accepted = 0
        self.rejected = 0
        self.done: list[float] = []

    async def complete(self, request: Request) -> Response:
        now = time.monotonic()
        input_tokens, output_tokens = request_tokens(request)
        wait = 0.0
        # Check both before taking from either, as a server answers one 429 for both.
        for bucket, cost in ((self.requests, 1), (self.tokens, input_tokens + output_tokens)):
            if bucket is not None:
                bucket.level = min(bucket.capacity, bucket.level + (now - bucket.at) * bucket.rate)
                bucket.at = now
                if cost > bucket.level + 1e-9:
                    wait = max(wait, (cost - bucket.level) / bucket.rate)
        if wait > 0:
            self.rejected += 1
            # Retry-After in whole milliseconds, as OpenAI's retry-after-ms header.
            retry_after = math.ceil(wait * 1000) / 1000
            raise fanflow.errors.RateLimited("429", status_code=429, retry_after=retry_after)
        for bucket, cost in ((self.requests, 1), (self.tokens, input_tokens + output_tokens)):
            if bucket is not None:
                bucket.level -= cost
        self.accepted += 1
        await asyncio.sleep(LATENCY)
        self.done.append(time.monotonic())
        return Response("x " * output_tokens, usage=Usage(input_tokens, output_tokens))


async def fanflow_run(server: SimServer, n: int) -> float:
    start = time.monotonic()
    result = await fanflow.map(
        server, "item {input}", [str(i) for i in range(n)], max_tokens=MAX_TOKENS
    )
    assert result.ok, result.errors
    return time.monotonic() - start


async def naive_run(server: SimServer, n: int) -> float:
    """A semaphore and a retry loop that sleeps the Retry-After on every 429."""
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        request = Request.of(f"item {i}", max_tokens=MAX_TOKENS, model="sim")
        async with semaphore:
            while True:
                try:
                    await server.complete(request)
                    return
                except fanflow.errors.RateLimited as exc:
                    await asyncio.sleep(exc.retry_after or 1.0)

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.monotonic() - start


def tokens_per_call() -> int:
    return sum(request_tokens(Request.of("item 100", max_tokens=MAX_TOKENS)))


def known(name: str, n: int, rpm: float | None, tpm: float | None) -> None:
    rate = rpm / 60 if rpm else (tpm or 0) / 60 / tokens_per_call()  # calls per second
    bound = n / rate
    # The exact bound: the server's full bucket (1 s of budget) goes at once, the rest
    # at the rate, and the last call still takes its latency.
    exact = (n - rate) / rate + LATENCY
    print(
        f"\n## {name}: N={n}, server rpm={rpm}, tpm={tpm}\n"
        f"lower bound N/rate = {bound:.2f} s; exact bound (N - burst)/rate + latency = "
        f"{exact:.2f} s"
    )
    for label, limits, runner in (
        ("naive semaphore + retry", Limits(), naive_run),
        ("fanflow Limits(rpm/tpm)", Limits(concurrency=CONCURRENCY, rpm=rpm, tpm=tpm), None),
    ):
        server = SimServer(rpm=rpm, tpm=tpm, limits=limits)
        if runner is None:
            makespan = asyncio.run(fanflow_run(server, n))
        else:
            makespan = asyncio.run(runner(server, n))
        print(
            f"{label:26s} makespan {makespan:6.2f} s  makespan/(N/rate) {makespan / bound:5.3f}"
            f"  makespan/exact {makespan / exact:5.3f}  429s at server {server.rejected:5d}"
        )


def unknown(n: int, capacity_rps: float) -> None:
    rpm = capacity_rps * 60
    print(f"\n## limits unknown: N={n}, server capacity C = {capacity_rps:g} calls/s")
    for label, limits, runner in (
        ("naive semaphore + retry", Limits(), naive_run),
        ("fanflow Limits.adaptive()", Limits.adaptive(), None),
    ):
        server = SimServer(rpm=rpm, tpm=None, limits=limits)
        if runner is None:
            makespan = asyncio.run(fanflow_run(server, n))
        else:
            makespan = asyncio.run(runner(server, n))
        done = server.done
        warm = len(done) // 4
        throughput = (len(done) - warm) / (done[-1] - done[warm])
        print(
            f"{label:26s} makespan {makespan:6.2f} s  throughput after warm-up "
            f"{throughput:6.1f}/s = {throughput / capacity_rps:5.3f} C  "
            f"429s at server {server.rejected:5d}"
        )


# --------------------------------------------------------------------------- on the wire


async def _wire_run(
    server_kw: dict[str, float], limits: Limits | None, n: int, max_tokens: int | None
) -> tuple[float, dict[int, int], list[int]]:
    """Run N calls through fanflow (``limits``) or a naive loop (None) against SimServer."""
    loop = asyncio.get_running_loop()
    async with WireServer(reply="a b c d e", keep_requests=False, **server_kw) as server:  # type: ignore[arg-type]
        llm = fanflow.openai(
            "gpt-sim",
            base_url=server.url,
            api_key="sk-bench",
            limits=limits,
            retry=RetryPolicy(attempts=100, seed=1),
        )
        async with llm:
            start = loop.time()
            items = [str(i) for i in range(n)]
            if limits is not None:
                result = await fanflow.map(llm, "item {input}", items, max_tokens=max_tokens)
                assert result.ok, result.errors
            else:
                semaphore = asyncio.Semaphore(CONCURRENCY)

                async def one(item: str) -> None:
                    request = llm.prepare(Request.of(f"item {item}", max_tokens=max_tokens))
                    async with semaphore:
                        while True:
                            try:
                                await llm.complete(request)
                                return
                            except fanflow.errors.RateLimited as exc:
                                await asyncio.sleep(exc.retry_after or 1.0)

                await asyncio.gather(*(one(i) for i in items))
            makespan = loop.time() - start
        stats = server.stats()
    completed = [s.completed for s in stats.timeline]
    return makespan, dict(stats.responses), completed


def _virtual_wire(
    server_kw: dict[str, float], limits: Limits | None, n: int, max_tokens: int | None
) -> tuple[float, dict[int, int], list[int]]:
    """:func:`_wire_run` on a fresh virtual-time loop."""
    loop = looptime.new_event_loop(start=0)
    try:
        return loop.run_until_complete(_wire_run(server_kw, limits, n, max_tokens))
    finally:
        loop.close()


def wire(quick: bool) -> None:
    n = 600 if quick else 1200
    per_call = 7  # SimServer counts words: "item 17" (2) + "a b c d e" (5)
    print("\n# On the wire: fanflow.openai -> SimServer over loopback HTTP, virtual time")
    scenarios: list[tuple[str, dict[str, float], float, list[tuple[str, Limits | None]]]] = [
        (
            "RPM-bound (rpm=600)",
            {"rpm": 600, "latency": LATENCY},
            10.0,
            [
                ("naive semaphore + retry", None),
                ("fanflow Limits(rpm=600)", Limits(concurrency=CONCURRENCY, rpm=600)),
                ("fanflow ... burst=60", Limits(concurrency=CONCURRENCY, rpm=600, burst=60)),
            ],
        ),
        (
            f"TPM-bound (tpm={600 * per_call})",
            {"tpm": 600 * per_call, "latency": LATENCY},
            10.0,
            [
                ("naive semaphore + retry", None),
                ("fanflow Limits(tpm=...)", Limits(concurrency=CONCURRENCY, tpm=600 * per_call)),
            ],
        ),
    ]
    for title, server_kw, rate, runs in scenarios:
        print(f"\n## {title}: N={n}, lower bound N/rate = {n / rate:.1f} s")
        for label, limits in runs:
            makespan, responses, _ = _virtual_wire(server_kw, limits, n, 5)
            print(
                f"{label:26s} makespan {makespan:7.1f} s  makespan/(N/rate) "
                f"{makespan / (n / rate):5.3f}  429s at server {responses.get(429, 0):6d}"
            )
    capacity = 30.0
    print(f"\n## limits unknown: SimServer max_in_flight=30, 1 s latency (C = 30/s), N={n * 2}")
    for label, limits in (
        ("naive semaphore + retry", None),
        ("fanflow adaptive", Limits.adaptive()),
    ):
        loop = looptime.new_event_loop(start=0)
        try:
            makespan, responses, completed = loop.run_until_complete(
                _wire_run({"max_in_flight": 30, "latency": 1.0}, limits, n * 2, None)
            )
        finally:
            loop.close()
        steady = completed[len(completed) // 4 : -2]
        throughput = sum(steady) / len(steady)
        print(
            f"{label:26s} makespan {makespan:7.1f} s  throughput after warm-up "
            f"{throughput:5.1f}/s = {throughput / capacity:5.3f} C  "
            f"429s at server {responses.get(429, 0):6d}"
        )


def headers(quick: bool) -> None:
    """Limits known, and a server whose headers say exactly what is left (decision 0176)."""
    n = 600
    per_call = 7  # SimServer counts words: "item 17" (2) + "a b c d e" (5)
    print("\n# With rate-limit headers: a one-second bucket at the server, virtual time")
    for title, server_kw, per_second, runs in (
        (
            "S2: 6,000 RPM as 100/s",
            {"rpm": 100, "period": 1.0, "latency": LATENCY},
            100.0,
            [
                ("naive semaphore + retry", None),
                ("fanflow Limits(rpm=6000)", Limits(concurrency=CONCURRENCY, rpm=6000)),
            ],
        ),
        (
            f"S3: {100 * per_call * 60:,} TPM as {100 * per_call}/s",
            {"tpm": 100 * per_call, "period": 1.0, "latency": LATENCY},
            100.0,
            [  # (the naive loop's storm of 429s does not end in minutes here)
                (
                    "fanflow Limits(tpm=...)",
                    Limits(concurrency=CONCURRENCY, tpm=100 * per_call * 60),
                ),
            ],
        ),
    ):
        bound = (n - per_second) / per_second + LATENCY
        print(f"\n## {title}: N={n}, bound (N - bucket) / rate + latency = {bound:.2f} s")
        for label, limits in runs:
            makespan, responses, _ = _virtual_wire(server_kw, limits, n, 5)
            print(
                f"{label:26s} makespan {makespan:7.2f} s  bound/makespan "
                f"{bound / makespan:5.3f}  429s at server {responses.get(429, 0):6d}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--only", choices=["headers"], help="run one section")
    args = parser.parse_args()
    if args.only == "headers":
        headers(args.quick)
        return
    n = 200 if args.quick else 600
    print(f"# fanflow limits benchmark (cores: {os.cpu_count()}, latency {LATENCY * 1000:g} ms)")
    known("RPM-bound, limits known", n, rpm=6000, tpm=None)
    per_call = tokens_per_call()
    known("TPM-bound, limits known", n, rpm=None, tpm=6000 * per_call)
    unknown(n * 2, capacity_rps=100)
    wire(args.quick)


if __name__ == "__main__":
    main()
