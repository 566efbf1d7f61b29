"""A driver that ends its Ray connection and connects again (``ray.shutdown()`` then
``ray.init()``) gets new workers and a new broker: the new cluster's first job has the
same job id as the old one's, so the job id alone does not tell them apart. Real time
(Ray workers are processes), two local 1-CPU clusters one after the other.
"""

from __future__ import annotations

import pytest

import fanflow
from fanflow.backends import RayBackend
from fanflow.testing import SimServer

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(180)


def test_a_second_ray_connection_gets_workers_of_its_own() -> None:
    items = [f"item {i}" for i in range(6)]
    with SimServer(latency=0.01, reply="ok") as server:
        llm = fanflow.openai("m", base_url=server.url, api_key="sk-x")
        for _ in range(2):
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
            try:
                result = fanflow.run(
                    fanflow.map(llm, "{input}", items, backend=RayBackend(workers=1))
                )
            finally:
                ray.shutdown()
            assert result.ok, result.errors
            assert result.outputs == ["ok"] * len(items)
