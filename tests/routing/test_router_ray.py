"""Issue 23: a router runs on the Ray backend: its deployments travel to the workers
inside it and each books its own limits there (the cluster-wide limiter, keyed by the
deployment). Real time (Ray workers are processes), a local 2-CPU cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import fanflow
from fanflow import Limits
from fanflow.backends import RayBackend
from fanflow.testing import SimServer

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_a_router_spreads_a_ray_batch_over_both_deployments() -> None:
    items = [f"item {i}" for i in range(40)]
    no_hedge = fanflow.RetryPolicy(hedge=False)
    with SimServer(latency=0.01, reply="ok") as a, SimServer(latency=0.01, reply="ok") as b:
        llm = fanflow.router(
            fanflow.openai("m", base_url=a.url, api_key="sk-a", retry=no_hedge),
            fanflow.openai(
                "m", base_url=b.url, api_key="sk-b", retry=no_hedge, limits=Limits(concurrency=4)
            ),
        )
        result = fanflow.run(
            fanflow.map(llm, "{input}", items, backend=RayBackend(workers=2, shard_size=10))
        )
        served = (a.stats().requests, b.stats().requests)
        urls = {a.url, b.url}
    assert result.ok
    assert sum(served) == len(items)
    assert min(served) > 0
    assert {r.deployment.base_url for r in result.records if r.deployment} == urls


def test_a_deployment_a_worker_takes_out_is_on_the_brokers_board() -> None:
    from fanflow.backends._ray import _broker

    items = [f"item {i}" for i in range(40)]
    with (
        SimServer(latency=0.01, api_key="sk-right-key-000") as a,
        SimServer(latency=0.01, reply="ok") as b,
    ):
        llm = fanflow.router(
            fanflow.openai("m", base_url=a.url, api_key="sk-wrong-key-111"),
            fanflow.openai("m", base_url=b.url, api_key="sk-b"),
            names=["broken", "fine"],
        )
        result = fanflow.run(
            fanflow.map(llm, "{input}", items, backend=RayBackend(workers=2, shard_size=10))
        )
    assert result.ok
    assert dict(result.summary.answered_by) == {"fine": 40}
    # What the workers' copies told the broker.
    down = ray.get(_broker(ray).health.remote(llm.limit_id))
    assert set(down) == {"broken"}
