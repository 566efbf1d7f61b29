"""Deployment health shared by the Ray workers (decision 0273).

Each worker runs its own copy of a router, whose deployments' breakers learn only from
that worker's calls. :class:`HealthTable` (kept by the broker actor) holds, per router
and deployment, until when some worker has it out of rotation; :class:`BrokerHealth` is
the :class:`fanflow._router.HealthBoard` a worker installs: it reports without waiting
and reads a copy of the table refreshed at most every :data:`REFRESH` seconds, so a
routing choice never waits for the broker. Times cross processes as wall-clock times.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["REFRESH", "BrokerHealth", "HealthTable"]

#: The most seconds a worker's copy of the table is old when it is read.
REFRESH = 0.5


class HealthTable:
    """Per router and deployment: until when (wall clock) it is out, and who said so."""

    def __init__(self) -> None:
        self._down: dict[str, dict[str, tuple[float, str]]] = {}

    def report(self, router: str, name: str, until: float, worker: str) -> None:
        deployments = self._down.setdefault(router, {})
        had = deployments.get(name)
        if had is None or until > had[0]:
            deployments[name] = (until, worker)

    def read(self, router: str, worker: str) -> dict[str, float]:
        """The deployments other workers have out now, each with its wall-clock end."""
        now = time.time()
        found = self._down.get(router, {})
        for name in [n for n, (until, _) in found.items() if until <= now]:
            del found[name]  # over: the table stays as small as what is out
        return {name: until for name, (until, who) in found.items() if who != worker}


class BrokerHealth:
    """A worker's health board over the broker actor's :class:`HealthTable`."""

    def __init__(self, broker: Any, worker: str) -> None:
        self.broker = broker
        self.worker = worker
        self._seen: dict[str, dict[str, float]] = {}  # router -> name -> wall-clock end
        self._asked: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def report(self, router: str, name: str, seconds: float) -> None:
        self.broker.report_down.remote(router, name, time.time() + seconds, self.worker)

    def down(self, router: str) -> Mapping[str, float]:
        now = time.time()
        if now - self._asked.get(router, -math.inf) >= REFRESH:
            self._asked[router] = now
            task = asyncio.get_running_loop().create_task(self._refresh(router))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        seen = self._seen.get(router)
        if not seen:
            return {}
        return {name: until - now for name, until in seen.items() if until > now}

    async def _refresh(self, router: str) -> None:
        try:
            self._seen[router] = await self.broker.health.remote(router, self.worker)
        except Exception:  # the broker is gone (the run is ending): keep what was heard
            return
