"""Issue 23 against a limiter fanflow did not write: a router spreads one job over a
SimServer reached directly and another behind nginx's ``limit_req``, each handle given
its deployment's rate. Real time (nginx is a real process): 120 items at 2 x 40/s.
The makespan's ratio to the combined bound is in benchmarks/router.py (--nginx).
"""

from __future__ import annotations

import pytest

import fanflow
from fanflow import Limits
from fanflow.testing import SimServer

from .._helpers import require_nginx
from .._nginx import NginxLimitReq

require_nginx()  # skipped without nginx, an error in CI (.ci/run installs it)

RATE = 40


@pytest.mark.timeout(60)
async def test_spread_over_nginx_and_a_direct_server_draws_no_429() -> None:
    items = [f"row {i}" for i in range(120)]
    limits = Limits(rpm=RATE, period=1.0)
    async with (
        SimServer(latency=0.05, rpm=RATE, period=1.0, keep_requests=False) as direct,
        SimServer(latency=0.05, keep_requests=False) as upstream,
    ):
        port = int(upstream.url.split(":")[-1].split("/")[0])
        with NginxLimitReq(port, f"{RATE}r/s", burst=RATE, nodelay=True) as nginx:
            llm = fanflow.router(
                fanflow.openai("m", base_url=direct.url, api_key="k", limits=limits),
                fanflow.openai("m", base_url=nginx.url, api_key="k", limits=limits),
                names=["direct", "nginx"],
            )
            async with llm:
                result = await fanflow.map(llm, "{input}", items)
            refused = nginx.refused()
        assert result.ok, result.errors
        assert refused == 0
        assert direct.stats().responses == {200: direct.stats().requests}
        served = dict(result.summary.answered_by)
    assert set(served) == {"direct", "nginx"}
    assert min(served.values()) >= 30
