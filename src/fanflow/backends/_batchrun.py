"""``mode="batch"`` / ``mode="auto"`` for ``map`` and ``as_completed``.

The pattern is run as usual over a :class:`~fanflow.backends._batch.BatchLLM` that wraps
the caller's handle, inside the life of one :class:`BatchQueue` (and, for ``auto``, a
watcher that moves what is left to real time before the deadline). Nothing else of the
pattern changes: records, order, stores and sinks are the real-time ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from .._budget import Budget
from .._exceptions import ConfigError
from .._llm import LLM, BaseLLM
from .._pricing import Price
from ..store import Store
from ._batch import (
    MODES,
    BatchLLM,
    BatchOptions,
    BatchQueue,
    Journal,
    MemoryJournal,
    batch_api_of,
    realtime_reserve,
)
from ._config import resolve_backend

__all__ = ["batched", "check_mode", "pool_batching", "swapped"]

log = logging.getLogger("fanflow")


def check_mode(args: Mapping[str, Any]) -> BatchOptions:
    """Validate the options of a batched pattern call (before anything is sent)."""
    mode = args["mode"]
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use 'realtime', 'batch' or 'auto'")
    llm = args["llm"]
    batch_api_of(llm, mode)
    if not isinstance(llm, BaseLLM):  # pragma: no cover - batch_api_of needs a handle
        raise ConfigError(f"mode={mode!r} needs a fanflow handle, got {llm!r}")
    if resolve_backend(args.get("backend")) is not None:
        raise ConfigError(f"mode={mode!r} runs on the local backend; drop backend='ray'")
    if args.get("hedge_after") is not None:
        raise ConfigError(
            f"hedge_after has no meaning with mode={mode!r} (a batched request is sent "
            "once); drop it"
        )
    options = args.get("batch") or BatchOptions()
    deadline = args.get("deadline")
    if mode == "auto" and deadline is None:
        raise ConfigError(
            "mode='auto' needs deadline= (seconds): items go into batches and move to real "
            "time when the deadline nears; use mode='batch' for no deadline"
        )
    if mode == "batch" and deadline is not None and deadline <= options.linger + options.poll:
        raise ConfigError(
            f"deadline={deadline:g} s is shorter than any batch could meet (it is collected "
            f"for {options.linger:g} s and first polled after {options.poll:g} s); use "
            "mode='auto' to send what a batch cannot do in real time, or mode='realtime'"
        )
    return options


@contextlib.asynccontextmanager
async def batched(args: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The pattern's arguments with the handle swapped for a batching one, valid while
    the block runs (the queue and, for ``auto``, the deadline watcher live as long)."""
    options = check_mode(args)
    mode = args["mode"]
    llm: BaseLLM = args["llm"]
    api = batch_api_of(llm, mode)
    store = args.get("store")
    journal: Journal = store if isinstance(store, Store) else MemoryJournal()
    items = args["items"]
    size = len(items) if isinstance(items, Sequence) else None
    max_requests = min(options.max_requests or api.max_requests, api.max_requests)
    window = 2 * max_requests if size is None else max(1, min(size, 2 * max_requests))
    prices: Mapping[str, Price] | None = args.get("prices")
    budget = args.get("budget")
    if isinstance(budget, Budget):  # records are priced as the budget charges them
        prices = budget.with_prices(prices).prices
    queue = BatchQueue(api, journal, options)
    wrapped = BatchLLM(
        llm,
        queue,
        window=window,
        prices=prices,
        realtime_timeout=args.get("timeout") or llm.timeout,
        realtime_concurrency=args.get("concurrency"),
    )
    out = dict(args)
    out.update(llm=wrapped, mode="realtime", timeout=None, concurrency=None, batch=None)
    async with queue:
        watcher = None
        if mode == "auto":
            loop = asyncio.get_running_loop()
            deadline_at = loop.time() + float(args["deadline"])
            watcher = asyncio.ensure_future(_watch(queue, llm, deadline_at, options, size))
        try:
            yield out
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            if isinstance(journal, MemoryJournal):
                await queue.cancel_running()


async def _watch(
    queue: BatchQueue, llm: BaseLLM, deadline_at: float, options: BatchOptions, size: int | None
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


async def run_map(map_fn: Callable[..., Awaitable[Any]], args: Mapping[str, Any]) -> Any:
    """``map(**args)`` in batch mode."""
    async with batched(args) as out:
        return await map_fn(**out)


def stream(as_completed_fn: Callable[..., Any], args: Mapping[str, Any]) -> Any:
    """``as_completed(**args)`` in batch mode: a ResultStream whose runner lives inside
    the batch context."""
    from ..patterns._map import ResultStream

    check_mode(args)

    def make(deliver: Callable[[Any], Any]) -> _Within:
        return _Within(args, lambda out: as_completed_fn(**out)._make_batch(deliver))

    return ResultStream(make)


class _Within:
    """A pattern's runner that runs inside the batch context."""

    #: Records buffered for the consumer (the stream's queue size).
    workers = 1024

    def __init__(self, args: Mapping[str, Any], make: Callable[[dict[str, Any]], Any]) -> None:
        self._args = args
        self._make = make

    async def run(self) -> None:
        async with batched(self._args) as out:
            await self._make(out).run()


# --------------------------------------------------------------------------- Pool

#: While a Pool runs with mode="batch": the batching handle for each model handle.
_SWAP: ContextVar[Callable[[LLM], LLM] | None] = ContextVar("fanflow_batch_swap", default=None)


def swapped(llm: LLM) -> LLM:
    """The handle a model step calls: ``llm``, or its batching handle in a batch Pool."""
    swap = _SWAP.get()
    return llm if swap is None else swap(llm)


def check_pool_mode(mode: str, llms: Iterable[LLM], backend: object) -> None:
    """Refuse a Pool's ``mode`` that cannot work, before anything runs."""
    if mode == "realtime":
        return
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use 'realtime' or 'batch'")
    if mode == "auto":
        raise ConfigError("mode='auto' is for map and as_completed; use mode='batch' in a Pool")
    if resolve_backend(backend) is not None:
        raise ConfigError("mode='batch' runs on the local backend; drop backend='ray'")
    handles = list(llms)
    if not any(callable(getattr(llm, "batches", None)) for llm in handles):
        raise ConfigError(
            "mode='batch' needs a model step whose handle has a batch API "
            "(fanflow.openai(...) or fanflow.anthropic(...)); this pool's steps use "
            f"{', '.join(repr(x) for x in handles) or 'no model'}. Use mode='realtime'"
        )


@contextlib.asynccontextmanager
async def pool_batching(
    store: Store | None, options: BatchOptions | None, prices: Mapping[str, Price] | None
) -> AsyncIterator[None]:
    """Model steps of a Pool go through batches while the block runs: one queue per
    handle with a batch API (steps on other handles stay real time)."""
    opts = options or BatchOptions()
    journal: Journal = store if store is not None else MemoryJournal()
    wrapped: dict[int, BatchLLM] = {}

    def swap(llm: LLM) -> LLM:
        got = wrapped.get(id(llm))
        if got is not None:
            return got
        if not isinstance(llm, BaseLLM) or not callable(getattr(llm, "batches", None)):
            return llm
        api = batch_api_of(llm, "batch")
        queue = BatchQueue(api, journal, opts)
        window = 2 * min(opts.max_requests or api.max_requests, api.max_requests)
        made = wrapped[id(llm)] = BatchLLM(
            llm,
            queue,
            window=window,
            prices=prices,
            realtime_timeout=llm.timeout,
            realtime_concurrency=None,
        )
        return made

    token = _SWAP.set(swap)
    try:
        yield
    finally:
        _SWAP.reset(token)
        for made in wrapped.values():
            await made.queue.__aexit__(None, None, None)
            if isinstance(journal, MemoryJournal):
                await made.queue.cancel_running()
