"""Limits shared by every process that names one store: ``Limits(shared=URL)``.

A handle's limits belong to its API key, so every handle, in any process, that names the
same store and the same limit identity (endpoint, model and a fingerprint of the key,
see :func:`identity`) draws from one budget of requests, tokens and concurrency slots.

The lane is the Ray backend's :class:`~fanflow.backends._limiter.GlobalLane`: the same
worker side (rate grants booked in batches by a :class:`GrantQueue`, concurrency slots
leased and reused by a :class:`SlotLease`), with the store in the broker's place
(decision 0200). The store books on its own clock and answers "send in ``delay``
seconds", so the processes' clocks need not agree.

Concurrency slots are leases with a time to live (``?ttl=``, 10 s by default): a process
renews the slots it holds every third of it, so the slots of a process that was killed
come back within the TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from .._exceptions import ConfigError
from .._leases import GrantQueue, SlotLease, lease_time
from .._limits import Lane, Limits
from .._log import log
from ._capacity import LearningLane
from ._local import ALONE_AFTER, RETRY, LocalShare
from ._url import StoreURL, parse_url, redact

if TYPE_CHECKING:
    from .._llm import BaseLLM

__all__ = ["Store", "identity", "open_store", "shared_lane"]

_RATES = ("rpm", "tpm", "input_tpm", "output_tpm")

# How many leases ahead a process books its grants (more than the broker's one: a store
# is further away; decision 0200).
_AHEAD = 5

# A process declares its limits again at least this often (seconds), so it knows how
# many processes share the identity if the store is lost (decision 0214).
_DECLARE_EVERY = 1.0


class Store(Protocol):
    """Where the shared bookings live (SQLite or Redis); every time is the store's."""

    shown: str
    round_trips: int

    async def declare(
        self, ident: str, holder: str, body: dict[str, Any], ttl: float
    ) -> dict[str, tuple[float, dict[str, Any]]]: ...

    async def grant_many(
        self, ident: str, caps: list[float], window: float, costs: list[list[int]], horizon: float
    ) -> tuple[float, list[tuple[float, int]]]: ...

    def settle(self, ident: str, settles: list[tuple[int, list[int]]]) -> None: ...

    async def try_slot(self, ident: str, holder: str, limit: int, ttl: float) -> int: ...

    def release(self, ident: str, slot: int) -> None: ...

    async def renew(self, ident: str, slots: list[int], ttl: float) -> None: ...

    async def adopt(self, ident: str, old: list[int], count: int, ttl: float) -> list[int]: ...

    def publish_capacity(self, ident: str, learnt: dict[str, float], keep: float) -> None: ...

    async def read_capacity(self, ident: str) -> tuple[dict[str, float], float] | None: ...


# SQLite stores serve every loop of the process (their calls run on a thread of their
# own); a Redis client belongs to the loop it was made on.
_SQLITE: dict[str, Store] = {}
_REDIS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Store]] = (
    weakref.WeakKeyDictionary()
)


def open_store(url: StoreURL, shown: str) -> Store:
    """The store ``url`` names, for the running loop (made on first use)."""
    if url.kind == "sqlite":
        store = _SQLITE.get(url.target)
        if store is None:
            from ._sqlite import SQLiteStore

            store = _SQLITE[url.target] = SQLiteStore(url.target, shown)
        return store
    per_loop = _REDIS.setdefault(asyncio.get_running_loop(), {})
    store = per_loop.get(url.target)
    if store is None:
        from ._redis import RedisStore

        store = per_loop[url.target] = RedisStore(url.target, shown)
    return store


def identity(handle: BaseLLM, model: str | None = None) -> tuple[str, str]:
    """(the limit identity, a label for messages) of a handle's calls to ``model`` (None:
    the handle's own): a hash of its endpoint, the model and a fingerprint of its API
    key. The key itself is never stored: only a SHA-256 of it goes into the hash, which
    is all the store sees."""
    ident = dict(handle.cache_identity())
    if model is not None:
        ident["model"] = model
    secret = getattr(handle, "_secret", None)
    if secret is not None:
        key = secret.reveal().encode()
        ident["key"] = hashlib.sha256(b"fanflow limit identity\0" + key).hexdigest()
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode())
    label = f"{ident.get('endpoint') or ident.get('protocol')} model={ident.get('model')}"
    return digest.hexdigest()[:32], label


def _body(limits: Limits) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(limits, name) for name in _RATES}
    body["concurrency"] = limits.concurrency
    body["period"] = limits.period
    return body


def _show(body: dict[str, Any]) -> str:
    parts = [f"{k}={body[k]:g}" for k in _RATES if body.get(k) is not None]
    if body.get("concurrency") is not None:
        parts.append(f"concurrency={body['concurrency']}")
    parts.append(f"period={body['period']:g}")
    return ", ".join(parts)


def stricter(mine: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The stricter of two declarations of one identity, in ``mine``'s period."""
    out = dict(mine)
    scale = mine["period"] / other["period"]
    for name in _RATES:
        theirs = other.get(name)
        if theirs is not None:
            theirs *= scale
            out[name] = theirs if out[name] is None else min(out[name], theirs)
    theirs = other.get("concurrency")
    if theirs is not None:
        out["concurrency"] = (
            theirs if out["concurrency"] is None else min(out["concurrency"], theirs)
        )
    return out


class SharedMeter:
    """One lane's way to the store for one identity: the ``grant_many``/``settle`` of
    its :class:`GrantQueue` and the ``ask``/``give_back`` of its :class:`SlotLease`."""

    def __init__(self, store: Store, ident: str, label: str, limits: Limits, ttl: float) -> None:
        self.store, self.ident, self.label, self.ttl = store, ident, label, ttl
        self.limits = limits
        self.holder = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.mine = _body(limits)
        self.effective = self.mine
        self.window = limits.period + lease_time(limits.period)
        # Grants are booked up to this far ahead (a send must still go within a lease of
        # its booked time): evenly spaced bookings, a few per message.
        self.horizon = _AHEAD * lease_time(limits.period)
        self.held: list[int] = []
        self._trying = 0  # slots being asked of the store now
        self._booked: dict[int, list[int]] = {}  # grant -> its costs, until settled
        self._settles: list[tuple[int, list[int]]] = []
        self._declared_at = -float("inf")
        self._warned: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._reached = False  # the store answered once: losing it later is an outage
        self._local: LocalShare | None = None  # while the store is unreachable
        self._most = 1  # the most processes seen declared under the identity
        # How many live processes declared under the identity before this one, and when
        # this process last declared (its rank holds for a TTL from then; decision 0309).
        self._rank = 0
        self._ranked_at = -float("inf")
        self._alone_warned = False
        self._lost_warned = False
        self._joining = asyncio.Lock()
        # After a rejoin, at most this many slots until then (others may still be local).
        self._capped: tuple[float, int] = (-float("inf"), 0)

    async def _ready(self) -> None:
        """Declare this process's limits (again, when half the TTL has passed) and take
        the stricter of every live declaration of the identity."""
        # At least once a second: a local share divides by the processes seen (_most).
        if time.monotonic() - self._declared_at < min(self.ttl / 2, _DECLARE_EVERY):
            return
        asked = self._declared_at = time.monotonic()
        declared = await self.store.declare(self.ident, self.holder, self.mine, self.ttl)
        mine = (declared[self.holder][0] if self.holder in declared else -float("inf"), self.holder)
        others = [body for name, (_, body) in declared.items() if name != self.holder]
        self._rank = sum(1 for name, (t, _) in declared.items() if (t, name) < mine)
        self._ranked_at = asked
        self._most = max(self._most, 1 + len(others))
        effective = self.mine
        for other in others:
            effective = stricter(effective, other)
            shown = _show(other)
            if effective != self.mine and shown not in self._warned:
                self._warned.add(shown)
                log.warning(
                    "shared limits for %s at %s: this process declares %s, another "
                    "declares %s; the stricter of each holds: %s",
                    self.label,
                    self.store.shown,
                    _show(self.mine),
                    shown,
                    _show(effective),
                )
        self.effective = effective

    def _caps(self) -> list[float]:
        margin = 1.0 - self.limits.margin
        out = []
        for name in _RATES:
            value = self.effective.get(name)
            out.append(float("inf") if value is None else value * margin)
        return out

    def _full(self, costs: list[int]) -> list[int]:
        """A lane's costs (one per rate limit set) as one per rate limit of _RATES."""
        it = iter(costs)
        return [next(it) if getattr(self.limits, name) is not None else 0 for name in _RATES]

    async def grant_many(
        self, costs: list[list[int]]
    ) -> list[tuple[float, int]] | tuple[float, list[tuple[float, int]]]:
        """(the store's now, the answers): the queue places each grant on this loop's
        clock by a :class:`~fanflow._leases.FarClock`. Booked at a local share: the
        answers alone, on this process's clock."""
        full = [self._full(c) for c in costs]
        local = self._local
        if local is not None and time.monotonic() < local.retry_at:
            return local.book(full, self.horizon, time.monotonic())
        try:
            await self._rejoin()
            now, answers = await self.store.grant_many(
                self.ident, self._caps(), self.window, full, self.horizon
            )
        except ConfigError:
            if not self._reached:
                raise  # never reached: the calls fail, nothing goes unmetered
            return self._go_local().book(full, self.horizon, time.monotonic())
        self._reached = True
        for (_, grant), cost in zip(answers, full, strict=True):
            if grant:
                self._booked[grant] = cost
        return now, answers

    async def _rejoin(self) -> None:
        """Declare (again, if the store was lost: it may have restarted empty), and book
        at the store what was sent and is held locally: the store knew nothing of it."""
        local = self._local
        if local is None:
            await self._ready()
            return
        async with self._joining:
            if self._local is not local:
                return  # another call rejoined meanwhile
            self._declared_at = -float("inf")
            await self._ready()
            recent = local.recent(time.monotonic())
            if any(recent):
                # One reservation at the store's now. It fits within two windows: one for
                # the store's own bookings to leave it, one for the spacing after them.
                caps, window = self._caps(), self.window
                await self.store.grant_many(self.ident, caps, window, [recent], 3 * window)
            if self.held:
                await self._adopt()
            self._local = None
            # The others may still be local for up to a TTL (they notice at a renewal).
            now = time.monotonic()
            self._capped = (now + self.ttl, local.slots_at(now))
        log.info(
            "shared limits for %s: %s is back; booking there again", self.label, self.store.shown
        )

    async def _adopt(self) -> None:
        """Take the slots held here at the store, so that its count includes them (the
        local ones, and those of a store that may have restarted empty)."""
        old = list(self.held)
        ids = await self.store.adopt(self.ident, [s for s in old if s > 0], len(old), self.ttl)
        n = len(self.held)  # calls may have ended meanwhile
        self.held[:] = ids[:n] + self.held[len(ids) :]
        for slot in ids[n:]:
            self.store.release(self.ident, slot)

    def _cap(self) -> int | None:
        """The most slots this process may hold now (None: as the store counts): its
        share while the store is lost, and for one TTL after it is back."""
        if self._local is not None:
            return self._local.slots_at(time.monotonic())
        until, slots = self._capped
        return slots if time.monotonic() < until else None

    def over(self) -> bool:
        """Whether this process holds more slots than it may now: it sheds the excess
        as its calls end (its :class:`SlotLease` gives them back)."""
        cap = self._cap()
        return cap is not None and len(self.held) > cap

    def _go_local(self) -> LocalShare:
        """Go on at a local share of the limits (one warning per process)."""
        now = time.monotonic()
        if self._local is not None:
            self._local.retry_at = now + RETRY
            return self._local
        concurrency = self.effective["concurrency"]
        # A declaration older than a TTL may have lapsed at the store: then a later
        # process may rank before this one, and this one's rank is unknown (0309).
        rank = self._rank if now - self._ranked_at < self.ttl else None
        until, capped = self._capped
        self._local = LocalShare(
            self._caps(),
            self._most,
            self.window,
            None if concurrency is None else int(concurrency),
            now,
            self.ttl,
            rank,
            capped if now < until else None,
        )
        if not self._lost_warned:
            self._lost_warned = True
            log.warning(
                "shared limits for %s: cannot reach Redis at %s; going on at a local share "
                "(1/%d of each limit, the most processes seen) until it is back",
                self.label,
                self.store.shown,
                self._most,
            )
        return self._local

    def settle(self, grant: int, costs: list[int] | None) -> None:
        """Correct a grant to ``costs`` (None: keep it). A call that cost what it booked
        (every call, under an rpm alone) costs no round trip; the others are sent
        together, once per turn of the event loop."""
        booked = self._booked.pop(grant, None)
        if costs is None or booked is None:
            return
        full = self._full(costs)
        if full == booked:
            return
        if not self._settles:
            asyncio.get_running_loop().call_soon(self._flush)
        self._settles.append((grant, full))

    def _flush(self) -> None:
        settles, self._settles = self._settles, []
        self.store.settle(self.ident, settles)

    async def ask(self) -> bool:
        """Wait for one concurrency slot (polling the store, 2 ms doubling to 50 ms; a
        slot of the local share while the store is unreachable)."""
        wait = 0.002
        while True:
            local = self._local
            if local is None or time.monotonic() >= local.retry_at:
                try:
                    await self._rejoin()
                    limit, cap, slot = int(self.effective["concurrency"]), self._cap(), 0
                    if cap is None or len(self.held) + self._trying < cap:
                        slot = await self._try_slot(limit)
                except ConfigError:
                    if not self._reached:
                        raise
                    local = self._go_local()
                else:
                    self._reached, local = True, None
                    if slot:
                        self._hold(slot)
                        return True
            if local is not None and local.may_take(len(self.held), time.monotonic()):
                if not local.slots and not self._alone_warned:
                    self._alone_warned = True
                    log.warning(
                        "shared limits for %s: %s is still unreachable after %gs; this "
                        "process, ranked past the concurrency, had no slot of the local "
                        "share and now takes one (the limit may be exceeded)",
                        self.label,
                        self.store.shown,
                        ALONE_AFTER,
                    )
                self._hold(-1)  # held: the store's slots too
                return True
            await asyncio.sleep(wait * (0.5 + random.random()))  # jitter: pollers spread out
            wait = min(0.05, wait * 2)

    async def _try_slot(self, limit: int) -> int:
        self._trying += 1
        try:
            return await self.store.try_slot(self.ident, self.holder, limit, self.ttl)
        finally:
            self._trying -= 1

    def _hold(self, slot: int) -> None:
        self.held.append(slot)
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._renew())

    def give_back(self) -> None:
        if not self.held:
            return
        slot = self.held.pop()
        if slot > 0:
            self.store.release(self.ident, slot)

    async def _renew(self) -> None:
        """Renew the held slots every third of the TTL while any are held, and declare
        at least once a second: a process that only reuses its slots asks the store
        nothing else, yet must count the processes and learn of an outage (its renewal
        fails). A local process tries to rejoin here too."""
        renewed = time.monotonic()
        try:
            while self.held:
                await asyncio.sleep(min(self.ttl / 3, _DECLARE_EVERY))
                local = self._local
                if local is not None and time.monotonic() < local.retry_at:
                    continue
                try:
                    await self._rejoin()
                    slots = [slot for slot in self.held if slot > 0]
                    if slots and (local is not None or time.monotonic() - renewed >= self.ttl / 3):
                        renewed = time.monotonic()
                        await self.store.renew(self.ident, slots, self.ttl)
                except ConfigError:
                    self._go_local()  # the store's slots expire there
        except asyncio.CancelledError:
            # The loop is ending (nothing else cancels this). Give the slots still held
            # back: a spare one waits LINGER in its SlotLease, and that timer will not
            # fire. A Redis store sends them before the loop closes (decision 0281).
            for slot in self.held:
                if slot > 0:
                    self.store.release(self.ident, slot)
            self.held.clear()
            raise
        finally:
            self._heartbeat = None


def shared_lane(handle: BaseLLM, model: str | None = None, limits: Limits | None = None) -> Lane:
    """A lane of ``handle``'s calls to ``model`` (None: the handle's own) whose
    ``limits`` (default: the handle's) are booked in the store they name."""
    limits = handle.limits if limits is None else limits
    assert limits.shared is not None
    url = parse_url(limits.shared)
    ident, label = identity(handle, model)
    meter = SharedMeter(open_store(url, redact(limits.shared)), ident, label, limits, url.ttl)
    lease = None
    if limits.concurrency is not None:
        lease = SlotLease(limits.concurrency, meter.ask, meter.give_back, meter.over)
    grants = None
    if limits.rated:
        grants = GrantQueue(meter.grant_many, meter.settle, meter.horizon)
    return LearningLane(limits, lease, grants, meter.store, ident)  # decision 0282
