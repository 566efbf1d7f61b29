"""Deployment health on Ray (issue 23, decision 0273): the requests a broken deployment
of a router is sent over consecutive Ray batches, by 2 workers.

    PYTHONPATH=<src> python benchmarks/router_health.py [--items 200] [--batches 3]

Two SimServers on loopback: one refuses the key (401 to everything), one answers. The
same router runs ``--batches`` maps one after another on a local 2-CPU Ray cluster
(each batch's workers unpickle a fresh copy of it, whose breakers know nothing yet).
Printed: the requests the broken one received in each batch. Run it with the source of
the branch and of main (``PYTHONPATH``) in the same session to compare: without shared
health each batch pays every worker's first wave again; with it, a batch that starts
while the broker's table has the deployment out sends it none until its probe is due.
Real time; the counts, not the times, are the result.
"""

from __future__ import annotations

import argparse
import os
import sys

# benchmarks/ray.py is beside this file: drop the folder from the path so "import ray"
# finds Ray.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import ray  # noqa: E402

import fanflow  # noqa: E402
from fanflow.backends import RayBackend  # noqa: E402
from fanflow.testing import SimServer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    items = [f"item {i}" for i in range(args.items)]
    # The first server expects another key than its handle sends: 401 to everything.
    bad, good = SimServer(latency=0.05, api_key="sk-right-key-000"), SimServer(latency=0.05)
    keys = {"broken": "sk-wrong-key-111", "fine": "sk-b"}
    try:
        with bad, good:
            urls = {"broken": bad.url, "fine": good.url}
            handles = [fanflow.openai("m", base_url=urls[n], api_key=keys[n]) for n in keys]
            llm = fanflow.router(*handles, names=list(keys))
            seen = 0
            print("| batch | requests to the broken one | items answered |")
            print("|---|---|---|")
            for n in range(1, args.batches + 1):
                backend = RayBackend(workers=2, shard_size=20)
                result = fanflow.run(fanflow.map(llm, "{input}", items, backend=backend))
                now = bad.stats().requests
                print(f"| {n} | {now - seen} | {result.summary.succeeded} |")
                seen = now
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
