"""The Ray backend: shards of a batch on Ray workers, each running fanflow's engine.

The driver (the process that called ``map`` or ``Pool.arun``) pulls items lazily, cuts
them into shards and streams each shard to one of ``workers`` Ray actors
(``FanflowWorker``), two shards per worker at a time so a worker never idles between
shards. A worker runs its shard on its own event loop with the local engine, many calls
in flight (``_Batch.run_item`` for ``map``, the chain/flow for ``Pool``), and streams
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

Ray itself is imported only here, and only when a batch asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .._budget import Budget
from .._engine import make_options
from .._events import Event, Hook, emit
from .._exceptions import ConfigError, FanflowError
from .._limits import Gate, Lane
from .._llm import LLM, BaseLLM, set_lane_factory
from .._retry import RetryPolicy
from .._types import BatchResult, CallRecord, Response, Status
from ..patterns._jobs import Durability
from ..patterns._map import _Batch, _FailFast, _Source, _window
from ..patterns._prompt import Prompt
from ..store import Store
from ._config import RayBackend, resolve_backend
from ._limiter import (
    BudgetSpec,
    GlobalLane,
    GrantQueue,
    LimitBroker,
    RemoteBudget,
    SlotLease,
    lease_time,
    needs_broker,
    spec_of,
)

__all__ = ["RayMapBatch", "map_on_ray", "run_pool_on_ray", "worker_pids"]

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


# --------------------------------------------------------------------------- actors


class _BrokerActor:
    """The :class:`LimitBroker` of the cluster, as a Ray actor."""

    def __init__(self) -> None:
        self.broker = LimitBroker()

    async def acquire(self, handle_id: str, limits: Any, worker: str) -> bool:
        return await self.broker.acquire(handle_id, limits, worker)

    async def release(self, handle_id: str, worker: str) -> None:
        self.broker.release(handle_id, worker)

    async def grant_many(
        self, handle_id: str, limits: Any, costs: list[list[int]]
    ) -> list[tuple[float, int]]:
        now = asyncio.get_running_loop().time()
        return self.broker.grant_many(handle_id, limits, costs, now)

    async def settle(self, handle_id: str, grant: int, costs: list[int] | None) -> None:
        self.broker.settle(handle_id, grant, costs)

    async def forget(self, worker: str) -> int:
        return self.broker.forget(worker)

    async def open_budget(self, spec: BudgetSpec) -> None:
        self.broker.open_budget(spec)

    async def reserve_budget(self, budget_id: str, amount: float, who: str) -> float:
        return await self.broker.reserve_budget(budget_id, amount, who)

    async def settle_budget(self, budget_id: str, reserved: float, actual: float) -> None:
        self.broker.settle_budget(budget_id, reserved, actual)

    async def close_budget(self, budget_id: str) -> tuple[float, int]:
        return self.broker.close_budget(budget_id)

    async def statistics(self, handle_id: str) -> Any:
        return self.broker.statistics(handle_id)


# The shard a worker's task is running, so its events go back with its results.
_OUT: contextvars.ContextVar[_Out] = contextvars.ContextVar("fanflow_ray_out")


@dataclass
class _Out:
    results: list[tuple[int, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def pending(self) -> bool:
        return bool(self.results or self.events)

    def take(self) -> tuple[list[tuple[int, Any]], list[Event]]:
        chunk = (self.results, self.events)
        self.results, self.events = [], []
        return chunk


def _collect(event: Event) -> None:
    out = _OUT.get(None)
    if out is not None:
        out.events.append(event)


class _Run:
    """One batch's state in a worker process (a worker serves batch after batch)."""

    def __init__(self, work_box: list[Any], window: int, broker: Any) -> None:
        self.window = window
        self.broker = broker
        self.gate = Gate(window)
        self.leases: list[SlotLease] = []
        self.grants: list[GrantQueue] = []
        self.ready = asyncio.ensure_future(self._load(work_box))

    async def _load(self, work_box: list[Any]) -> _Work:
        work: _Work = await work_box[0]
        await work.start(self.window, self._budget(work.budget))
        return work

    def _budget(self, spec: BudgetSpec | None) -> Budget | None:
        if spec is None:
            return None
        broker, budget_id = self.broker, spec.budget_id

        async def reserve(amount: float, who: str) -> float:
            reserved: float = await broker.reserve_budget.remote(budget_id, amount, who)
            return reserved

        def settle(reserved: float, actual: float) -> None:
            broker.settle_budget.remote(budget_id, reserved, actual)

        return RemoteBudget(spec, reserve, settle)

    async def close(self) -> None:
        for lease in self.leases:
            await lease.aclose()
        for grants in self.grants:
            await grants.aclose()
        if not self.ready.done():
            self.ready.cancel()
        with contextlib.suppress(BaseException):
            await (await self.ready).close()


# The batch a worker's task belongs to, so the lanes it makes are closed with it.
_RUN: contextvars.ContextVar[_Run] = contextvars.ContextVar("fanflow_ray_run")


class FanflowWorker:
    """One worker process: runs shards of batches with the local engine.

    A driver keeps its workers for the life of its Ray connection, so only its first
    batch pays for starting them (a second or two per process).
    """

    def __init__(self, worker_id: str, broker: Any) -> None:
        self.worker_id = worker_id
        self.broker = broker
        self.runs: dict[str, _Run] = {}
        set_lane_factory(self._lane)

    def _lane(self, handle: BaseLLM) -> Lane:
        limits = handle.limits
        if not needs_broker(limits):
            return Lane(limits)
        broker, worker, handle_id = self.broker, self.worker_id, handle.limit_id

        async def ask() -> bool:
            granted: bool = await broker.acquire.remote(handle_id, limits, worker)
            return granted

        def give_back() -> None:
            broker.release.remote(handle_id, worker)

        lease = None
        if limits.concurrency is not None:
            lease = SlotLease(limits.concurrency, ask, give_back)
            run = _RUN.get(None)
            if run is not None:
                run.leases.append(lease)
        grants = None
        if limits.rated:

            async def grant_many(costs: list[list[int]]) -> list[tuple[float, int]]:
                answers: list[tuple[float, int]] = await broker.grant_many.remote(
                    handle_id, limits, costs
                )
                return answers

            def settle(grant: int, costs: list[int] | None) -> None:
                broker.settle.remote(handle_id, grant, costs)

            grants = GrantQueue(grant_many, settle, lease_time(limits.period))
            run = _RUN.get(None)
            if run is not None:
                run.grants.append(grants)
        return GlobalLane(limits, lease, grants)

    async def pid(self) -> int:
        return os.getpid()

    async def shard(
        self,
        run_id: str,
        work_box: list[Any],
        window: int,
        pairs: list[tuple[int, Any]],
        prior: dict[int, Any],
    ) -> AsyncIterator[tuple[list[tuple[int, Any]], list[Event]]]:
        """Run a shard of batch ``run_id``; yield (results, events) as items finish."""
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = _Run(work_box, window, self.broker)
        work = await asyncio.shield(run.ready)
        gate = run.gate
        out = _Out()
        it = iter(pairs)

        async def lane() -> None:
            while True:
                await gate.acquire()
                try:
                    got = next(it, None)
                    if got is None:
                        return
                    index, item = got
                    result = await work.run_one(index, item, prior.get(index))
                    out.results.append((index, result))
                    out.wake.set()
                finally:
                    gate.release()

        async def lanes() -> None:
            _OUT.set(out)
            _RUN.set(run)
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(run.window, len(pairs))):
                    tg.create_task(lane())

        task = asyncio.get_running_loop().create_task(lanes())
        try:
            while not task.done() or out.pending():
                if not out.pending():
                    waiter = asyncio.ensure_future(out.wake.wait())
                    try:
                        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    out.wake.clear()
                    continue
                yield out.take()
            task.result()  # a bug or a store failure: raise it in the driver
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def end_run(self, run_id: str) -> None:
        """Batch ``run_id`` is over: give back its slots, close its handles and store."""
        run = self.runs.pop(run_id, None)
        if run is not None:
            await run.close()


# --------------------------------------------------------------------------- work


class _Work:
    """What a worker does with each item of a batch."""

    # The batch's budget, kept by the broker (set by the driver before sending the work).
    budget: BudgetSpec | None = None

    async def start(self, window: int, budget: Budget | None) -> None:
        """Build the per-process state (on the worker's event loop)."""

    async def run_one(self, index: int, item: Any, prior: Any) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        """Release the per-process state."""


@dataclass(frozen=True)
class _StoreSpec:
    path: str
    timeout: float
    job: str | None
    only_failed: bool
    cache: bool


class _MapWork(_Work):
    def __init__(
        self,
        llm: LLM,
        prompt: Prompt,
        *,
        timeout: float | None,
        deadline_wall: float | None,  # set when the batch starts
        retry: RetryPolicy | None,
        hedge_after: float | None,
        system: str | None,
        params: dict[str, Any],
        parse: Callable[[Response], Any],
        events: bool,
        label: str | None,
        store: _StoreSpec | None,
        prices: Mapping[str, Any] | None = None,
    ) -> None:
        self.llm = llm
        self.prompt = prompt
        self.timeout = timeout
        self.deadline_wall = deadline_wall
        self.retry = retry
        self.hedge_after = hedge_after
        self.system = system
        self.params = params
        self.parse = parse
        self.events = events
        self.label = label
        self.store = store
        self.prices = prices
        self._batch: _Batch[Any] | None = None
        self._durable: Durability | None = None

    async def start(self, window: int, budget: Budget | None) -> None:
        deadline = None
        if self.deadline_wall is not None:
            # Wall clocks agree across machines (NTP); loop clocks need not.
            deadline = max(self.deadline_wall - time.time(), 1e-9)
        opts = make_options(
            concurrency=window if self.hedge_after is not None else None,
            timeout=self.timeout,
            deadline=deadline,
            retry=self.retry,
            hedge_after=self.hedge_after,
            hooks=(_collect,) if self.events else (),
            budget=budget,
            prices=self.prices,
        )
        spec = self.store
        if spec is not None:
            self._durable = Durability(
                store=Store(spec.path, timeout=spec.timeout),
                job=spec.job,
                only_failed=spec.only_failed,
                cache=spec.cache,
                sink=None,
            )
        self._batch = _Batch[Any](
            self.llm,
            self.prompt,
            (),
            opts=opts,
            workers=window,
            parse=self.parse,
            deliver=lambda record: None,
            system=self.system,
            params=self.params,
            label=self.label,
            fail_fast=False,
            durable=self._durable,
        )

    async def run_one(self, index: int, item: Any, prior: Any) -> CallRecord[Any]:
        assert self._batch is not None
        if prior is not None and self._durable is not None:
            self._durable.prior[index] = prior
        return await self._batch.run_item(index, item)

    async def close(self) -> None:
        if self._durable is not None and self._durable.store is not None:
            await self._durable.store.aclose()
        if isinstance(self.llm, BaseLLM):
            await self.llm.aclose()


class _PoolWork(_Work):
    def __init__(
        self,
        runner: Any,
        events: bool,
        store: Store | None,
        cache: bool,
        prices: Mapping[str, Any] | None,
    ) -> None:
        self.prices = prices
        self.cap: Budget | None = None
        self.runner = runner
        self.events = events
        self.store = store  # pickled as its path: the worker opens the same file
        self.cache = cache

    async def run_one(self, index: int, item: Any, prior: Any) -> Any:
        # ``prior`` is True for an input that succeeded in an earlier run of the job:
        # it is replayed from the store whatever ``cache`` says.
        hooks: tuple[Hook, ...] = (_collect,) if self.events else ()
        return await self.runner.execute(
            item,
            index=index,
            hooks=hooks,
            store=self.store,
            cache=self.cache or bool(prior),
            budget=self.cap,
            prices=self.prices,
        )

    async def start(self, window: int, budget: Budget | None) -> None:
        self.cap = budget

    async def close(self) -> None:
        if self.store is not None:
            await self.store.aclose()


# --------------------------------------------------------------------------- driver

# The broker of the cluster this process is connected to, kept referenced for the life
# of the connection: Ray ends an actor, even a named one, once no handle to it is left,
# and the broker must outlive one batch (two batches sharing a handle share its limit).
_BROKER: tuple[str, Any] | None = None


def _broker(ray: ModuleType) -> Any:
    global _BROKER
    job = ray.get_runtime_context().get_job_id()
    if _BROKER is None or _BROKER[0] != job:
        actor = (
            ray.remote(_BrokerActor)
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


# The workers of the cluster this process is connected to, kept between batches.
_WORKERS: tuple[str, float, list[_Slot]] | None = None


def _workers(ray: ModuleType, broker: Any, n: int, cpus: float) -> list[_Slot]:
    """``n`` workers of this driver (started now if there are fewer)."""
    global _WORKERS
    job = ray.get_runtime_context().get_job_id()
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
        work: _Work,
        items: Any,
        *,
        window: int,
        workers: int | None,
        on_chunk: Callable[[list[tuple[int, Any]], list[Event], dict[int, Any]], Awaitable[None]],
        prior: Callable[[int], Any],
        numbered: bool = False,
        budget: Budget | None = None,
    ) -> None:
        self.budget = budget
        self.backend = backend
        self.work = work
        self.source: _Source | _Pairs = _Pairs(items) if numbered else _Source(items)
        self.window = window
        self.n_workers = workers
        self.on_chunk = on_chunk
        self.prior = prior
        self.retry: deque[list[tuple[int, Any]]] = deque()
        self.exhausted = False
        self.running = 0
        self.changed = asyncio.Event()
        self.restarts = 0

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
        self.work_box = [ray.put(self.work)]
        self.run_id = uuid.uuid4().hex
        self.ray = ray
        slots = _workers(ray, self.broker, n, backend.worker_cpus)
        try:
            async with asyncio.TaskGroup() as tg:
                for slot in slots:
                    for _ in range(_IN_FLIGHT_PER_WORKER):
                        tg.create_task(self._feed(slot))
        except BaseExceptionGroup as group:
            errors = group.exceptions
            first = next((e for e in errors if isinstance(e, _FailFast)), errors[0])
            raise first from None
        finally:
            await self._stop(slots)
            if spec is not None and self.budget is not None:
                spent, skipped = await self.broker.close_budget.remote(spec.budget_id)
                # The caller's budget shows what the cluster spent and skipped.
                self.budget.settle(0.0, spent - spec.spent)
                self.budget._skipped += skipped
        return self.source.seen

    async def _stop(self, slots: Sequence[_Slot]) -> None:
        ending = [slot.actor.end_run.remote(self.run_id) for slot in slots]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*ending, return_exceptions=True), 30.0)

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


class RayMapBatch:
    """A map's items on Ray, each record handed to ``deliver`` as it comes back (the
    Ray counterpart of ``patterns._map._Batch``: ``map`` and ``as_completed`` use it)."""

    def __init__(
        self,
        backend: object,
        llm: LLM,
        prompt: Prompt,
        items: Any,
        *,
        deliver: Callable[[CallRecord[Any]], Any],
        concurrency: int | None,
        timeout: float | None,
        deadline: float | None,
        retry: RetryPolicy | None,
        hedge_after: float | None,
        system: str | None,
        params: dict[str, Any],
        parse: Callable[[Response], Any],
        hooks: Sequence[Hook],
        label: str | None,
        fail_fast: bool,
        durable: Durability | None,
        budget: Budget | None,
        prices: Mapping[str, Any] | None,
    ) -> None:
        ray_backend = resolve_backend(backend)
        assert ray_backend is not None
        self.budget = budget
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}; use None for no limit")
        if deadline is not None and deadline <= 0:
            raise ConfigError(f"deadline must be > 0 seconds, got {deadline}; use None for none")
        _connect(ray_backend)
        self.backend = ray_backend
        self.items = items
        self.deliver = deliver
        self.deadline = deadline
        self.hooks = tuple(hooks)
        self.fail_fast = fail_fast
        self.durable = durable
        self.n_workers, window = _workers_for(ray_backend, concurrency)
        self.window = window if window is not None else _window(llm, None, None)
        self.workers = self.window  # what ResultStream sizes its queue by
        store = None
        if durable is not None and durable.store is not None:
            store = _StoreSpec(
                str(durable.store.path),
                durable.store.timeout,
                durable.job,
                durable.only_failed,
                durable.cache,
            )
        self.work = _MapWork(
            llm,
            prompt,
            timeout=timeout,
            deadline_wall=None,
            retry=retry,
            hedge_after=hedge_after,
            system=system,
            params=params,
            parse=parse,
            events=bool(hooks),
            label=label,
            store=store,
            prices=prices,
        )
        self.seen = 0

    async def run(self) -> None:
        """Run every item; raise the first failure's error with ``fail_fast``."""
        durable = self.durable
        if self.deadline is not None:
            self.work.deadline_wall = time.time() + self.deadline

        async def on_chunk(
            results: list[tuple[int, Any]], events: list[Event], items: dict[int, Any]
        ) -> None:
            for event in events:
                emit(self.hooks, event)
            for index, record in results:
                if durable is not None:
                    durable.emit(record, items.get(index))
                delivered = self.deliver(record)
                if delivered is not None:
                    await delivered
                if self.fail_fast and record.status is not Status.SUCCEEDED:
                    raise _FailFast(record)

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
        size = len(self.items) if isinstance(self.items, Sequence) else None
        try:
            if durable is None:
                await driver.run()
            else:
                await durable.around(driver.run, size)
        except _FailFast as stop:
            if stop.record.error is not None:
                raise stop.record.error from None
            raise  # pragma: no cover - a non-succeeded record always has an error
        finally:
            self.seen = driver.source.seen


async def map_on_ray(
    backend: object, llm: LLM, prompt: Prompt, items: Any, **options: Any
) -> BatchResult[Any]:
    """``fanflow.map`` on Ray (see :func:`fanflow.map` for the arguments)."""
    records: dict[int, CallRecord[Any]] = {}

    def deliver(record: CallRecord[Any]) -> None:
        assert record.index is not None
        records[record.index] = record

    loop = asyncio.get_running_loop()
    batch = RayMapBatch(backend, llm, prompt, items, deliver=deliver, **options)
    start = loop.time()
    await batch.run()
    missing = [i for i in range(batch.seen) if i not in records]
    if missing:  # pragma: no cover - a broken promise, loudly
        raise FanflowError(f"internal error: items {missing[:10]} ended with no status")
    return BatchResult([records[i] for i in range(batch.seen)], makespan=loop.time() - start)


async def run_pool_on_ray(
    backend: object,
    runner: Any,
    todo: Sequence[tuple[int, Any]],
    *,
    max_flows: int,
    hooks: Sequence[Hook],
    store: Store | None,
    cache: bool,
    replay: Callable[[int], bool],
    deliver: Callable[[int, Any], Awaitable[None]],
    budget: Budget | None = None,
    prices: Mapping[str, Any] | None = None,
) -> None:
    """Run a pool's inputs on Ray; ``await deliver(index, RunResult)`` as each ends."""
    ray_backend = resolve_backend(backend)
    assert ray_backend is not None
    _connect(ray_backend)
    workers, window = _workers_for(ray_backend, max_flows)
    assert window is not None

    async def on_chunk(
        results: list[tuple[int, Any]], events: list[Event], items: dict[int, Any]
    ) -> None:
        for event in events:
            emit(hooks, event)
        for index, result in results:
            await deliver(index, result)

    driver = _Driver(
        ray_backend,
        _PoolWork(runner, bool(hooks), store, cache, prices),
        list(todo),
        window=window,
        workers=workers,
        on_chunk=on_chunk,
        prior=lambda index: True if replay(index) else None,
        numbered=True,
        budget=budget,
    )
    await driver.run()
