"""SimServer set up for the crash tests, and the child scripts that run jobs against it.

The server answers the first ``answer_first`` requests it receives and holds every later
one (SimServer's ``hang`` fault) until :meth:`Holding.release`, so a test can kill the
client while calls are in flight at a known point, without timing guesses. SimServer's
per-prompt counts (``prompt_requests``, ``prompt_completed``) are the judge of "no
completed call was repeated".
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanflow.testing import SimRequest, SimServer, SimStats


class Holding:
    """A SimServer (in a background thread) that holds requests after the first few."""

    def __init__(self, answer_first: int) -> None:
        self.answer_first = answer_first
        self.holding = True
        self.server = SimServer(fault_on=self._hold)

    def _hold(self, request: SimRequest) -> str | None:
        # Runs on the server's loop; the flag is flipped from the test's thread.
        return "hang" if self.holding and request.index >= self.answer_first else None

    def release(self) -> None:
        """Answer every request from now on (held ones stay held until their client goes)."""
        self.holding = False

    @property
    def url(self) -> str:
        return self.server.url

    def stats(self) -> SimStats:
        return self.server.stats()


@pytest.fixture
def holding() -> Iterator[type[Holding]]:
    opened: list[Holding] = []

    def make(answer_first: int) -> Holding:
        h = Holding(answer_first)
        h.server.__enter__()
        opened.append(h)
        return h

    yield make  # type: ignore[misc]
    for h in opened:
        h.server.__exit__(None, None, None)


CHILD = r"""
import asyncio, json, sys
import fanflow

url, store_path, out_path, job = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
n = int(sys.argv[4])


async def main():
    llm = fanflow.openai("sim-model", base_url=url)
    items = [{"id": f"id-{i}", "input": f"prompt {i}"} for i in range(n)]
    async with llm:
        with fanflow.Store(store_path) as store:
            result = await fanflow.map(
                llm, "{input}", items, concurrency=6, store=store, job=job, sink=out_path,
            )
    print(json.dumps({"succeeded": result.summary.succeeded, "calls": result.summary.calls}))


asyncio.run(main())
"""

FAN_OUT_CHILD = r"""
import asyncio, json, sys
import fanflow

url, store_path, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
areas = [f"area {i}" for i in range(workers)]


async def main():
    llm = fanflow.openai("sim-model", base_url=url)
    async with llm:
        with fanflow.Store(store_path) as store:
            result = await fanflow.fan_out(
                llm, "plan the launch", focus=areas, aggregate="concat",
                min_success=1, store=store, job="launch",
            )
    print(json.dumps({"cached": [w.record.cached for w in result.workers]}))


asyncio.run(main())
"""


def _script(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, str(path)]


@pytest.fixture
def child_script(tmp_path: Path) -> list[str]:
    return _script(tmp_path, "child.py", CHILD)


@pytest.fixture
def fan_out_script(tmp_path: Path) -> list[str]:
    return _script(tmp_path, "fan_out_child.py", FAN_OUT_CHILD)
