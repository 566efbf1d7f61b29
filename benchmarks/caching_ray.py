"""Prompt caching on the Ray backend (issue 25, decision 0275): input cost, misses and
makespan of a map whose items share a long prefix, run on Ray workers.

    python benchmarks/caching_ray.py [--items 300] [--prefix 2000] [--concurrency 100]

Real time: Ray's workers are processes, so SimServer answers from its own thread (1 s
per call, the prefill ending at 1 s) and the makespans are wall-clock seconds on a
loaded machine (compare them within one run). A local 2-CPU Ray cluster, 2 workers,
the concurrency split between them. Per API, the three cases of benchmarks/caching.py
(no caching, caching without priming, caching with priming), each against a fresh
server. The cluster and its workers are started by an untimed map first. The workers'
handles are new each run: each holds all but 16 calls until its first answer (the
breaker's cold start), which costs an unprimed run about one call of makespan too.
"""

from __future__ import annotations

import os
import sys
import time

from caching import CASES, LATENCY, _handle, arguments, costs

import fanflow
from fanflow.backends import RayBackend
from fanflow.testing import SimServer


def main() -> None:
    args, bound = arguments(__doc__, 300, 2000)
    print(f"{args.items:,} items, {args.prefix:,}-token shared system prompt, "
          f"{args.concurrency} in flight on 2 Ray workers (bound {bound:g} s)")  # fmt: skip
    print(f"{'API':<10} {'case':<22} {'prefix $':>9} {'vs none':>8} {'misses':>7} "
          f"{'writes':>7} {'makespan':>9}")  # fmt: skip
    system = " ".join(f"r{i % 1000:03d}" for i in range(args.prefix))
    items = [f"item {i}" for i in range(args.items)]
    # Ray starts with the first map; this folder's ray.py must not be found as Ray.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    cluster = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
    backend = RayBackend(workers=2, ray_init=cluster)
    with SimServer(latency=0.01) as server:  # start Ray and its workers, untimed
        warm = fanflow.openai("m", base_url=server.url, api_key="sk-bench")
        fanflow.run(fanflow.map(warm, "{input}", ["a", "b"], backend=backend))
    for api in ("openai", "anthropic"):
        base = None
        for label, caching, prime in CASES:
            with SimServer(latency=LATENCY, prompt_cache=caching, keep_requests=False) as server:
                llm = _handle(api, server, caching)
                t0 = time.perf_counter()
                result = fanflow.run(
                    fanflow.map(
                        llm, "{input}", items, system=system, concurrency=args.concurrency,
                        prime=prime, backend=backend,
                    )
                )  # fmt: skip
                makespan = time.perf_counter() - t0
                out = costs(api, result.summary, server.stats(), args)
            base = base or out
            print(
                f"{api:<10} {label:<22} {out['prefix']:>9.4f} "
                f"{out['prefix'] / base['prefix']:>8.3f} {out['misses']:>7} "
                f"{out['writes']:>7} {makespan:>8.1f}s"
            )


if __name__ == "__main__":
    main()
