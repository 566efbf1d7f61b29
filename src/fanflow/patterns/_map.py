"""Data-parallel map over items: ``map`` (in input order) and ``as_completed`` (streamed).

Items are pulled lazily by a fixed set of workers, as many as the concurrency allows,
so an iterator of a million items is never materialised: memory grows with the
concurrency, not with the input (``as_completed``; ``map`` keeps one record per item).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, Generic, Protocol, TypeVar

from .._budget import Budget, as_budget
from .._engine import CallOptions, execute, make_options
from .._events import CallEnded, Hook, emit
from .._exceptions import ConfigError, FanflowError
from .._llm import LLM, BaseLLM
from .._pricing import Price
from .._retry import RetryPolicy
from .._types import BatchResult, CallRecord, Response, Status
from ..backends._config import RayBackend, resolve_backend
from ..store import Sink, Store
from ._jobs import Durability
from ._prompt import Prompt, build_request

__all__ = ["DEFAULT_WINDOW", "ResultStream", "as_completed", "map"]

T = TypeVar("T")

# With no concurrency limit anywhere (neither the call's nor the handle's), a batch runs
# at most this many items at once, so an unbounded iterator cannot exhaust memory.
DEFAULT_WINDOW = 1024

Items = Iterable[Any] | AsyncIterable[Any]


def _text(response: Response) -> str:
    return response.text


# Workers per concurrency slot. Slots are taken per attempt (the pattern's gate, the
# handle's lane), so an item waiting out a backoff holds its worker but not its slot; the
# spare workers pull the next items meanwhile and the slot does not sit idle. Memory stays
# proportional to the concurrency.
WORKERS_PER_SLOT = 2


def _window(llm: LLM, concurrency: int | None, size: int | None) -> int:
    if concurrency is not None:
        n = concurrency * WORKERS_PER_SLOT
    elif isinstance(llm, BaseLLM) and llm.limits.concurrency is not None:
        n = llm.limits.concurrency * WORKERS_PER_SLOT
    else:
        n = DEFAULT_WINDOW
    if size is not None:
        n = min(n, max(size, 1))
    return n


class _Source:
    """Hands out (index, item) pairs from a sync or async iterable, one at a time."""

    __slots__ = ("_ait", "_index", "_it", "_lock")

    def __init__(self, items: Items) -> None:
        self._index = 0
        self._it: Any = None
        self._ait: AsyncIterator[Any] | None = None
        self._lock: asyncio.Lock | None = None
        if isinstance(items, AsyncIterable):
            self._ait = aiter(items)
            # An async generator may not be advanced by two workers at once.
            self._lock = asyncio.Lock()
        else:
            self._it = iter(items)

    @property
    def is_async(self) -> bool:
        return self._ait is not None

    def next_sync(self) -> tuple[int, Any] | None:
        """The next item of a sync iterable (no coroutine: this is the hot path)."""
        try:
            item = next(self._it)
        except StopIteration:
            return None
        index = self._index
        self._index += 1
        return index, item

    async def next(self) -> tuple[int, Any] | None:
        if self._ait is None:
            return self.next_sync()
        assert self._lock is not None
        async with self._lock:
            try:
                item = await anext(self._ait)
            except StopAsyncIteration:
                return None
        index = self._index
        self._index += 1
        return index, item

    @property
    def seen(self) -> int:
        """How many items were handed out."""
        return self._index


class _FailFast(Exception):
    def __init__(self, record: CallRecord[Any]) -> None:
        super().__init__(record)
        self.record = record


class _Batch(Generic[T]):
    """Workers that pull items, run each as a call, and deliver its record."""

    def __init__(
        self,
        llm: LLM,
        prompt: Prompt,
        items: Items,
        *,
        opts: CallOptions,
        workers: int,
        parse: Callable[[Response], T],
        deliver: Callable[[CallRecord[T]], Any],
        system: str | None,
        params: dict[str, Any],
        label: str | None,
        fail_fast: bool,
        durable: Durability | None = None,
        size: int | None = None,
    ) -> None:
        self.llm = llm
        self.prompt = prompt
        self.source = _Source(items)
        self.opts = opts
        self.workers = workers
        self.parse = parse
        self.deliver = deliver
        self.system = system
        self.params = params
        self.label = label
        self.fail_fast = fail_fast
        self.durable = durable
        self.size = size

    async def run(self) -> None:
        if self.durable is None:
            await self._run()
        else:
            await self.durable.around(self._run, self.size)

    async def _run(self) -> int:
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(self.workers):
                    tg.create_task(self._worker())
        except BaseExceptionGroup as group:
            # Re-raise the one meaningful error (fail-fast, or the item iterator's own).
            errors = group.exceptions
            first = next((e for e in errors if isinstance(e, _FailFast)), errors[0])
            if isinstance(first, _FailFast) and first.record.error is not None:
                raise first.record.error from None
            raise first from None
        return self.source.seen

    async def _worker(self) -> None:
        source = self.source
        is_async = source.is_async
        while True:
            got = await source.next() if is_async else source.next_sync()
            if got is None:
                return
            index, item = got
            record = await self.run_item(index, item)
            if self.durable is not None:
                self.durable.emit(record, item)
            delivered = self.deliver(record)
            if delivered is not None:
                await delivered
            if self.fail_fast and record.status is not Status.SUCCEEDED:
                raise _FailFast(record)

    def run_item(self, index: int, item: Any) -> Awaitable[CallRecord[T]]:
        """Run one item to its record (committed to the store first, if there is one).

        Not ``async def``: the common case hands back ``execute``'s coroutine itself, one
        frame fewer per item in flight (10,000 in flight means 10,000 fewer frames for
        the GC to scan). Await the result.
        """
        try:
            request = build_request(
                self.prompt, item, index, system=self.system, params=self.params
            )
        except Exception as exc:
            return self._bad_item(index, item, exc)
        if self.durable is None:
            return execute(
                self.llm, request, self.opts, index=index, label=self.label, parse=self.parse
            )
        return self.durable.run(
            self.llm,
            request,
            self.opts,
            index=index,
            item=item,
            label=self.label,
            parse=self.parse,
        )

    async def _bad_item(self, index: int, item: Any, exc: Exception) -> CallRecord[T]:
        """The record of an item whose request could not be built (a template error)."""
        record: CallRecord[T] = CallRecord(
            status=Status.FAILED, error=exc, index=index, label=self.label
        )
        if self.opts.hooks:
            now = asyncio.get_running_loop().time()
            record = CallRecord(
                status=Status.FAILED,
                error=exc,
                index=index,
                label=self.label,
                start=now,
                end=now,
            )
            emit(self.opts.hooks, CallEnded(now, record))
        if self.durable is not None:
            await self.durable.settle(record, item)
        return record


def _params(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


async def map(
    llm: LLM,
    prompt: Prompt,
    items: Items,
    *,
    concurrency: int | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
    retry: RetryPolicy | None = None,
    hedge_after: float | None = None,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    parse: Callable[[Response], Any] | None = None,
    hooks: Sequence[Hook] = (),
    label: str | None = None,
    fail_fast: bool = False,
    store: Store | None = None,
    job: str | None = None,
    only_failed: bool = False,
    cache: bool = True,
    sink: Sink | str | os.PathLike[str] | None = None,
    budget: float | Budget | None = None,
    prices: Mapping[str, Price] | None = None,
    backend: str | RayBackend = "local",
) -> BatchResult[Any]:
    """Run ``prompt`` over every item at once, within limits; outputs in input order.

    Args:
        llm: the model (any :class:`fanflow.LLM`).
        prompt: a template (``"Summarize: {text}"``; ``{input}`` for plain-text items) or
            a callable that builds a :class:`fanflow.Request` (or prompt text) from an item.
        items: strings or dicts, as a sequence or a (async) iterator.
        concurrency: the most items in flight for this call (the handle's own limit
            still applies); None for the handle's limit alone.
        timeout: seconds per attempt (None: the handle's).
        deadline: seconds from now by which every item must end; items not done by
            then end as ``timed_out``.
        retry: the retry policy (None: the handle's, else the default).
        hedge_after: start a duplicate attempt after this many seconds (None: off).
        system: a system prompt for every request.
        temperature: sampling temperature for every request.
        max_tokens: output token limit for every request.
        seed: sampling seed for every request.
        parse: turns each response into its output (default: the response text). If it
            raises, that item fails with the reason.
        hooks: callables that receive each :mod:`event <fanflow.events>`.
        label: a label for every record (for reports and stores).
        fail_fast: all-or-nothing: the first failure cancels the other items and is
            raised. By default a failure is data (``result.errors``).
        store: a :class:`fanflow.Store`: each call is served from it when stored
            before (a cache hit, costing nothing), else committed to it before the
            item is reported.
        job: a name under which the store records each item's terminal status.
            Running the same job again resumes it: succeeded items come from the
            store, the rest run (after a crash too).
        only_failed: with ``job``, run only the items that failed before; succeeded
            items come from the store, items never started end as ``skipped``.
        cache: serve any request found in the store (False: call the model again,
            except for the job's own succeeded items).
        sink: stream each finished item to a file: a path (``.jsonl``, ``.parquet``)
            or a sink (:class:`fanflow.JsonlSink`, :class:`fanflow.ParquetSink`).
        budget: the most to spend on this call: dollars (a number) or a
            :class:`fanflow.Budget` (``Budget(tokens=...)``; share one between calls to
            cap a whole job). Each attempt reserves its expected cost first; items the
            budget cannot cover end as ``skipped`` with ``BudgetExceeded``.
        prices: model prices beyond the built-in table, ``{model: fanflow.Price}``.
        backend: where the calls run: ``"local"`` (this process's event loop) or
            ``"ray"`` / :class:`fanflow.RayBackend` (shards of items on Ray workers, each
            running this engine, under one cluster-wide limit per handle; needs
            ``pip install 'fanflow[ray]'``). The result is the same either way.

    Returns:
        A :class:`fanflow.BatchResult` with one record per item, in input order.
    """
    if resolve_backend(backend) is not None:
        from ..backends._ray import map_on_ray

        return await map_on_ray(
            backend,
            llm,
            prompt,
            items,
            concurrency=concurrency,
            timeout=timeout,
            deadline=deadline,
            retry=retry,
            hedge_after=hedge_after,
            system=system,
            params=_params(temperature=temperature, max_tokens=max_tokens, seed=seed),
            parse=parse or _text,
            hooks=hooks,
            label=label,
            fail_fast=fail_fast,
            durable=Durability.of(
                store=store, job=job, only_failed=only_failed, cache=cache, sink=sink
            ),
            budget=as_budget(budget),
            prices=prices,
        )
    loop = asyncio.get_running_loop()
    size = len(items) if isinstance(items, Sequence) else None
    opts = make_options(
        # Workers outnumber slots (see WORKERS_PER_SLOT): the gate bounds what is in flight.
        concurrency=concurrency,
        timeout=timeout,
        deadline=deadline,
        retry=retry,
        hedge_after=hedge_after,
        hooks=hooks,
        budget=as_budget(budget),
        prices=prices,
    )
    records: list[CallRecord[Any] | None] = [None] * size if size is not None else []

    def deliver(record: CallRecord[Any]) -> None:
        index = record.index
        assert index is not None
        while index >= len(records):
            records.append(None)
        records[index] = record

    start = loop.time()
    batch = _Batch[Any](
        llm,
        prompt,
        items,
        opts=opts,
        workers=_window(llm, concurrency, size),
        parse=parse or _text,
        deliver=deliver,
        system=system,
        params=_params(temperature=temperature, max_tokens=max_tokens, seed=seed),
        label=label,
        fail_fast=fail_fast,
        durable=Durability.of(
            store=store, job=job, only_failed=only_failed, cache=cache, sink=sink
        ),
        size=size,
    )
    await batch.run()
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:  # pragma: no cover - a broken promise, loudly
        raise FanflowError(f"internal error: items {missing[:10]} ended with no status")
    return BatchResult([r for r in records if r is not None], makespan=loop.time() - start)


class _Runs(Protocol):
    """What a result stream drives: a local ``_Batch`` or the Ray backend's batch."""

    workers: int

    async def run(self) -> None: ...


class ResultStream(Generic[T]):
    """Records of a batch as they complete (``async for record in stream``).

    Each record carries its item's ``index``. Use it as ``async with`` (or exhaust it):
    leaving the block early cancels the items still in flight and waits for them.
    """

    def __init__(self, make_batch: Callable[[Callable[[CallRecord[T]], Any]], _Runs]):
        self._make_batch = make_batch
        self._queue: asyncio.Queue[CallRecord[T] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return "fanflow.ResultStream()"

    def _start(self) -> None:
        batch = self._make_batch(self._put)
        self._queue = asyncio.Queue(maxsize=max(batch.workers, 1))
        self._task = asyncio.get_running_loop().create_task(self._produce(batch))

    async def _put(self, record: CallRecord[T]) -> None:
        assert self._queue is not None
        # asyncio.run's SIGINT handler (Python 3.11) runs between any two bytecodes: it
        # can cancel the consumer's getter inside Queue._wakeup_next, between its done()
        # check and set_result(), which then raises here. The record is already queued
        # and the consumer is being cancelled: nothing to undo (issue 13;
        # docs/decisions/0096-cli-ctrl-c-through-the-loop.md).
        with contextlib.suppress(asyncio.InvalidStateError):
            await self._queue.put(record)

    async def _produce(self, batch: _Runs) -> None:
        assert self._queue is not None
        try:
            await batch.run()
        finally:
            # Wake the consumer whatever happened; it re-raises the task's error.
            try:
                self._queue.put_nowait(None)
            except asyncio.QueueFull:
                self._queue.get_nowait()  # only after cancellation; the consumer left
                self._queue.put_nowait(None)

    def __aiter__(self) -> ResultStream[T]:
        return self

    async def __anext__(self) -> CallRecord[T]:
        if self._closed:
            raise StopAsyncIteration
        if self._task is None:
            self._start()
        assert self._queue is not None
        assert self._task is not None
        record = await self._queue.get()
        if record is None:
            self._closed = True
            await self._task  # re-raises the producer's error, if any
            raise StopAsyncIteration
        return record

    async def aclose(self) -> None:
        """Cancel the items still in flight and wait until they have stopped."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if _cancelling():  # we are being cancelled ourselves: pass it on
                    raise

    async def __aenter__(self) -> ResultStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def as_completed(
    llm: LLM,
    prompt: Prompt,
    items: Items,
    *,
    concurrency: int | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
    retry: RetryPolicy | None = None,
    hedge_after: float | None = None,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    parse: Callable[[Response], Any] | None = None,
    hooks: Sequence[Hook] = (),
    label: str | None = None,
    store: Store | None = None,
    job: str | None = None,
    only_failed: bool = False,
    cache: bool = True,
    sink: Sink | str | os.PathLike[str] | None = None,
    budget: float | Budget | None = None,
    prices: Mapping[str, Price] | None = None,
    backend: str | RayBackend = "local",
) -> ResultStream[Any]:
    """Like :func:`map`, but stream each item's record as soon as it ends.

    ``items`` may be an endless (async) iterator: items are pulled only as workers free
    up, and at most about twice the concurrency of records wait to be consumed.
    ``store``, ``job``, ``only_failed``, ``cache`` and ``sink`` are as for :func:`map`;
    a record is yielded only after it is committed to the store.
    ``budget``, ``prices`` and ``backend`` are as for :func:`map` (on Ray, records
    stream back from the workers as they finish).

    Returns:
        A :class:`ResultStream`; use ``async with fanflow.as_completed(...) as results:``
        then ``async for record in results:`` (``record.index``, ``record.value``).
    """
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}; use None for no limit")
    size = len(items) if isinstance(items, Sequence) else None
    durable = Durability.of(store=store, job=job, only_failed=only_failed, cache=cache, sink=sink)
    cap = as_budget(budget)
    if resolve_backend(backend) is not None:
        from ..backends._ray import RayMapBatch

        def make_ray_batch(deliver: Callable[[CallRecord[Any]], Any]) -> RayMapBatch:
            return RayMapBatch(
                backend,
                llm,
                prompt,
                items,
                deliver=deliver,
                concurrency=concurrency,
                timeout=timeout,
                deadline=deadline,
                retry=retry,
                hedge_after=hedge_after,
                system=system,
                params=_params(temperature=temperature, max_tokens=max_tokens, seed=seed),
                parse=parse or _text,
                hooks=hooks,
                label=label,
                fail_fast=False,
                durable=durable,
                budget=cap,
                prices=prices,
            )

        return ResultStream(make_ray_batch)

    def make_batch(deliver: Callable[[CallRecord[Any]], Any]) -> _Batch[Any]:
        opts = make_options(
            concurrency=concurrency,
            timeout=timeout,
            deadline=deadline,
            retry=retry,
            hedge_after=hedge_after,
            hooks=hooks,
            budget=cap,
            prices=prices,
        )
        return _Batch[Any](
            llm,
            prompt,
            items,
            opts=opts,
            workers=_window(llm, concurrency, size),
            parse=parse or _text,
            deliver=deliver,
            system=system,
            params=_params(temperature=temperature, max_tokens=max_tokens, seed=seed),
            label=label,
            fail_fast=False,
            durable=durable,
            size=size,
        )

    return ResultStream(make_batch)
