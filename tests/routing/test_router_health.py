"""Issue 23: copies of one router in several processes (Ray workers, a new copy each
batch) share their deployments' health (decision 0273). Here unpickled copies run one
after the other in this process, with a board over one ``HealthTable`` (what the broker
actor keeps); the Ray path itself is in test_router_ray.py. A SimServer answering
401 is the broken deployment and counts what it was sent; virtual time.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator, Mapping

import pytest

import fanflow
from fanflow._router import set_health_board
from fanflow.backends._health import HealthTable, seconds_out
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

ITEMS = [f"row {i}" for i in range(40)]


class Board:
    """A board over a table in this process (``BrokerHealth`` without the actor)."""

    def __init__(self, table: HealthTable) -> None:
        self.table = table

    def report(self, router: str, name: str, seconds: float, copy: str) -> None:
        self.table.report(router, name, time.time() + seconds, copy)

    async def sync(self, router: str) -> None:
        return None

    def down(self, router: str, copy: str) -> Mapping[str, float]:
        return seconds_out(self.table.read(router), copy, time.time())


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
        set_health_board(Board(table))
        one = await fanflow.map(first, "{input}", ITEMS)
        after_first = a.stats().requests
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


def test_the_table_forgets_what_is_over_and_never_tells_a_copy_its_own() -> None:
    table = HealthTable()
    now = time.time()
    table.report("r", "east", now + 60, "copy 1")
    table.report("r", "east", now + 30, "copy 2")
    table.report("r", "west", now - 1, "copy 1")  # over already
    read = table.read("r")
    assert read == {"east": {"copy 1": now + 60, "copy 2": now + 30}}
    assert seconds_out(read, "copy 3", now) == {"east": 60}
    assert seconds_out(read, "copy 1", now) == {"east": 30}  # the other copy's
    assert seconds_out(read, "copy 2", now) == {"east": 60}
    assert table.read("other") == {}


def test_each_unpickled_router_is_a_copy_of_its_own() -> None:
    llm = fanflow.router(
        fanflow.openai("m", base_url="http://127.0.0.1:9/v1", api_key="sk-a"),
        fanflow.openai("m", base_url="http://127.0.0.1:10/v1", api_key="sk-b"),
    )
    one, two = pickle.loads(pickle.dumps(llm)), pickle.loads(pickle.dumps(llm))
    assert len({llm.copy, one.copy, two.copy}) == 3
    assert one.limit_id == two.limit_id == llm.limit_id  # one router to the table
