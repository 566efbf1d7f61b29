"""Issue 23: copies of one router in several processes (Ray workers) share their
deployments' health (decision 0273). Here the copies run one after the other in this
process, each with the board of a different "worker" over one ``HealthTable`` (what the
broker actor keeps); the Ray path itself is in test_router_ray.py. A SimServer answering
401 is the broken deployment and counts what it was sent; virtual time.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator, Mapping

import pytest

import fanflow
from fanflow._router import set_health_board
from fanflow.backends._health import HealthTable
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

ITEMS = [f"row {i}" for i in range(40)]


class Board:
    """One worker's board over a shared table (``BrokerHealth`` without the actor)."""

    def __init__(self, table: HealthTable, worker: str) -> None:
        self.table, self.worker = table, worker

    def report(self, router: str, name: str, seconds: float) -> None:
        self.table.report(router, name, time.time() + seconds, self.worker)

    def down(self, router: str) -> Mapping[str, float]:
        now = time.time()
        return {n: until - now for n, until in self.table.read(router, self.worker).items()}


@pytest.fixture(autouse=True)
def no_board() -> Iterator[None]:
    yield
    set_health_board(None)


async def test_a_deployment_one_copy_took_out_is_not_sent_to_by_the_others() -> None:
    table = HealthTable()
    async with SimServer(api_key="sk-right-key-000") as a, SimServer(reply="ok") as b:
        llm = fanflow.router(
            fanflow.openai("m", base_url=a.url, api_key="sk-wrong-key-111"),
            fanflow.openai("m", base_url=b.url, api_key="sk-b"),
            names=["broken", "fine"],
        )
        first, second, alone = (pickle.loads(pickle.dumps(llm)) for _ in range(3))
        set_health_board(Board(table, "w1"))
        one = await fanflow.map(first, "{input}", ITEMS)
        after_first = a.stats().requests
        set_health_board(Board(table, "w2"))
        two = await fanflow.map(second, "{input}", ITEMS)
        after_second = a.stats().requests
        set_health_board(None)  # a copy that hears nothing learns it again on its own
        three = await fanflow.map(alone, "{input}", ITEMS)
        after_alone = a.stats().requests
        for copy in (first, second, alone):
            await copy.aclose()
    assert one.ok
    assert two.ok
    assert three.ok
    assert after_first > 0
    assert after_second == after_first  # the second copy sent it nothing
    assert after_alone > after_second
    assert dict(two.summary.answered_by) == {"fine": 40}


def test_the_table_forgets_what_is_over_and_never_tells_a_worker_its_own() -> None:
    table = HealthTable()
    now = time.time()
    table.report("r", "east", now + 60, "w1")
    table.report("r", "west", now - 1, "w1")
    table.report("r", "east", now + 30, "w2")  # an earlier end does not shorten it
    assert table.read("r", "w2") == {"east": now + 60}
    assert table.read("r", "w1") == {}
    assert table.read("other", "w2") == {}
