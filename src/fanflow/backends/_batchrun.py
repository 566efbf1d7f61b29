"""The batch backend: ``mode="batch"`` / ``mode="auto"`` behind the Backend seam.

:class:`BatchBackend` implements :class:`~fanflow.backends.Backend`: a map's batch is
the local backend's batch over a :class:`~fanflow.backends._batch.BatchLLM` that wraps
the caller's handle, inside the life of one :class:`BatchQueue` (and, for ``auto``, a
watcher that moves what is left to real time before the deadline). Nothing else of the
pattern changes: records, order, stores and sinks are the real-time ones. A Pool's model
steps are given their batching handle in ``PoolSpec.handle_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from .._budget import as_budget
from .._engine import CallOptions
from .._exceptions import ConfigError
from .._llm import LLM, BaseLLM
from .._pricing import Price
from .._types import CallRecord, Status
from ._base import Deliver, HandleFor, MapRun, MapSpec, PoolDeliver, PoolMoved, PoolSpec
from ._batch import (
    MODES,
    BatchOptions,
    BatchQueue,
    Journal,
    MemoryJournal,
    batch_api_of,
)
from ._batchllm import BatchLLM, realtime_reserve
from ._batchroute import Queues, batch_apis, batching
from ._local import LOCAL

__all__ = ["BatchBackend", "batch_backend", "check_pool_mode", "pool_batching"]

log = logging.getLogger("fanflow")


class BatchBackend:
    """Runs the model calls of ``map``, ``as_completed`` and ``Pool`` through the
    providers' batch APIs (``mode="batch"`` / ``"auto"`` make one; or pass
    ``backend=fanflow.backends.BatchBackend(...)``).

    Args:
        mode: ``"batch"`` (every call through a batch) or ``"auto"`` (batches, and what
            is still unanswered as the call's ``deadline`` nears goes in real time).
        options: how batches are sized and polled.
    """

    def __init__(self, mode: str = "batch", options: BatchOptions | None = None) -> None:
        if mode not in ("batch", "auto"):
            raise ConfigError(f"unknown mode {mode!r}; use 'realtime', 'batch' or 'auto'")
        self.mode = mode
        self.options = options or BatchOptions()

    def __repr__(self) -> str:
        return f"fanflow.backends.BatchBackend(mode={self.mode!r})"

    def check(self, llm: LLM, calls: CallOptions) -> None:
        """Refuse what cannot work, before anything is sent."""
        mode, options, deadline = self.mode, self.options, calls.deadline
        batch_apis(llm, mode)
        if calls.hedge_after is not None:
            raise ConfigError(
                f"hedge_after has no meaning with mode={mode!r} (a batched request is sent "
                "once); drop it"
            )
        if mode == "auto" and deadline is None:
            raise ConfigError(
                "mode='auto' needs deadline= (seconds): items go into batches and move to "
                "real time when the deadline nears; use mode='batch' for no deadline"
            )
        if mode == "batch" and deadline is not None and deadline <= options.linger + options.poll:
            raise ConfigError(
                f"deadline={deadline:g} s is shorter than any batch could meet (it is "
                f"collected for {options.linger:g} s and first polled after "
                f"{options.poll:g} s); use mode='auto' to send what a batch cannot do in "
                "real time, or mode='realtime'"
            )

    def map_run(self, spec: MapSpec, deliver: Deliver) -> MapRun:
        self.check(spec.llm, spec.options)
        return _BatchedRun(self, spec, deliver)

    async def run_pool(self, spec: PoolSpec, deliver: PoolDeliver, on_step: PoolMoved) -> None:
        if self.mode != "batch":
            raise ConfigError("mode='auto' is for map and as_completed; use mode='batch' in a Pool")
        async with pool_batching(spec.store, self.options, spec.prices) as handle_for:
            await LOCAL.run_pool(replace(spec, handle_for=handle_for), deliver, on_step)


def batch_backend(
    mode: str,
    options: BatchOptions | None,
    backend: object,
    llm: LLM,
    calls: CallOptions,
) -> BatchBackend:
    """The backend of ``mode="batch"``/``"auto"`` (checked now, before anything runs)."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use 'realtime', 'batch' or 'auto'")
    if backend not in ("local", None):
        raise ConfigError(f"mode={mode!r} chooses the batch backend; drop backend={backend!r}")
    made = BatchBackend(mode, options)
    made.check(llm, calls)
    return made


class _BatchedRun:
    """A map's batch on the batch backend: the local backend's, over a batching handle,
    inside the life of one batch queue (and, for ``auto``, the deadline watcher)."""

    def __init__(self, backend: BatchBackend, spec: MapSpec, deliver: Deliver) -> None:
        self.backend = backend
        self.spec = spec
        self.deliver = deliver
        most = min(api.max_requests for api in batch_apis(spec.llm, backend.mode))
        size = spec.size
        per_batch = min(backend.options.max_requests or most, most)
        self.window = 2 * per_batch if size is None else max(1, min(size, 2 * per_batch))
        self.workers = self.window
        self._seen = 0

    @property
    def seen(self) -> int:
        return self._seen

    async def run(self) -> None:
        missing: Counter[str] = Counter()

        def deliver(record: CallRecord[Any]) -> Awaitable[None] | None:
            if record.status is not Status.SUCCEEDED:
                missing[type(record.error).__name__ if record.error else str(record.status)] += 1
            return self.deliver(record)

        async with _batched(self.backend, self.spec, self.window) as spec:
            inner = LOCAL.map_run(spec, deliver)
            try:
                await inner.run()
            finally:
                self._seen = inner.seen
        if missing:  # never a partial result without saying so (each record says why)
            log.warning(
                "fanflow: %d of %d items have no answer (%s); their records say why "
                "(result.errors); rerun the job with only_failed=True to try them again",
                sum(missing.values()),
                self._seen,
                ", ".join(f"{n} {reason}" for reason, n in missing.most_common()),
            )


@contextlib.asynccontextmanager
async def _batched(backend: BatchBackend, spec: MapSpec, window: int) -> AsyncIterator[MapSpec]:
    """``spec`` with the handle swapped for a batching one, valid while the block runs."""
    options, mode = backend.options, backend.mode
    llm = spec.llm
    assert isinstance(llm, BaseLLM)  # batch_apis checked it
    store = spec.durable.store if spec.durable is not None else None
    journal: Journal = store if isinstance(store, Journal) else MemoryJournal()
    calls = spec.options
    prices = calls.prices
    budget = as_budget(calls.budget)
    if budget is not None:  # records are priced as the budget charges them
        prices = budget.with_prices(prices).prices
        calls = replace(calls, budget=budget)  # the same cap for the batch's calls
    made: list[BatchQueue] = []
    # One gate for the real-time calls after an ``auto`` switch, whichever deployment.
    gate = None if calls.concurrency is None else asyncio.Semaphore(calls.concurrency)

    def wrap(handle: BaseLLM, price: Price | None) -> BaseLLM:
        queue = BatchQueue(batch_api_of(handle, mode), journal, options)
        made.append(queue)
        return BatchLLM(
            handle,
            queue,
            window=window,
            prices=_with_price(prices, handle, price),
            realtime_timeout=calls.timeout or handle.timeout,
            gate=gate,
        )

    # A router's or cascade's deployments each batch their own calls (decision 0272).
    wrapped = batching(llm, wrap)
    queue = Queues(made)
    async with queue:
        watcher = None
        if mode == "auto":
            assert calls.deadline is not None
            deadline_at = asyncio.get_running_loop().time() + calls.deadline
            watcher = asyncio.ensure_future(_watch(queue, llm, deadline_at, options, spec.size))
        try:
            inner = replace(calls, timeout=None, concurrency=None)
            yield replace(spec, llm=wrapped, options=inner)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            if isinstance(journal, MemoryJournal):
                await queue.cancel_running()


async def _watch(
    queue: Queues, llm: BaseLLM, deadline_at: float, options: BatchOptions, size: int | None
) -> None:
    """Move to real time once the time left is what real-time calls need for what is
    still unanswered."""
    loop = asyncio.get_running_loop()
    # No batch can answer before the switch if it would come before the first poll.
    shortest = options.linger + options.poll
    if size is not None:
        need = realtime_reserve(llm, size, options)
        if loop.time() + need + shortest >= deadline_at:
            log.warning(
                "fanflow: the deadline leaves no time for a batch (real-time calls alone "
                "need about %.0f s for %d items); sending everything in real time",
                need,
                size,
            )
            queue.switch()
            return
    while not queue.switched:
        now = loop.time()
        at = deadline_at - realtime_reserve(llm, queue.unanswered, options)
        if now >= at:
            queue.switch()
            return
        await asyncio.sleep(min(at - now, options.poll))


# --------------------------------------------------------------------------- Pool


def check_pool_mode(mode: str, llms: Iterable[LLM], backend: object) -> None:
    """Refuse a Pool's ``mode`` that cannot work, before anything runs."""
    if mode == "realtime":
        return
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use 'realtime' or 'batch'")
    if mode == "auto":
        raise ConfigError("mode='auto' is for map and as_completed; use mode='batch' in a Pool")
    if backend not in ("local", None):
        raise ConfigError(f"mode={mode!r} chooses the batch backend; drop backend={backend!r}")
    handles = list(llms)
    if not any(_batchable(llm) for llm in handles):
        raise ConfigError(
            "mode='batch' needs a model step whose handle has a batch API "
            "(fanflow.openai(...) or fanflow.anthropic(...)); this pool's steps use "
            f"{', '.join(repr(x) for x in handles) or 'no model'}. Use mode='realtime'"
        )


@contextlib.asynccontextmanager
async def pool_batching(
    store: object, options: BatchOptions | None, prices: Mapping[str, Price] | None
) -> AsyncIterator[HandleFor]:
    """The handle each model step of a Pool calls while the block runs: a batching one
    (one queue per handle with a batch API), or its own (steps on other handles stay
    real time). The backend passes it to the steps in ``PoolSpec.handle_for``."""
    opts = options or BatchOptions()
    journal: Journal = store if isinstance(store, Journal) else MemoryJournal()
    wrapped: dict[int, BaseLLM] = {}
    queues: list[BatchQueue] = []

    def wrap(handle: BaseLLM, price: Price | None) -> BaseLLM:
        api = batch_api_of(handle, "batch")
        queue = BatchQueue(api, journal, opts)
        queues.append(queue)
        window = 2 * min(opts.max_requests or api.max_requests, api.max_requests)
        return BatchLLM(
            handle,
            queue,
            window=window,
            prices=_with_price(prices, handle, price),
            realtime_timeout=handle.timeout,
            realtime_concurrency=None,
        )

    def swap(llm: LLM) -> LLM:
        got = wrapped.get(id(llm))
        if got is not None:
            return got
        if not isinstance(llm, BaseLLM) or not _batchable(llm):
            return llm
        # A router's or cascade's deployments each batch their own calls (decision 0272).
        made = wrapped[id(llm)] = batching(llm, wrap)
        return made

    try:
        yield swap
    finally:
        for queue in queues:
            await queue.__aexit__(None, None, None)
            if isinstance(journal, MemoryJournal):
                await queue.cancel_running()


def _batchable(llm: LLM) -> bool:
    """Whether every handle ``llm``'s calls run on has a batch API."""
    try:
        batch_apis(llm, "batch")
    except ConfigError:
        return False
    return True


def _with_price(
    prices: Mapping[str, Price] | None, handle: BaseLLM, price: Price | None
) -> Mapping[str, Price] | None:
    """``prices`` with a router's own ``price`` for ``handle``'s model over them."""
    if price is None or handle.model is None:
        return prices
    return {**(prices or {}), handle.model: price}
