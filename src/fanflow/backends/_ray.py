"""The Ray backend: shards of a batch on Ray workers, each running fanflow's engine.

The driver (the process that called ``map`` or ``Pool.arun``) pulls items lazily, cuts
them into shards and streams each shard to one of ``workers`` Ray actors
(``FanflowWorker``), two shards per worker at a time so a worker never idles between
shards. A worker runs its shard on its own event loop with the local engine, many calls
in flight (``Crew.run_item`` for ``map``, the chain/flow for ``Pool``), and streams
results back as they finish, batched by whatever finished since the last message (a
Ray streaming generator). The driver puts them in input order and emits the workers'
events to the caller's hooks, so records, statuses, errors, progress and the summary
are those of the local backend.

Limits: every worker's lane for a handle leases its concurrency from one broker actor
(``_limiter.py``), so the limit holds for the whole cluster.

Worker death: when a worker dies (its process killed, its node lost), Ray fails its
shards' streams; the driver re-queues the items of those shards that had not come back
and replaces the worker. Items that came back are never run again; an item that was in
flight when the worker died runs again elsewhere (with ``store=``, a call that had
completed was committed first and is served from the store instead of repeated).

This module is the driver; the worker and broker actors are in ``_worker.py``. Ray
itself is imported only here, and only when a batch asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._budget import Budget, as_budget
from .._durable import Learning, learners
from .._events import INSTALLED, Event, Hook, emit
from .._exceptions import ConfigError, FanflowError, StoreError
from .._llm import LLM
from .._types import Status
from ._base import Deliver, MapSpec, PoolDeliver, PoolMoved, PoolSpec
from ._limiter import spec_of
from ._local import FailFast, Source, crew_size

if TYPE_CHECKING:
    # Type-only: ``RayBackend`` (the settings) imports this module when a batch runs.
    from ._config import RayBackend
from ._worker import (
    BrokerActor,
    FanflowWorker,
    MapWork,
    PoolWork,
    StepMoved,
    StoreSpec,
    Work,
    merged,
)

__all__ = ["RayMapRun", "run_pool_on_ray", "worker_pids"]

INSTALL = "pip install 'fanflow[ray]'"
BROKER_NAME = "fanflow-limits"
_IN_FLIGHT_PER_WORKER = 2  # shards per worker at once: the next one is ready at a tail


def import_ray() -> ModuleType:
    """Ray, or a clear error saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(
            f"backend='ray' needs Ray, which is not installed; install it with: {INSTALL}"
        ) from exc


def _connect(backend: RayBackend) -> ModuleType:
    ray = import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(backend.ray_init or {})
        if backend.address is not None:
            kwargs["address"] = backend.address
        ray.init(**kwargs)
    return ray


# --------------------------------------------------------------------------- driver

# The broker of the cluster this process is connected to, kept referenced for the life
# of the connection: Ray ends an actor, even a named one, once no handle to it is left,
# and the broker must outlive one batch (two batches sharing a handle share its limit).
_BROKER: tuple[str, Any] | None = None


def _connection(ray: ModuleType) -> str:
    """This process's Ray connection: the job, and the node the driver runs on (a new
    ``ray.init`` after ``ray.shutdown`` starts its job ids again, its node is new)."""
    context = ray.get_runtime_context()
    return f"{context.get_job_id()}@{context.get_node_id()}"


def _broker(ray: ModuleType) -> Any:
    global _BROKER
    job = _connection(ray)
    if _BROKER is None or _BROKER[0] != job:
        actor = (
            ray.remote(BrokerActor)
            .options(name=BROKER_NAME, get_if_exists=True, num_cpus=0, max_concurrency=100_000)
            .remote()
        )
        _BROKER = (job, actor)
    return _BROKER[1]


class _Pairs:
    """A source of (index, item) pairs that are already numbered (a pool's inputs)."""

    is_async = False

    def __init__(self, pairs: Sequence[tuple[int, Any]]) -> None:
        self._it = iter(pairs)
        self.seen = 0

    def next_sync(self) -> tuple[int, Any] | None:
        got = next(self._it, None)
        if got is not None:
            self.seen += 1
        return got

    async def next(self) -> tuple[int, Any] | None:  # pragma: no cover - is_async is False
        return self.next_sync()


@dataclass
class _Slot:
    actor: Any
    worker_id: str
    generation: int = 0


# The workers of the cluster this process is connected to, kept between batches, so only a
# driver's first batch pays for starting them (decision 0070). Keyed by
# the Ray connection (a new ray.init gets new workers) and the CPUs per worker. Module state, as
# _BROKER, because it lives as long as the Ray connection, which is process-wide too;
# owner: this module (_workers() makes them, worker_pids() reports them).
_WORKERS: tuple[str, float, list[_Slot]] | None = None


def _workers(ray: ModuleType, broker: Any, n: int, cpus: float) -> list[_Slot]:
    """``n`` workers of this driver (started now if there are fewer)."""
    global _WORKERS
    job = _connection(ray)
    if _WORKERS is None or _WORKERS[0] != job or _WORKERS[1] != cpus:
        _WORKERS = (job, cpus, [])
    pool = _WORKERS[2]
    while len(pool) < n:
        pool.append(_new_slot(ray, broker, cpus))
    return pool[:n]


def _new_slot(ray: ModuleType, broker: Any, cpus: float) -> _Slot:
    worker_id = uuid.uuid4().hex
    actor = (
        ray.remote(FanflowWorker)
        .options(
            # Named, so operators (and tests) can find the workers in the cluster.
            name=f"fanflow-worker-{worker_id}",
            num_cpus=cpus,
            max_concurrency=100_000,
            scheduling_strategy="SPREAD",
        )
        .remote(worker_id, broker)
    )
    return _Slot(actor, worker_id)


def worker_pids() -> list[int]:
    """The process ids of this driver's Ray workers, in the order batches use them."""
    if _WORKERS is None:
        return []
    ray = import_ray()
    return [int(ray.get(slot.actor.pid.remote(), timeout=30)) for slot in _WORKERS[2]]


def _remote_error(ray: ModuleType, exc: BaseException) -> BaseException | None:
    """The user's or fanflow's own error inside a Ray task error (None: not one)."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return None


class _Driver:
    """Streams shards of a batch to Ray workers and hands back what they return."""

    def __init__(
        self,
        backend: RayBackend,
        work: Work,
        items: Any,
        *,
        window: int,
        workers: int | None,
        on_chunk: Callable[
            [list[tuple[int, Any]], list[Event | StepMoved], dict[int, Any]], Awaitable[None]
        ],
        prior: Callable[[int], Any],
        numbered: bool = False,
        budget: Budget | None = None,
    ) -> None:
        self.budget = budget
        self.backend = backend
        self.work = work
        self.source: Source | _Pairs = _Pairs(items) if numbered else Source(items)
        self.window = window
        self.n_workers = workers
        self.on_chunk = on_chunk
        self.prior = prior
        self.retry: deque[list[tuple[int, Any]]] = deque()
        self.exhausted = False
        self.running = 0
        self.changed = asyncio.Event()
        self.restarts = 0
        self.primed = False  # the first item runs alone before any shard (decision 0275)
        self.learnt: list[dict[str, dict[str, float]]] = []  # the workers', at the end

    async def learning(self, store: Any, models: Sequence[LLM]) -> int:
        """:meth:`run` a job's items with capacity learnt once (decisions 0305, 0311):
        the workers' lanes of ``models`` start from their share of what the job's store
        kept, and the store keeps what they learnt together (the local backend's
        :class:`Learning`, over the cluster; a map's handle, a pool's skills')."""
        idents = [ident for _, ident in learners(models)]
        capacity = {}
        for ident in idents:
            found = await Learning.found(store, ident)
            if found is not None:
                capacity[ident] = found
        self.work.capacity = capacity
        try:
            return await self.run()
        finally:
            keep = getattr(store, "keep_capacity", None)
            for ident in idents:
                learnt = merged([got[ident] for got in self.learnt if ident in got])
                if learnt and keep is not None:
                    with contextlib.suppress(StoreError):  # the run's outcome matters more
                        await keep(ident, learnt)

    async def run(self) -> int:
        """Run every item; return how many the source gave."""
        backend = self.backend
        ray = _connect(backend)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = self.n_workers or backend.workers or max(cpus, 1)
        self.max_restarts = (
            backend.max_worker_restarts if backend.max_worker_restarts is not None else 2 * n
        )
        self.shard_size = backend.shard_size or min(max(2 * self.window, 16), 2048)
        self.broker = _broker(ray)
        spec = None
        if self.budget is not None:
            spec = spec_of(self.budget, uuid.uuid4().hex)
            await self.broker.open_budget.remote(spec)
            self.work.budget = spec
        self.work.share = n
        self.work_box = [ray.put(self.work)]
        self.run_id = uuid.uuid4().hex
        self.ray = ray
        slots = _workers(ray, self.broker, n, backend.worker_cpus)
        try:
            if self.primed:
                await self._prime(slots[0])
            async with asyncio.TaskGroup() as tg:
                for slot in slots:
                    for _ in range(_IN_FLIGHT_PER_WORKER):
                        tg.create_task(self._feed(slot))
        except BaseExceptionGroup as group:
            errors = group.exceptions
            first = next((e for e in errors if isinstance(e, FailFast)), errors[0])
            raise first from None
        finally:
            await self._stop(slots)
            if spec is not None and self.budget is not None:
                spent, skipped = await self.broker.close_budget.remote(spec.budget_id)
                # The caller's budget shows what the cluster spent and skipped.
                self.budget.absorb(spent - spec.spent, skipped)
        return self.source.seen

    async def _stop(self, slots: Sequence[_Slot]) -> None:
        ending = [slot.actor.end_run.remote(self.run_id) for slot in slots]
        with contextlib.suppress(Exception):
            ended = await asyncio.wait_for(asyncio.gather(*ending, return_exceptions=True), 30.0)
            self.learnt = [got for got in ended if isinstance(got, dict)]

    async def _prime(self, slot: _Slot) -> None:
        """A primed batch's first item, a shard of its own on one worker, before any
        other shard is sent: its prompt's prefix enters the provider's cache once, and
        every later call, on any worker, reads it (the workers share no gate to release
        the others at the first token, so they wait for the whole call)."""
        source = self.source
        got = await source.next() if source.is_async else source.next_sync()
        if got is None:
            self.exhausted = True
            return
        await self._run_shard(slot, [got])

    async def _next_shard(self) -> list[tuple[int, Any]] | None:
        while True:
            if self.retry:
                return self.retry.popleft()
            if not self.exhausted:
                shard: list[tuple[int, Any]] = []
                source = self.source
                while len(shard) < self.shard_size:
                    got = await source.next() if source.is_async else source.next_sync()
                    if got is None:
                        self.exhausted = True
                        break
                    shard.append(got)
                if shard:
                    return shard
            if self.running == 0:
                return None
            # Shards are still out: one may come back unfinished from a dead worker.
            self.changed.clear()
            await self.changed.wait()

    async def _feed(self, slot: _Slot) -> None:
        while True:
            shard = await self._next_shard()
            if shard is None:
                self.changed.set()
                return
            self.running += 1
            try:
                await self._run_shard(slot, shard)
            finally:
                self.running -= 1
                self.changed.set()

    async def _run_shard(self, slot: _Slot, shard: list[tuple[int, Any]]) -> None:
        ray = self.ray
        generation = slot.generation
        items = dict(shard)
        prior = {i: p for i in items if (p := self.prior(i)) is not None}
        stream = slot.actor.shard.remote(self.run_id, self.work_box, self.window, shard, prior)
        try:
            async for ref in stream:
                results, events = await ref
                await self.on_chunk(results, events, items)
                for index, _ in results:
                    items.pop(index, None)
        except ray.exceptions.RayActorError:
            # The worker died: what it did not return runs again elsewhere.
            remainder = [(i, item) for i, item in shard if i in items]
            if remainder:
                self.retry.appendleft(remainder)
            self._replace(slot, generation)
        except ray.exceptions.RayTaskError as exc:
            cause = _remote_error(ray, exc)
            if cause is None:
                raise
            raise cause from None
        except BaseException:
            with contextlib.suppress(Exception):
                ray.cancel(stream)
            raise

    def _replace(self, slot: _Slot, generation: int) -> None:
        if slot.generation != generation:
            return  # the other shard of this worker already replaced it
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise FanflowError(
                f"{self.restarts} Ray workers died during this batch (more than "
                f"max_worker_restarts={self.max_restarts}); see the Ray logs for why "
                "(out of memory?). Items that finished are in the store if you passed "
                "store= and job=; run again to resume"
            )
        self.broker.forget.remote(slot.worker_id)
        with contextlib.suppress(Exception):
            self.ray.kill(slot.actor)
        new = _new_slot(self.ray, self.broker, self.backend.worker_cpus)
        slot.actor, slot.worker_id = new.actor, new.worker_id
        slot.generation += 1


def _split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal positive shares (fewer if total < parts)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _workers_for(backend: RayBackend, limit: int | None) -> tuple[int | None, int | None]:
    """How many workers, and each one's window, when a per-batch limit must be split."""
    if limit is None:
        return backend.workers, None
    n = backend.workers
    if n is None:
        ray = import_ray()
        if ray.is_initialized():
            n = int(ray.cluster_resources().get("CPU", 1))
        else:
            n = os.cpu_count() or 1
    shares = _split(limit, n)
    # Every worker gets the smallest share, so the sum never exceeds the limit.
    return len(shares), min(shares)


class RayMapRun:
    """A map's items on Ray, each record handed to ``deliver`` as it comes back (the
    Ray counterpart of the local ``Crew``; ``RayBackend.map_run`` makes it)."""

    def __init__(self, backend: RayBackend, spec: MapSpec, deliver: Deliver) -> None:
        options = spec.options
        concurrency, deadline = options.concurrency, options.deadline
        self.budget = as_budget(options.budget)  # one cap, kept by the broker
        _connect(backend)
        self.backend = backend
        self.items = spec.items
        self.size = spec.size
        self.deliver = deliver
        self.deadline = deadline
        # The installed instrumentation (fanflow.otel) hears the workers' events here:
        # their calls' spans join this process's trace, under the pattern run's span.
        self.hooks: tuple[Hook, ...] = (*options.hooks, *INSTALLED)
        self.fail_fast = spec.fail_fast
        self.check_first = spec.check_first
        self.prime = spec.prime
        durable = self.durable = spec.durable
        self.n_workers, per_worker = _workers_for(backend, concurrency)
        self.window = per_worker if per_worker is not None else crew_size(spec.llm, None, None)
        self.workers = self.window  # what ResultStream sizes its queue by
        store = None
        if durable is not None and durable.store is not None:
            # The store goes to the workers by the JobStore protocol: it pickles to
            # something that opens the same store there.
            store = StoreSpec(durable.store, durable.job, durable.only_failed, durable.cache)
        self.work = MapWork(
            spec.llm,
            spec.build,
            options=options,
            deadline_wall=None,
            parse=spec.parse,
            events=bool(self.hooks),
            label=spec.label,
            store=store,
        )
        self.seen = 0

    async def run(self) -> None:
        """Run every item; raise the first failure's error with ``fail_fast``."""
        durable = self.durable
        if self.deadline is not None:
            self.work.deadline_wall = time.time() + self.deadline

        async def on_chunk(
            results: list[tuple[int, Any]], events: list[Event | StepMoved], items: dict[int, Any]
        ) -> None:
            for event in events:
                if not isinstance(event, StepMoved):  # map has no steps; for the type
                    emit(self.hooks, event)
            for index, record in results:
                if durable is not None:
                    durable.emit(record, items.get(index))
                delivered = self.deliver(record)
                if delivered is not None:
                    await delivered
                if self.fail_fast and record.status is not Status.SUCCEEDED:
                    raise FailFast(record)

        def prior(index: int) -> Any:
            return durable.prior.get(index) if durable is not None else None

        driver = _Driver(
            self.backend,
            self.work,
            self.items,
            window=self.window,
            workers=self.n_workers,
            on_chunk=on_chunk,
            prior=prior,
            budget=self.budget,
        )
        check = self.check_first
        if check is not None and isinstance(driver.source, Source):
            # As the local backend does: a field none of the first items has is a
            # mistake in the template, found before any shard goes to a worker.
            check.check(await driver.source.peek(check.count))
        prime = self.prime
        if prime is not None and isinstance(driver.source, Source):
            driver.primed = bool(prime.check(await driver.source.peek(prime.count)))
        try:
            if durable is None:
                await driver.run()
            elif durable.store is None or durable.job is None:
                await durable.around(driver.run, self.size)
            else:
                store, llm = durable.store, self.work.llm
                await durable.around(lambda: driver.learning(store, (llm,)), self.size)
        except FailFast as stop:
            if stop.record.error is not None:
                raise stop.record.error from None
            raise  # pragma: no cover - a non-succeeded record always has an error
        finally:
            self.seen = driver.source.seen


async def run_pool_on_ray(
    backend: RayBackend, spec: PoolSpec, deliver: PoolDeliver, on_step: PoolMoved
) -> None:
    """Run a pool's inputs on Ray; ``await deliver(index, FlowResult)`` as each ends;
    ``on_step(index, step, started)`` as the workers move inputs through steps."""
    _connect(backend)
    workers, per_worker = _workers_for(backend, spec.max_flows)
    assert per_worker is not None
    hooks: tuple[Hook, ...] = (*spec.hooks, *INSTALLED)

    async def on_chunk(
        results: list[tuple[int, Any]], events: list[Event | StepMoved], items: dict[int, Any]
    ) -> None:
        for event in events:
            if isinstance(event, StepMoved):
                on_step(event.index, event.step, event.started)
            else:
                emit(hooks, event)
        for index, result in results:
            await deliver(index, result)

    shared = spec.shared
    deadline_wall = None
    if shared is not None and shared.deadline is not None:
        # The run's deadline on this loop's clock, as wall-clock time for the workers.
        left = shared.deadline - asyncio.get_running_loop().time()
        deadline_wall = time.time() + left
    driver = _Driver(
        backend,
        PoolWork(
            spec.runner,
            bool(hooks),
            spec.store,
            spec.cache,
            spec.prices,
            options=None if shared is None else shared.timing(),
            deadline_wall=deadline_wall,
            learn=spec.learn,
        ),
        list(spec.todo),
        window=per_worker,
        workers=workers,
        on_chunk=on_chunk,
        prior=lambda index: True if spec.replay(index) else None,
        numbered=True,
        budget=spec.budget,
    )
    if spec.store is not None and spec.learn:
        await driver.learning(spec.store, spec.learn)  # a job's (decision 0311)
    else:
        await driver.run()
