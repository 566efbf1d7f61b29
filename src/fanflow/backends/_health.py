"""Deployment health shared by the Ray workers (decision 0273).

Each worker runs its own copy of a router (a new one each batch), whose deployments'
breakers learn only from that copy's calls. :class:`HealthTable` (kept by the broker
actor, for the life of the Ray connection) holds, per router and deployment, until when
each copy has it out of rotation; :class:`BrokerHealth` is
the :class:`fanflow._router.HealthBoard` a worker installs: it reports without waiting
and reads a copy of the table refreshed at most every :data:`REFRESH` seconds, so a
routing choice never waits for the broker (but a new copy's first calls wait for one
read, so a batch does not start with what the last one found out unheard). Times cross
processes as wall-clock times.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["REFRESH", "SYNC_WAIT", "BrokerHealth", "HealthTable", "seconds_out"]

#: The most seconds a worker's copy of the table is old when it is read.
REFRESH = 0.5

#: The longest a new copy's first calls wait to hear the table.
SYNC_WAIT = 2.0


class HealthTable:
    """Per router and deployment: until when (wall clock) each copy has it out."""

    def __init__(self) -> None:
        self._down: dict[str, dict[str, dict[str, float]]] = {}

    def report(self, router: str, name: str, until: float, copy: str) -> None:
        copies = self._down.setdefault(router, {}).setdefault(name, {})
        copies[copy] = max(until, copies.get(copy, until))

    def read(self, router: str) -> dict[str, dict[str, float]]:
        """What is out now: per deployment, each copy's wall-clock end (what is over is
        dropped, so the table stays as small as what is out)."""
        now = time.time()
        found = self._down.get(router, {})
        for name in list(found):
            copies = {c: until for c, until in found[name].items() if until > now}
            if copies:
                found[name] = copies
            else:
                del found[name]
        return {name: dict(copies) for name, copies in found.items()}


def seconds_out(
    table: Mapping[str, Mapping[str, float]], copy: str, now: float
) -> dict[str, float]:
    """From ``table`` (:meth:`HealthTable.read`), the seconds each deployment stays out
    by what copies other than ``copy`` reported."""
    out: dict[str, float] = {}
    for name, copies in table.items():
        until = max((u for c, u in copies.items() if c != copy), default=now)
        if until > now:
            out[name] = until - now
    return out


class BrokerHealth:
    """A worker's health board over the broker actor's :class:`HealthTable`."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self._seen: dict[str, dict[str, dict[str, float]]] = {}  # router -> the table's
        self._asked: dict[str, float] = {}
        self._asking: dict[str, asyncio.Task[None]] = {}  # the reads under way (kept)

    def report(self, router: str, name: str, seconds: float, copy: str) -> None:
        self.broker.report_down.remote(router, name, time.time() + seconds, copy)

    async def sync(self, router: str) -> None:
        task = self._asking.get(router)
        if task is None:
            task = self._ask(router, time.time())
        # At most a couple of seconds: a broker that does not answer delays no call more.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), SYNC_WAIT)

    def down(self, router: str, copy: str) -> Mapping[str, float]:
        now = time.time()
        if now - self._asked.get(router, -math.inf) >= REFRESH and router not in self._asking:
            self._ask(router, now)
        seen = self._seen.get(router)
        return seconds_out(seen, copy, now) if seen else {}

    def _ask(self, router: str, now: float) -> asyncio.Task[None]:
        """Read the broker's table for ``router`` in the background."""
        self._asked[router] = now
        task = asyncio.get_running_loop().create_task(self._refresh(router))
        self._asking[router] = task
        task.add_done_callback(lambda _: self._asking.pop(router, None))
        return task

    async def _refresh(self, router: str) -> None:
        try:
            self._seen[router] = await self.broker.health.remote(router)
        except Exception:  # the broker is gone (the run is ending): keep what was heard
            return
