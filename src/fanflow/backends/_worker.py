"""The worker side of the Ray backend: the broker actor and the worker actors.

A ``FanflowWorker`` is one long-lived Ray actor (one process, one event loop). It runs
shards of maps and pools with fanflow's own engine, many calls in flight, and streams results
back as they finish. Its handles' lanes draw from the broker (``_limiter.py``) through
the lane factory it installs in its process. Per-run state (the work, the per-worker
window, leases, grant queues, the budget view) lives in a ``_Run`` keyed by the run.
Nothing here imports Ray: the driver (``_ray.py``) wraps these classes with
``ray.remote``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .._budget import Budget
from .._durable import Durability, learners
from .._engine import CallOptions, Run
from .._events import CallStarted, Event, Hook, endpoint_of
from .._limits import Gate, Lane, Limits
from .._llm import LLM, BaseLLM, set_lane_factory
from .._router import set_health_board
from .._types import CallRecord, Request, Response
from ..store import JobStore
from ._base import Enclosing
from ._health import BrokerHealth, HealthTable
from ._limiter import (
    BudgetSpec,
    GlobalLane,
    GrantQueue,
    LimitBroker,
    RemoteBudget,
    SlotLease,
    lease_time,
    needs_broker,
)
from ._local import Crew

__all__ = [
    "BrokerActor",
    "FanflowWorker",
    "MapWork",
    "PoolWork",
    "StepMoved",
    "StoreSpec",
    "Work",
]

# --------------------------------------------------------------------------- actors


class BrokerActor:
    """The :class:`LimitBroker` of the cluster, as a Ray actor."""

    def __init__(self) -> None:
        self.broker = LimitBroker()
        self.health_table = HealthTable()  # routers' deployments out of rotation

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

    async def reserve_budget(
        self, budget_id: str, amount: float, who: str, output_tokens: int | None = None
    ) -> float:
        return await self.broker.reserve_budget(budget_id, amount, who, output_tokens)

    async def settle_budget(self, budget_id: str, reserved: float, actual: float) -> None:
        self.broker.settle_budget(budget_id, reserved, actual)

    async def close_budget(self, budget_id: str) -> tuple[float, int]:
        return self.broker.close_budget(budget_id)

    async def statistics(self, handle_id: str) -> Any:
        return self.broker.statistics(handle_id)

    async def report_down(self, router: str, name: str, until: float, copy: str) -> None:
        self.health_table.report(router, name, until, copy)

    async def health(self, router: str) -> dict[str, dict[str, float]]:
        return self.health_table.read(router)


# The shard a worker's task is running, so its events go back with its results.
_OUT: contextvars.ContextVar[_Out] = contextvars.ContextVar("fanflow_ray_out")


@dataclass
class _Out:
    results: list[tuple[int, Any]] = field(default_factory=list)
    events: list[Event | StepMoved] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def pending(self) -> bool:
        return bool(self.results or self.events)

    def take(self) -> tuple[list[tuple[int, Any]], list[Event | StepMoved]]:
        chunk = (self.results, self.events)
        self.results, self.events = [], []
        return chunk


def _collect(event: Event) -> None:
    out = _OUT.get(None)
    if out is not None:
        if isinstance(event, CallStarted) and event.llm is not None:
            # Not the handle (pickled with every event): what instrumentation reads of it.
            event = dataclasses.replace(event, llm=endpoint_of(event.llm))
        out.events.append(event)


@dataclass(frozen=True, slots=True)
class StepMoved:
    """A pool input's step started or ended in a worker (for ``Pool.status``)."""

    index: int
    step: str
    started: bool


class _Run:
    """One run's state in a worker process (a worker serves run after run)."""

    def __init__(self, work_box: list[Any], window: int, broker: Any) -> None:
        self.window = window
        self.broker = broker
        self.gate = Gate(window)
        self.leases: list[SlotLease] = []
        self.grants: list[GrantQueue] = []
        self.ready = asyncio.get_running_loop().create_task(self._load(work_box))

    async def _load(self, work_box: list[Any]) -> Work:
        _RUN.set(self)  # this task's own context: lanes made in ``start`` close with the run
        work: Work = await work_box[0]
        await work.start(self.window, self._budget(work.budget))
        return work

    def _budget(self, spec: BudgetSpec | None) -> Budget | None:
        if spec is None:
            return None
        broker, budget_id = self.broker, spec.budget_id

        async def reserve(amount: float, who: str, output_tokens: int | None) -> float:
            reserved: float = await broker.reserve_budget.remote(
                budget_id, amount, who, output_tokens
            )
            return reserved

        def settle(reserved: float, actual: float) -> None:
            broker.settle_budget.remote(budget_id, reserved, actual)

        return RemoteBudget(spec, reserve, settle)

    async def close(self) -> dict[str, dict[str, float]]:
        """End the run; return what its lanes learnt of their servers (:meth:`Work.learnt`)."""
        learnt: dict[str, dict[str, float]] = {}
        if self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None:
            learnt = self.ready.result().learnt()
        for lease in self.leases:
            await lease.aclose()
        for grants in self.grants:
            await grants.aclose()
        if not self.ready.done():
            self.ready.cancel()
        with contextlib.suppress(BaseException):
            await (await self.ready).close()
        return learnt


# The run a worker's task belongs to, so the lanes it makes are closed with it.
_RUN: contextvars.ContextVar[_Run] = contextvars.ContextVar("fanflow_ray_run")


class FanflowWorker:
    """One worker process: runs shards of maps and pools with the local engine.

    A driver keeps its workers for the life of its Ray connection, so only its first
    run pays for starting them (a second or two per process).
    """

    def __init__(self, worker_id: str, broker: Any) -> None:
        self.worker_id = worker_id
        self.broker = broker
        self.runs: dict[str, _Run] = {}
        set_lane_factory(self._lane)
        # Its routers share their deployments' health with the other workers'.
        set_health_board(BrokerHealth(broker))

    def _lane(self, handle: BaseLLM, model: str | None, limits: Limits) -> Lane:
        if not needs_broker(limits):
            return Lane(limits)
        # Each model a handle's requests name is booked apart (decision 0290).
        handle_id = handle.limit_id if model is None else f"{handle.limit_id}/{model}"
        broker, worker = self.broker, self.worker_id

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
    ) -> AsyncIterator[tuple[list[tuple[int, Any]], list[Event | StepMoved]]]:
        """Run a shard of run ``run_id``; yield (results, events) as items finish."""
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

        loop = asyncio.get_running_loop()
        task = loop.create_task(lanes())
        try:
            while not task.done() or out.pending():
                if not out.pending():
                    waiter = loop.create_task(out.wake.wait())
                    try:
                        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()  # kept and awaited: nothing outlives this turn
                        await asyncio.gather(waiter, return_exceptions=True)
                    out.wake.clear()
                    continue
                yield out.take()
            task.result()  # a bug or a store failure: raise it in the driver
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def end_run(self, run_id: str) -> dict[str, dict[str, float]]:
        """Run ``run_id`` is over: give back its slots, close its handles and store;
        return what its lanes learnt of their servers, by limit identity."""
        run = self.runs.pop(run_id, None)
        return {} if run is None else await run.close()


# --------------------------------------------------------------------------- work


class Work(ABC):
    """What a worker does with each item of a run."""

    # The run's budget, kept by the broker (set by the driver before sending the work).
    budget: BudgetSpec | None = None
    # What the job's store kept of the servers, by limit identity (learnt, age), for
    # this worker's lanes to start from, and how many workers share it (decision 0305).
    capacity: dict[str, tuple[dict[str, float], float]] | None = None
    share: int = 1
    # The lanes of this worker that learn, with their limit identities (start_lanes).
    lanes: tuple[tuple[Lane, str], ...] = ()

    def start_lanes(self, models: Sequence[LLM]) -> None:
        """This worker's lanes of ``models`` meet the server: each starts from its share
        of what the job's last run kept (decision 0305; a map's handle, a pool's skills')."""
        capacity = self.capacity or {}
        lanes = []
        for handle, ident in learners(models):
            lane = handle.lane()
            found = capacity.get(ident)
            if found is not None:
                lane.start_from(share_of(found[0], self.share), found[1])
            lanes.append((lane, ident))
        self.lanes = tuple(lanes)

    def learnt(self) -> dict[str, dict[str, float]]:
        """What this worker's lanes learnt of their servers in the run, by limit identity."""
        return {ident: got for lane, ident in self.lanes if (got := lane.learnt())}

    async def start(self, window: int, budget: Budget | None) -> None:  # noqa: B027 - optional
        """Build the per-process state (on the worker's event loop)."""

    @abstractmethod
    async def run_one(self, index: int, item: Any, prior: Any) -> Any:
        """Run one item to its record."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release the per-process state."""


@dataclass(frozen=True)
class StoreSpec:
    """A map's durability, for a worker: the store travels by pickling (the ``JobStore``
    protocol: it pickles to something that opens the same store in the worker)."""

    store: JobStore
    job: str | None
    only_failed: bool
    cache: bool


# What a lane learnt that is its own share of the server's capacity (the calls in flight
# the adaptive controller found): summed over the workers, split between them. The rest
# (the rate-limit headers' refill rate, the hedging delay) is the server's: the largest.
_SHARED = ("level", "floor")


def merged(learnt: list[dict[str, float]]) -> dict[str, float]:
    """What a run's workers learnt of one server, as one lane of the cluster would have."""
    out: dict[str, float] = {}
    for got in learnt:
        for key, value in got.items():
            if key in _SHARED:
                out[key] = out.get(key, 0.0) + value
            else:
                out[key] = max(out.get(key, value), value)
    return out


def share_of(learnt: dict[str, float], workers: int) -> dict[str, float]:
    """One worker's share of what the cluster learnt (:func:`merged`)."""
    n = max(workers, 1)
    return {k: v / n if k in _SHARED else v for k, v in learnt.items()}


def _on_worker(options: CallOptions) -> CallOptions:
    """Call options as they travel to the workers: no hooks (the workers' events go
    back to the driver's), no budget (the broker keeps it), no deadline (it travels as
    wall-clock time)."""
    return replace(options, hooks=(), budget=None, deadline=None)


def _left(deadline_wall: float | None) -> float | None:
    """A run's deadline as seconds from now on this machine (None: no deadline)."""
    if deadline_wall is None:
        return None
    # Wall clocks agree across machines (NTP); loop clocks need not.
    return max(deadline_wall - time.time(), 1e-9)


class MapWork(Work):
    """A map's items on a worker: the local backend's workers (``Crew.run_item``)
    under the map's call options."""

    def __init__(
        self,
        llm: LLM,
        build: Callable[[Any, int], Request],
        *,
        options: CallOptions,
        deadline_wall: float | None,  # set when the map starts
        parse: Callable[[Response], Any],
        events: bool,
        label: str | None,
        store: StoreSpec | None,
    ) -> None:
        self.llm = llm
        self.build = build
        self.options = _on_worker(options)
        self.deadline_wall = deadline_wall
        self.parse = parse
        self.events = events
        self.label = label
        self.store = store
        self._crew: Crew[Any] | None = None
        self._durable: Durability | None = None

    async def start(self, window: int, budget: Budget | None) -> None:
        options = self.options
        options = replace(
            options,
            concurrency=window if options.hedge_after is not None else None,
            deadline=_left(self.deadline_wall),
            hooks=(_collect,) if self.events else (),
            budget=budget,
        )
        spec = self.store
        if spec is not None:
            self._durable = Durability(
                store=spec.store,
                job=spec.job,
                only_failed=spec.only_failed,
                cache=spec.cache,
                sink=None,
            )
            if spec.job is not None:
                self.start_lanes((self.llm,))
        self._crew = Crew[Any](
            self.llm,
            self.build,
            (),
            options=options,
            workers=window,
            parse=self.parse,
            deliver=lambda record: None,
            label=self.label,
            fail_fast=False,
            durable=self._durable,
        )

    async def run_one(self, index: int, item: Any, prior: Any) -> CallRecord[Any]:
        assert self._crew is not None
        if prior is not None and self._durable is not None:
            self._durable.prior[index] = prior
        return await self._crew.run_item(index, item)

    async def close(self) -> None:
        if self._durable is not None and self._durable.store is not None:
            await self._durable.store.aclose()
        if isinstance(self.llm, BaseLLM):
            await self.llm.aclose()


class PoolWork(Work):
    """A pool's inputs on a worker. ``options`` (the timing ones: timeout, retry,
    hedge_after) and ``deadline_wall`` (the run's deadline as wall-clock time) are the
    pool's own run, which every skill without options of its own runs within, as on the
    local backend. ``learn`` are the skills' handles of a pool run as a job: their lanes
    here start from this worker's share of what the job's store kept (decision 0311); in
    the same pickle as ``runner``, they are the handles its skills call."""

    def __init__(
        self,
        runner: Any,
        events: bool,
        store: JobStore | None,
        cache: bool,
        prices: Mapping[str, Any] | None,
        *,
        options: CallOptions | None = None,
        deadline_wall: float | None = None,
        learn: Sequence[LLM] = (),
    ) -> None:
        self.learn = tuple(learn)
        self.prices = prices
        self.cap: Budget | None = None
        self.runner = runner
        self.events = events
        self.store = store  # pickled: it opens the same store in the worker (JobStore)
        self.cache = cache
        self.options = _on_worker(options or CallOptions())
        self.deadline_wall = deadline_wall
        self.shared: Run | None = None

    async def run_one(self, index: int, item: Any, prior: Any) -> Any:
        # ``prior`` is True for an input that succeeded in an earlier run of the job:
        # it is replayed from the store whatever ``cache`` says.
        hooks: tuple[Hook, ...] = (_collect,) if self.events else ()
        out = _OUT.get(None)

        def on_step(step: str, started: bool) -> None:
            if out is not None:
                out.events.append(StepMoved(index, step, started))

        return await self.runner.execute(
            item,
            index=index,
            hooks=hooks,
            on_step=on_step,
            enclosing=Enclosing(
                store=self.store,
                cache=self.cache or bool(prior),
                budget=self.cap,
                prices=self.prices,
                shared=self.shared,
            ),
        )

    async def start(self, window: int, budget: Budget | None) -> None:
        self.cap = budget
        # One run for every input this worker runs: one deadline for the whole run.
        self.shared = self.options.start(deadline=_left(self.deadline_wall))
        self.start_lanes(self.learn)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.aclose()
