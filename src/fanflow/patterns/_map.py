"""Data-parallel map over items: ``map`` (in input order) and ``as_completed`` (streamed).

The patterns describe the batch (a :class:`~fanflow.backends._base.MapSpec`) and hand it
to the backend ``backend=`` names; the local backend (``backends/_local.py``) pulls
items lazily with a fixed set of workers, so memory grows with the concurrency, not
with the input (``as_completed``; ``map`` keeps one record per item).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import warnings
import weakref
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Unpack

from .._engine import CallOptions
from .._events import AMBIENT_HOOKS, observed
from .._exceptions import ConfigError, FanflowError
from .._llm import LLM
from .._progress import Tracker, displaying, size_of, with_progress
from .._types import CallRecord, MapResult, Request, Response
from .._util import given
from ..backends._base import Backend, Deliver, FirstCheck, Items, MapRun, MapSpec
from ..backends._batch import BatchOptions, Mode
from ..backends._batchrun import batch_backend
from ..backends._config import resolve_backend
from ._common import check_model
from ._options import Options, resolve
from ._priming import PRIME_MIN_ITEMS, should_prime
from ._prompt import (
    FIRST_ITEMS,
    Prompt,
    build_request,
    check_first_items,
    constant_metadata,
    parse_template,
)
from ._requests import ready_request

__all__ = ["ResultStream", "as_completed", "map"]

T = TypeVar("T")


def _text(response: Response) -> str:
    return response.text


@dataclass(frozen=True)
class _Template:
    """Builds one item's request from the prompt (pickles, for backends in other
    processes, as long as the prompt does). A template's requests carry its constant
    leading text and a key naming it (``fanflow._promptcache``), for the providers'
    prompt caches."""

    prompt: Prompt
    system: str | None
    params: dict[str, Any]

    @functools.cached_property
    def _metadata(self) -> dict[str, Any] | None:
        if not isinstance(self.prompt, str):
            return None
        return constant_metadata(self.prompt, self.system)

    def __call__(self, item: Any, index: int) -> Request:
        return build_request(
            self.prompt, item, index, system=self.system, params=self.params,
            metadata=self._metadata,
        )  # fmt: skip


def _first_check(prompt: Prompt) -> FirstCheck | None:
    """The check of the first items a template needs (None for a callable prompt)."""
    if not isinstance(prompt, str):
        return None
    return FirstCheck(FIRST_ITEMS, functools.partial(check_first_items, prompt))


def _priming(llm: LLM, build: _Template, prime: bool | None, name: str) -> FirstCheck | None:
    """How a map decides to prime (``prime=None``: the rule of ``patterns/_priming.py``;
    True: always; False: never)."""
    if prime is False:
        return None
    if prime is True:
        return FirstCheck(1, bool)  # any first item: prime
    return FirstCheck(
        PRIME_MIN_ITEMS + 1, functools.partial(should_prime, llm, build, pattern=name)
    )


def _backend(
    backend: str | Backend,
    mode: Mode,
    batch: BatchOptions | None,
    llm: LLM,
    options: CallOptions,
) -> Backend:
    """The backend ``backend=`` names, or the batch backend ``mode=`` asks for."""
    if mode == "realtime":
        return resolve_backend(backend)
    return batch_backend(mode, batch, backend, llm, options)


def _requests_or_items(
    name: str, prompt: Prompt | Items, items: Items | None, system: str | None
) -> tuple[Prompt, Items]:
    """The prompt and items of ``map(llm, prompt, items)``, or of ``map(llm, requests)``
    (ready-made requests, each sent as it is: :func:`ready_request` builds it)."""
    if items is not None:
        if not isinstance(prompt, str) and not callable(prompt):
            raise ConfigError(f"{name}(llm, prompt, items): the prompt must be a str or a callable")
        return prompt, items
    if isinstance(prompt, str) or callable(prompt):
        raise ConfigError(
            f"{name} needs items: {name}(llm, prompt, items), or {name}(llm, requests) with "
            "ready-made requests (fanflow.Request objects, chat-completions dicts, or "
            "fanflow.read_requests(path))"
        )
    if system is not None:
        raise ConfigError(
            f"{name}(llm, requests): system= applies to a template; ready-made requests "
            "carry their own system messages"
        )
    return ready_request, prompt


def _spec(
    name: str,
    llm: LLM,
    prompt: Prompt | Items,
    items: Items | None,
    options: Options,
    *,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
    parse: Callable[[Response], Any] | None,
    label: str | None,
    fail_fast: bool,
    only_failed: bool,
    prime: bool | None,
) -> MapSpec:
    """Check a map's arguments and describe it for a backend (``map``, ``as_completed``)."""
    o = resolve(name, options)
    check_model(llm, name)
    prompt, items = _requests_or_items(name, prompt, items, system)
    if isinstance(prompt, str):
        parse_template(prompt)  # a bad template fails here, before any call
    params = given(temperature=temperature, max_tokens=max_tokens, seed=seed)
    build = _Template(prompt, system, params)
    return MapSpec(
        llm=llm,
        build=build,
        items=items,
        parse=parse or _text,
        options=o.call,
        label=label,
        fail_fast=fail_fast,
        durable=o.durability(only_failed=only_failed),
        check_first=_first_check(prompt),
        prime=_priming(llm, build, prime, name),
    )


@with_progress
@observed("map")
async def map(
    llm: LLM,
    prompt: Prompt | Items,
    items: Items | None = None,
    *,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    parse: Callable[[Response], Any] | None = None,
    label: str | None = None,
    fail_fast: bool = False,
    only_failed: bool = False,
    backend: str | Backend = "local",
    mode: Mode = "realtime",
    batch: BatchOptions | None = None,
    progress: bool = False,
    prime: bool | None = None,
    **options: Unpack[Options],
) -> MapResult[Any]:
    """Run ``prompt`` over every item at once, within limits; outputs in input order.

    Args:
        llm: the model (any :class:`fanflow.LLM`).
        prompt: a template (``"Summarize: {text}"``; ``{input}`` for plain-text items) or
            a callable that builds a :class:`fanflow.Request` (or prompt text) from an item;
            or, with no ``items``, ready-made requests, each sent as it is:
            :class:`fanflow.Request` objects, chat-completions bodies (dicts with
            ``messages``) or :func:`fanflow.read_requests` of a file
            (``fanflow.map(llm, requests)``; ``temperature``, ``max_tokens`` and ``seed``
            then fill only what a request leaves out).
        items: strings or dicts, as a sequence or a (async) iterator.
        system: a system prompt for every request.
        temperature: sampling temperature for every request.
        max_tokens: output token limit for every request.
        seed: sampling seed for every request.
        parse: turns each response into its output (default: the response text). If it
            raises, that item fails with the reason.
        label: a label for every record (for reports and stores).
        fail_fast: all-or-nothing: the first failure cancels the other items and is
            raised. By default a failure is data (``result.errors``).
        only_failed: with ``job``, run only the items that failed before; succeeded
            items come from the store, items never started end as ``skipped``.
        backend: where the calls run: ``"local"`` (this process's event loop) or
            ``"ray"`` / :class:`fanflow.backends.RayBackend` (shards of items on Ray workers, each
            running this engine, under one cluster-wide limit per handle; needs
            ``pip install 'fanflow[ray]'``), or any :class:`fanflow.backends.Backend`.
            The result is the same either way.
        mode: ``"realtime"`` (one HTTP call per item), ``"batch"`` (through the
            provider's batch API at its batch price: OpenAI's Batch API, Anthropic's
            Message Batches; ``record.batch_id`` names the batch) or ``"auto"``
            (batches, and what is still unanswered as ``deadline`` nears goes in real
            time, within the handle's limits). ``timeout`` and ``concurrency`` then
            apply to the real-time calls only. Shorthand for
            ``backend=fanflow.backends.BatchBackend(mode, batch)``.
        batch: how batches are sized and polled (:class:`fanflow.backends.BatchOptions`).
        prime: send the first item alone and the others once it is done, so they read
            the prompt prefix it put in the provider's cache. None (the default):
            when there are more than 8 items and their requests share a prefix the
            model caches (OpenAI; Anthropic with the handle's ``cache_control``); True:
            always; False: never. Real-time calls only (not ``mode="batch"``).
        **options: the call options (:class:`fanflow.Options`): ``concurrency`` is the
            most items in flight; ``deadline`` ends the items not done by then as
            ``timed_out``; with ``store`` each item's call is committed before it is
            reported; with ``job`` (and ``store``) running the same job again resumes
            it; ``sink`` streams each finished item to a file; items the ``budget``
            cannot cover end ``skipped``.

    Returns:
        A :class:`fanflow.MapResult` with one record per item, in input order.
    """
    spec = _spec(
        "map", llm, prompt, items, options, system=system, temperature=temperature,
        max_tokens=max_tokens, seed=seed, parse=parse, label=label, fail_fast=fail_fast,
        only_failed=only_failed, prime=prime if mode == "realtime" else False,
    )  # fmt: skip
    runner = _backend(backend, mode, batch, llm, spec.options)
    loop = asyncio.get_running_loop()
    size = spec.size
    records: list[CallRecord[Any] | None] = [None] * size if size is not None else []

    def deliver(record: CallRecord[Any]) -> None:
        index = record.index
        assert index is not None
        while index >= len(records):
            records.append(None)
        records[index] = record

    run = runner.map_run(spec, deliver)
    start = loop.time()
    await run.run()
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:  # pragma: no cover - a broken promise, loudly
        raise FanflowError(f"internal error: items {missing[:10]} ended with no status")
    return MapResult([r for r in records if r is not None], makespan=loop.time() - start)


class _Producer(Generic[T]):
    """The running half of a result stream: the batch's task and the queue it fills.

    Kept apart from :class:`ResultStream` so the task holds no reference to the
    stream's iterator: an iterator the caller abandoned is freed at once and its
    ``finally`` stops the task (see :meth:`ResultStream.__aiter__`).
    """

    def __init__(self, make_run: Callable[[Deliver], MapRun]) -> None:
        run = make_run(self.put)
        self.queue: asyncio.Queue[CallRecord[T] | None] = asyncio.Queue(maxsize=max(run.workers, 1))
        self.task = asyncio.get_running_loop().create_task(self._produce(run))

    async def put(self, record: CallRecord[T]) -> None:
        # A Ctrl-C through asyncio.run's SIGINT handler can cancel the consumer's getter
        # mid-wakeup, and this put then raises: the record is already queued and the
        # consumer is being cancelled, so nothing to undo (decision 0096).
        with contextlib.suppress(asyncio.InvalidStateError):
            await self.queue.put(record)

    @observed("as_completed")
    async def _produce(self, run: MapRun) -> None:
        try:
            await run.run()
        finally:
            # Wake the consumer whatever happened; it re-raises the task's error.
            try:
                self.queue.put_nowait(None)
            except asyncio.QueueFull:
                self.queue.get_nowait()  # only after cancellation; the consumer left
                self.queue.put_nowait(None)

    async def stop(self) -> None:
        """Cancel the items still in flight and wait until they have stopped."""
        task = self.task
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if _cancelling():  # we are being cancelled ourselves: pass it on
                    raise


class ResultStream(Generic[T]):
    """Records of a batch as they complete.

    Use it as a context manager, as aiometer's ``amap`` is used::

        async with fanflow.as_completed(llm, prompt, items) as results:
            async for record in results:
                ...

    Each record carries its item's ``index``. Leaving the block, early or by an error,
    cancels the items still in flight and waits until they have stopped. Iterating
    without ``async with`` is deprecated: it still works, and an iterator left early
    (``break``) stops its items as soon as it is dropped, but nothing waits for them.
    """

    def __init__(
        self,
        make_run: Callable[[Deliver], MapRun],
        *,
        progress: bool = False,
        total: int | None = None,
    ):
        self._make_run = make_run
        self._progress = progress
        self._total = total
        self._producer: _Producer[T] | None = None
        # The iterator handed out. Inside ``async with`` the stream holds it, so that
        # leaving the block closes it here and waits; outside, only weakly: the
        # iterator's frame holds the stream, and a strong reference back would keep an
        # abandoned iterator alive until a GC cycle instead of closing it at once.
        self._iterator: AsyncGenerator[CallRecord[T], None] | None = None
        self._iterator_ref: weakref.ref[AsyncGenerator[CallRecord[T], None]] | None = None
        self._entered = False
        self._closed = False

    def __repr__(self) -> str:
        return "fanflow.results.ResultStream()"

    def __aiter__(self) -> AsyncGenerator[CallRecord[T], None]:
        if self._iterator_ref is not None and not self._closed:
            raise FanflowError(
                "a fanflow.results.ResultStream can be iterated only once; call "
                "fanflow.as_completed(...) again for a second run"
            )
        if not self._entered:
            warnings.warn(
                "iterating fanflow.as_completed(...) outside 'async with' is deprecated and "
                "will be removed in the next release: write 'async with "
                "fanflow.as_completed(...) as results: async for record in results: ...' "
                "so that leaving the loop early waits for the calls in flight to stop",
                DeprecationWarning,
                stacklevel=2,
            )
        iterator = self._records()
        self._iterator_ref = weakref.ref(iterator)
        if self._entered:
            self._iterator = iterator
        return iterator

    async def _records(self) -> AsyncGenerator[CallRecord[T], None]:
        # An async generator: when the caller drops it early (outside ``async with``),
        # the event loop closes it (asyncio's async-generator finalizer) and ``finally``
        # cancels the items in flight. The producer task holds only its queue, never
        # this generator, so dropping it is enough.
        if self._closed:
            return
        async with contextlib.AsyncExitStack() as stack:
            hooks: tuple[Tracker, ...] = ()
            if self._progress and not AMBIENT_HOOKS.get():
                # Shown for the stream's lifetime. Only the producer's task (which
                # copies the context when it is made) reports to it: the caller's own
                # calls between records are not the stream's.
                hooks = (await stack.enter_async_context(displaying(total=self._total)),)
            token = AMBIENT_HOOKS.set((*AMBIENT_HOOKS.get(), *hooks))
            try:
                producer = self._producer = _Producer[T](self._make_run)
            finally:
                AMBIENT_HOOKS.reset(token)
            try:
                while True:
                    record = await producer.queue.get()
                    if record is None:
                        self._closed = True
                        await producer.task  # re-raises the producer's error, if any
                        return
                    yield record
            finally:
                await producer.stop()

    async def aclose(self) -> None:
        """Cancel the items still in flight and wait until they have stopped."""
        self._closed = True
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            await iterator.aclose()  # its ``finally`` stops the producer
        if self._producer is not None:
            await self._producer.stop()

    async def __aenter__(self) -> ResultStream[T]:
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def as_completed(
    llm: LLM,
    prompt: Prompt | Items,
    items: Items | None = None,
    *,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    parse: Callable[[Response], Any] | None = None,
    label: str | None = None,
    only_failed: bool = False,
    backend: str | Backend = "local",
    mode: Mode = "realtime",
    batch: BatchOptions | None = None,
    progress: bool = False,
    prime: bool | None = None,
    **options: Unpack[Options],
) -> ResultStream[Any]:
    """Like :func:`map`, but stream each item's record as soon as it ends.

    ``items`` may be an endless (async) iterator: items are pulled only as workers free
    up, and at most about twice the concurrency of records wait to be consumed.
    The arguments are those of :func:`map` (``prime`` too) but ``fail_fast``, and the
    same call options (:class:`fanflow.Options`), and ``progress=True`` shows the
    stream's calls live from its first record until it is closed; a record is yielded
    only after it is committed to the store (on Ray, records stream back from the
    workers as they finish; with ``mode`` ``"batch"``/``"auto"``, as their batches land).

    Returns:
        A :class:`ResultStream`; use ``async with fanflow.as_completed(...) as results:``
        then ``async for record in results:`` (``record.index``, ``record.value``).
    """
    spec = _spec(
        "as_completed", llm, prompt, items, options, system=system, temperature=temperature,
        max_tokens=max_tokens, seed=seed, parse=parse, label=label, fail_fast=False,
        only_failed=only_failed, prime=prime if mode == "realtime" else False,
    )  # fmt: skip
    runner = _backend(backend, mode, batch, llm, spec.options)

    def make_run(deliver: Deliver) -> MapRun:
        return runner.map_run(spec, deliver)

    return ResultStream(make_run, progress=progress, total=size_of(spec.items))
