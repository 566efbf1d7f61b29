"""The local backend: a map's items on this event loop (the default, ``backend="local"``).

It also holds the machinery the other backends reuse: :class:`Source` hands out
(index, item) pairs lazily, :func:`crew_size` says how many workers a map runs, a
:class:`Crew` (the map's workers) runs items to records, and :class:`FailFast` stops a
map at the first failure. The Ray backend runs a ``Crew`` in each worker process (its
``run_item``) and feeds it shards pulled from a ``Source`` on the driver. ("Batch" in
fanflow means a provider's batch API: ``backends/_batch*.py``.)

Items are pulled lazily by a fixed set of workers, as many as the concurrency allows,
so an iterator of a million items is never materialised: memory grows with the
concurrency, not with the input.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from .._durable import Durability, Learning
from .._engine import CallOptions, execute
from .._events import CallEnded, emit
from .._gc import batch_gc
from .._limits import DEFAULT_CONCURRENCY
from .._llm import LLM, BaseLLM
from .._promptcache import PREFILLED
from .._types import CallRecord, Request, Response, Status
from ._base import Deliver, FirstCheck, Items, MapSpec, PoolDeliver, PoolMoved, PoolSpec

__all__ = [
    "LOCAL",
    "WORKERS_PER_SLOT",
    "Crew",
    "FailFast",
    "LocalBackend",
    "Source",
    "crew_size",
]

T = TypeVar("T")

# Workers per concurrency slot. Slots are taken per attempt (the pattern's gate, the
# handle's lane), so an item waiting out a backoff holds its worker but not its slot; the
# spare workers pull the next items meanwhile and the slot does not sit idle. Memory stays
# proportional to the concurrency.
WORKERS_PER_SLOT = 2


def crew_size(llm: LLM, concurrency: int | None, size: int | None) -> int:
    """How many workers a map runs: twice the concurrency, at most one per item. With
    no concurrency limit anywhere (neither the call's nor the handle's), the default
    concurrency, so an unbounded iterator cannot exhaust memory."""
    if concurrency is not None:
        n = concurrency * WORKERS_PER_SLOT
    elif isinstance(llm, BaseLLM) and llm.limits.concurrency is not None:
        # With limits per model (decision 0290): room for each named model's slots.
        caps = [x.concurrency for x in llm.model_limits.values()] or [llm.limits.concurrency]
        n = DEFAULT_CONCURRENCY if None in caps else sum(c or 0 for c in caps) * WORKERS_PER_SLOT
    else:
        n = DEFAULT_CONCURRENCY
    if size is not None:
        n = min(n, max(size, 1))
    return n


class Source:
    """Hands out (index, item) pairs from a sync or async iterable, one at a time."""

    __slots__ = ("_ait", "_drained", "_index", "_it", "_lock", "_peeked")

    def __init__(self, items: Items) -> None:
        self._index = 0
        self._drained = False
        self._it: Any = None
        self._ait: AsyncIterator[Any] | None = None
        self._lock: asyncio.Lock | None = None
        self._peeked: deque[Any] = deque()  # async items read ahead by peek()
        if isinstance(items, AsyncIterable):
            self._ait = aiter(items)
            # An async generator may not be advanced by two workers at once.
            self._lock = asyncio.Lock()
        else:
            self._it = iter(items)

    @property
    def is_async(self) -> bool:
        return self._ait is not None

    async def peek(self, n: int) -> list[Any]:
        """The first ``n`` items (fewer if there are fewer), still to be handed out."""
        if self._ait is None:
            first = list(itertools.islice(self._it, n))
            self._it = itertools.chain(first, self._it)
            return first
        peeked = self._peeked
        while len(peeked) < n:
            try:
                peeked.append(await anext(self._ait))
            except StopAsyncIteration:
                break
        return list(peeked)

    def next_sync(self) -> tuple[int, Any] | None:
        """The next item of a sync iterable (no coroutine: this is the hot path)."""
        try:
            item = next(self._it)
        except StopIteration:
            self._drained = True
            return None
        index = self._index
        self._index += 1
        return index, item

    async def next(self) -> tuple[int, Any] | None:
        if self._ait is None:
            return self.next_sync()
        assert self._lock is not None
        async with self._lock:
            if self._peeked:
                item = self._peeked.popleft()
            else:
                try:
                    item = await anext(self._ait)
                except StopAsyncIteration:
                    self._drained = True
                    return None
        index = self._index
        self._index += 1
        return index, item

    @property
    def seen(self) -> int:
        """How many items were handed out."""
        return self._index

    def drained(self) -> bool:
        """Whether the last item was handed out: the map's tail, where every item is
        started and the map only waits for its slowest (``Run.drained``)."""
        return self._drained


class FailFast(Exception):
    """Raised by a worker to stop its map at the first record that did not succeed."""

    def __init__(self, record: CallRecord[Any]) -> None:
        super().__init__(record)
        self.record = record


class Crew(Generic[T]):
    """Workers that pull items, run each as a call, and deliver its record."""

    def __init__(
        self,
        llm: LLM,
        build: Callable[[Any, int], Request],
        items: Items,
        *,
        options: CallOptions,
        workers: int,
        parse: Callable[[Response], T],
        deliver: Deliver,
        label: str | None,
        fail_fast: bool,
        durable: Durability | None = None,
        size: int | None = None,
        check_first: FirstCheck | None = None,
        prime: FirstCheck | None = None,
    ) -> None:
        self.llm = llm
        self.build = build
        self.source = Source(items)
        # The run starts now: its gate, its deadline, its budget cap.
        self.opts = options.start(drained=self.source.drained)
        self.workers = workers
        self.parse = parse
        self.deliver = deliver
        self.label = label
        self.fail_fast = fail_fast
        self.durable = durable
        self.size = size
        self.check_first = check_first
        self.prime = prime
        self.primed = False  # set by run(): the first item goes alone

    @property
    def seen(self) -> int:
        return self.source.seen

    async def run(self) -> None:
        if self.check_first is not None:
            # Before the first call: a field that none of the first items has is a
            # mistake in the template (TemplateError), not one failure per item.
            self.check_first.check(await self.source.peek(self.check_first.count))
        if self.prime is not None:
            self.primed = bool(self.prime.check(await self.source.peek(self.prime.count)))
        if self.durable is None:
            await self._run()
        else:
            await self.durable.around(self._run, self.size, (self.llm,))

    async def _run(self) -> int:
        try:
            with batch_gc():
                async with asyncio.TaskGroup() as tg:
                    if self.primed:
                        tg.create_task(self._worker(primer=tg))
                    else:
                        for _ in range(self.workers):
                            tg.create_task(self._worker())
        except BaseExceptionGroup as group:
            # Re-raise the one meaningful error (fail-fast, or the item iterator's own).
            errors = group.exceptions
            first = next((e for e in errors if isinstance(e, FailFast)), errors[0])
            if isinstance(first, FailFast) and first.record.error is not None:
                raise first.record.error from None
            raise first from None
        return self.source.seen

    async def _worker(self, primer: asyncio.TaskGroup | None = None) -> None:
        """Run items until there are none. The ``primer`` (a primed map's one worker)
        runs the first item alone, so its prompt's prefix enters the provider's cache,
        then starts the other workers in that task group."""
        source = self.source
        is_async = source.is_async
        while True:
            got = await source.next() if is_async else source.next_sync()
            if got is None:
                return
            index, item = got
            if primer is None:
                record = await self.run_item(index, item)
            else:
                record = await self._first(index, item, primer)
                primer = None
            if self.durable is not None:
                self.durable.emit(record, item)
            delivered = self.deliver(record)
            if delivered is not None:
                await delivered
            if self.fail_fast and record.status is not Status.SUCCEEDED:
                raise FailFast(record)

    async def _first(self, index: int, item: Any, tg: asyncio.TaskGroup) -> CallRecord[T]:
        """A primed map's first item; the other workers start in ``tg`` when its
        streamed reply's first text arrives (the prompt is read), else when it ends."""
        started = False
        outer = contextvars.copy_context()  # the workers' context: without PREFILLED set

        def release() -> None:
            nonlocal started
            if not started:
                started = True
                for _ in range(self.workers - 1):
                    tg.create_task(self._worker(), context=outer.copy())

        token = PREFILLED.set(release)
        try:
            record = await self.run_item(index, item)
        finally:
            PREFILLED.reset(token)
        release()
        return record

    def run_item(self, index: int, item: Any) -> Awaitable[CallRecord[T]]:
        """Run one item to its record (committed to the store first, if there is one).

        Not ``async def``: the common case hands back ``execute``'s coroutine itself, one
        frame fewer per item in flight. Await the result.
        """
        try:
            request = self.build(item, index)
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


class LocalBackend:
    """Runs a map's items on the caller's event loop (``backend="local"``)."""

    def __repr__(self) -> str:
        return "fanflow.backends.LocalBackend()"

    def map_run(self, spec: MapSpec, deliver: Deliver) -> Crew[Any]:
        size = spec.size
        return Crew[Any](
            spec.llm,
            spec.build,
            spec.items,
            # Workers outnumber slots (see WORKERS_PER_SLOT): the run's gate bounds what
            # is in flight.
            options=spec.options,
            workers=crew_size(spec.llm, spec.options.concurrency, size),
            parse=spec.parse,
            deliver=deliver,
            label=spec.label,
            fail_fast=spec.fail_fast,
            durable=spec.durable,
            size=size,
            check_first=spec.check_first,
            prime=spec.prime,
        )

    async def run_pool(self, spec: PoolSpec, deliver: PoolDeliver, on_step: PoolMoved) -> None:
        queue = iter(spec.todo)

        async def worker() -> None:
            for index, item in queue:

                def moved(step: str, started: bool, index: int = index) -> None:
                    on_step(index, step, started)

                result = await spec.runner.execute(
                    item,
                    index=index,
                    hooks=spec.hooks,
                    on_step=moved,
                    enclosing=spec.enclosing(index),
                )
                await deliver(index, result)

        # The skills' lanes start from what the job's store kept (decision 0282).
        learning = None if spec.store is None else await Learning.start(spec.store, spec.learn)
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(spec.max_flows, len(spec.todo))):
                    tg.create_task(worker())
        finally:
            if learning is not None:
                await learning.keep()


# The one local backend: it holds no state, so every map may share it.
LOCAL = LocalBackend()
