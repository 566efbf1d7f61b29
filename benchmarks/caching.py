"""Prompt caching under parallelism (issue 25): input cost and makespan of a map whose
items share a long prefix.

    python benchmarks/caching.py [--items 1000] [--prefix 3000] [--concurrency 100]

SimServer runs on the benchmark's own virtual-time loop (looptime), so the makespans
printed are the loop's seconds, exact and free of machine load. Each call takes 1 s
(the prefill ends at 1 s too: SimServer's ``latency``); the items share a system prompt
of ``--prefix`` SimServer tokens. Per API, three runs against a fresh server:

- no caching (a server without a prompt cache; Anthropic without ``cache_control``):
  the baseline every ratio is against;
- caching without priming (``prime=False``): the whole first wave misses;
- caching with priming (the default): one call first, then the rest.

The handle is warmed by one call first: a new handle holds all but 16 calls until its
first answer (the breaker's cold start), which by itself would prime with 16 calls.
Prices are the built-in table's: gpt-5-mini (cached input 10% of input) and
claude-sonnet-4-5 (cache read 0.1x, 5-minute write 1.25x). Input cost is the records'
usage priced by fanflow; the prefix share is input cost less the items' own text.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from typing import Any

import looptime

import fanflow
from fanflow._pricing import price_of
from fanflow.testing import SimServer

LATENCY = 1.0
MODELS = {"openai": "gpt-5-mini", "anthropic": "claude-sonnet-4-5"}


def _handle(api: str, server: SimServer, caching: bool) -> Any:
    if api == "openai":
        return fanflow.openai(MODELS[api], base_url=server.url, api_key="sk-bench", max_tokens=5)
    return fanflow.anthropic(
        MODELS[api], base_url=server.root, api_key="sk-bench", max_tokens=5, cache_control=caching
    )


async def run(api: str, caching: bool, prime: bool | None, args: argparse.Namespace) -> Any:
    loop = asyncio.get_running_loop()
    system = " ".join(f"r{i % 1000:03d}" for i in range(args.prefix))
    items = [f"item {i}" for i in range(args.items)]
    server = SimServer(latency=LATENCY, prompt_cache=caching, keep_requests=False)
    async with server, _handle(api, server, caching) as llm:
        await fanflow.call(llm, "warm up")
        server.reset()
        t0 = loop.time()
        result = await fanflow.map(
            llm, "{input}", items, system=system, concurrency=args.concurrency, prime=prime
        )
        makespan = loop.time() - t0
        stats = server.stats()
    return {"makespan": makespan, **costs(api, result.summary, stats, args)}


def costs(api: str, s: Any, stats: Any, args: argparse.Namespace) -> dict[str, Any]:
    """A run's input cost, the prefix's share of it, its misses and writes (``s``: the
    batch's summary; ``stats``: the server's)."""
    assert s.succeeded == args.items, s
    u = s.usage
    price = price_of(MODELS[api])
    assert price is not None
    cached, written = u.cached_input_tokens, u.cache_write_input_tokens
    input_cost = price.cost(u.input_tokens, 0, cached=cached, written=written)
    own = price.cost(u.input_tokens - args.items * args.prefix, 0)  # the items' own text
    return {
        "input": input_cost,
        "prefix": input_cost - own,
        "misses": stats.cache_misses,
        "writes": written // args.prefix,
        "saved": s.cache_saved or 0.0,
    }


#: The three cases of each API: (label, the server caches, prime=).
CASES = (
    ("no caching", False, False),
    ("caching, no priming", True, False),
    ("caching, priming", True, None),
)


def arguments(doc: str, items: int, prefix: int) -> tuple[argparse.Namespace, float]:
    """The command line (--items, --prefix, --concurrency), and the makespan's bound."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--items", type=int, default=items)
    parser.add_argument("--prefix", type=int, default=prefix, help="shared tokens")
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    return args, math.ceil(args.items / args.concurrency) * LATENCY


def main() -> None:
    args, bound = arguments(__doc__, 1000, 3000)
    print(
        f"{args.items:,} items, {args.prefix:,}-token shared system prompt, "
        f"{args.concurrency} in flight, {LATENCY:g} s per call (bound {bound:g} s)"
    )
    print(f"{'API':<10} {'case':<26} {'input $':>9} {'prefix $':>9} {'vs none':>8} "
          f"{'misses':>7} {'writes':>7} {'makespan':>9} {'vs bound':>9} {'CPU s':>6}")  # fmt: skip
    for api in ("openai", "anthropic"):
        base: dict[str, Any] | None = None
        for label, caching, prime in CASES:
            loop = looptime.new_event_loop(start=0.0)
            cpu = time.process_time()
            try:
                out = loop.run_until_complete(run(api, caching, prime, args))
            finally:
                loop.close()
            cpu = time.process_time() - cpu
            base = base or out
            print(
                f"{api:<10} {label:<26} {out['input']:>9.4f} {out['prefix']:>9.4f} "
                f"{out['prefix'] / base['prefix']:>8.3f} {out['misses']:>7} {out['writes']:>7} "
                f"{out['makespan']:>8.1f}s {out['makespan'] / bound:>9.2f} {cpu:>6.1f}"
            )


if __name__ == "__main__":
    main()
