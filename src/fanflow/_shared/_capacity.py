"""Capacity learnt once: what a shared lane learns of the server, kept in its store.

A new process would otherwise find the server's capacity again with a burst of 429s.
So a lane of ``Limits(shared=URL)`` publishes what it has learnt (:meth:`Lane.learnt`:
the adaptive level, the rate-limit headers' refill rate) under its limit identity. A
new lane of that identity reads it before its first call and starts from it
(:meth:`Lane.start_from`). Decision 0282.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any, Protocol

from .._exceptions import ConfigError
from .._leases import GlobalLane, GrantQueue, SlotLease
from .._limits import Limits, Permit
from .._log import log

__all__ = ["KEEP", "LearningLane"]

# What was learnt is forgotten after this many seconds without a new publication: a
# server's capacity changes (a new tier), and the adaptive controller probes upward.
KEEP = 600.0
# A lane publishes at most this often (seconds), when what it learnt has changed by
# more than _CHANGE (a share of a value; the headers' refill rate is estimated anew
# with each reply); decision 0282.
_EVERY = 1.0
_CHANGE = 0.1


class CapacityStore(Protocol):
    def publish_capacity(self, ident: str, learnt: dict[str, float], keep: float) -> None: ...

    async def read_capacity(self, ident: str) -> tuple[dict[str, float], float] | None: ...


def _changed(old: dict[str, float], new: dict[str, float]) -> bool:
    """Whether ``new`` says more than ``old``: another kind of knowledge, or a value
    changed by more than :data:`_CHANGE` of it (the level creeps up with successes)."""
    if old.keys() != new.keys():
        return True
    return any(abs(new[k] - v) > _CHANGE * abs(v) for k, v in old.items() if math.isfinite(v))


class LearningLane(GlobalLane):
    """A shared lane that starts from the capacity its store keeps, and keeps there
    what it learns.

    Args:
        limits, lease, grants: as for :class:`GlobalLane`.
        store: the shared store.
        ident: the limit identity.
    """

    __slots__ = ("_ident", "_published", "_published_at", "_reading", "_ready", "_store")

    def __init__(
        self,
        limits: Limits,
        lease: SlotLease | None,
        grants: GrantQueue | None,
        store: CapacityStore,
        ident: str,
    ) -> None:
        super().__init__(limits, lease, grants)
        self._store, self._ident = store, ident
        self._ready = False  # what the store kept has been read
        self._reading: asyncio.Task[None] | None = None
        self._published: dict[str, float] = {}
        self._published_at = -math.inf

    def try_acquire(self) -> bool:
        return self._ready and super().try_acquire()

    async def acquire(self, tokens: tuple[int, int] | None = None) -> Permit | None:
        if not self._ready:
            if self._reading is None:
                self._reading = asyncio.get_running_loop().create_task(self._read())
            await asyncio.shield(self._reading)
        return await super().acquire(tokens)

    async def _read(self) -> None:
        try:
            found = await self._store.read_capacity(self._ident)
            if found is not None:
                self.start_from(*found)
        except ConfigError:
            pass  # the store is unreachable: the calls say so themselves
        except Exception as exc:  # a bad record, say: start from nothing, as before
            log.warning("shared limits: the capacity kept for this key was not read: %s", exc)
        finally:
            self._ready = True

    def finish(self, *args: Any, **kwargs: Any) -> None:
        """As :meth:`Lane.finish`, then publish what was learnt, if it changed."""
        super().finish(*args, **kwargs)
        now = time.monotonic()
        if now - self._published_at < _EVERY:
            return
        learnt = self.learnt()
        if learnt and _changed(self._published, learnt):
            self._published, self._published_at = learnt, now
            with contextlib.suppress(ConfigError):
                self._store.publish_capacity(self._ident, learnt, KEEP)
