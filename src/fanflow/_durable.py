"""Durability, in one place: calls served from a store or committed to it first, and a
batch's store, job and sink.

This is the layer between the engine and the patterns. It knows a store only by the
protocols of ``fanflow.store`` (:class:`~fanflow.store.ResultStore`,
:class:`~fanflow.store.JobStore`; ``fanflow.Store`` is the SQLite implementation) and
wraps :func:`fanflow._engine.execute` with two steps:

1. before the call, look the request up by its *cache key*; a hit becomes a record with
   ``cached=True`` that costs nothing (no attempt, no tokens, no admission slot);
2. after the call, commit its response (and the item's terminal status, for a job)
   and only then return the record: what the caller saw, the store has (promise 5).

Every pattern that takes ``store=`` calls :func:`execute_stored` instead of ``execute``.
Patterns and backends that run items (``map``, ``as_completed``, ``Pool``, ``fan_out``)
hand each item to :meth:`Durability.run`: it decides whether the item's call may be
served from the store (a succeeded item of the same job always is; any other item when
``cache=True``), runs the rest through :func:`execute_stored`, and streams each finished
item to the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from ._engine import Run, execute, parsed
from ._events import CallEnded, emit
from ._exceptions import ConfigError, Skipped, StoreError
from ._llm import LLM, BaseLLM
from ._shared import identity
from ._shared._capacity import KEEP
from ._types import CallRecord, Request, Response, Status, Usage
from .store import ItemRef, JobStore, ResultStore, Sink, sink_for

__all__ = [
    "CACHE_KEY_VERSION",
    "Durability",
    "cache_identity",
    "cache_key",
    "cached_record",
    "execute_stored",
    "input_id",
]

log = logging.getLogger("fanflow")

T = TypeVar("T")


#: Bumped whenever what goes into a cache key changes: entries stored under an older
#: version are never served (they stay in the file, unused; docs/decisions/0090).
CACHE_KEY_VERSION = 2


def cache_identity(llm: LLM) -> dict[str, Any]:
    """The handle's :meth:`~fanflow.BaseLLM.cache_identity` (or, for an LLM that has
    none, its class, ``model`` and ``name``)."""
    method = getattr(llm, "cache_identity", None)
    if callable(method):
        identity = method()
        if isinstance(identity, dict):
            return identity
    cls = type(llm)
    return {
        "protocol": f"{cls.__module__}.{cls.__qualname__}",
        "model": getattr(llm, "model", None),
        "name": getattr(llm, "name", None),
    }


def cache_key(llm: LLM, request: Request) -> str:
    """The key a request's result is stored under.

    A stored answer is served only for the same request to the same endpoint: the key
    hashes the key version, the handle's :func:`cache_identity` (protocol, normalised
    base URL, model, the handle's answer-changing options; never the API key) and
    ``request.key`` (the request's canonical form after the handle filled its defaults:
    messages, model, every sampling parameter, the sample salt). Only the hash is
    stored. See ``docs/decisions/0090-cache-identity.md``.
    """
    identity = json.dumps(cache_identity(llm), sort_keys=True, separators=(",", ":"), default=repr)
    blob = f"fanflow-cache-v{CACHE_KEY_VERSION}\n{identity}\n{request.key}".encode()
    return hashlib.sha256(blob).hexdigest()


def cached_record(
    request: Request,
    response: Response,
    *,
    parse: Callable[[Response], T] | None,
    index: int | None,
    label: str | None,
    opts: Run,
) -> CallRecord[T]:
    """The record of a call served from the store: no attempts, no usage, no cost."""
    now = asyncio.get_running_loop().time()
    who = f"item {index}" if index is not None else "the call"
    status, value, error = parsed(
        response,
        parse,
        lambda exc: (
            f"{who}: the stored reply could not be used: {type(exc).__name__}: {exc}; "
            "fix the parser, or pass cache=False to ask the model again"
        ),
    )
    record: CallRecord[T] = CallRecord(
        status=status,
        request=request,
        value=value,
        error=error,
        start=now,
        end=now,
        usage=Usage(),
        cost=0.0,
        label=label,
        index=index,
        response=response,
        cached=True,
    )
    if opts.hooks:
        emit(opts.hooks, CallEnded(now, record))
    return record


async def execute_stored(
    llm: LLM,
    request: Request,
    opts: Run,
    *,
    store: ResultStore | None,
    index: int | None = None,
    label: str | None = None,
    parse: Callable[[Response], T] | None = None,
    reuse: bool = True,
    item: ItemRef | None = None,
) -> CallRecord[T]:
    """Like :func:`fanflow._engine.execute`, with a result store.

    Args:
        llm: the model.
        request: the request (the handle's defaults are filled in first).
        opts: the pattern's options.
        store: where results are looked up and committed (None: plain ``execute``).
        index: the item index, for records, events and messages.
        label: a free-form label for records and events.
        parse: turns the response into the record's value.
        reuse: serve a stored response when there is one (False: call the model
            anyway, and store the new response).
        item: the job item this call belongs to; its terminal status is committed in
            the same transaction as the response.

    Returns:
        The call's record, returned only after it is committed.

    Raises:
        StoreError: the store could not be read or written (the call's result is then
            not reported, as it could not be kept).
    """
    if store is None:
        return await execute(llm, request, opts, index=index, label=label, parse=parse)
    if isinstance(llm, BaseLLM):
        request = llm.prepare(request)
    keys = _cache_keys(llm, request)
    if reuse:
        for key in keys:
            response = store.lookup(key)
            if response is not None:
                hit: CallRecord[T] = cached_record(
                    request, response, parse=parse, index=index, label=label, opts=opts
                )
                if item is not None:
                    await store.save(hit, key=key, item=item)
                return hit
    record = await execute(llm, request, opts, index=index, label=label, parse=parse)
    if record.response is not None or item is not None:
        await store.save(record, key=_answer_key(llm, record, keys[0]), item=item)
    return record


def _cache_keys(llm: LLM, request: Request) -> list[str]:
    """The keys an answer to ``request`` may be stored under: one per deployment of a
    router (``fanflow.router``: any of them may answer), else the handle's own."""
    choices = getattr(llm, "cache_choices", None)
    if callable(choices):
        return [cache_key(one, prepared) for one, prepared in choices(request)]
    return [cache_key(llm, request)]


def _answer_key(llm: LLM, record: CallRecord[Any], default: str) -> str:
    """The key an answer is stored under: a router's answering deployment's own."""
    answered_by = getattr(llm, "answered_by", None)
    if callable(answered_by) and record.request is not None:
        answered = answered_by(record)
        if answered is not None:  # the key its lookup uses (Router.cache_choices)
            return cache_key(answered, answered.prepare(record.request))
    return default


def input_id(item: Any, index: int) -> Any:
    """An item's id for sinks and stores: its ``id`` field if it has one (a request
    line's ``custom_id``), else its index."""
    if isinstance(item, Mapping) and "id" in item:
        return item["id"]
    custom_id = getattr(item, "custom_id", None)  # a fanflow.read_requests line
    return index if custom_id is None else custom_id


class Learning:
    """Capacity learnt once, in a job's store (issue 27 part 2; decision 0282 keeps it in a
    shared store): the lanes of a job's handles that name no shared store start from what
    the job's last run learnt of their server, and keep there what this run learnt."""

    __slots__ = ("lanes", "store")

    def __init__(self, store: Any, lanes: list[tuple[Any, str]]) -> None:
        self.store = store
        self.lanes = lanes  # (lane, limit identity)

    @classmethod
    async def start(cls, store: JobStore, models: Sequence[LLM]) -> Learning | None:
        if not models or not callable(getattr(store, "read_capacity", None)):
            return None  # a store of the user's own that keeps no capacity
        lanes = []
        for handle, ident in learners(models):
            lane = handle.lane()
            found = await cls.found(store, ident)
            if found is not None:
                lane.start_from(*found)
            lanes.append((lane, ident))
        return cls(store, lanes)

    @staticmethod
    async def found(store: Any, ident: str) -> tuple[dict[str, float], float] | None:
        """What ``store`` kept of the server under ``ident``, and how long ago; None
        when it keeps nothing, nothing fresh (stale knowledge ages out), or a row it
        cannot read (said, and the run starts from nothing)."""
        if not callable(getattr(store, "read_capacity", None)):
            return None
        try:
            found: tuple[dict[str, float], float] | None = await store.read_capacity(ident)
        except (StoreError, ValueError, TypeError) as exc:
            log.warning("fanflow: what the store kept of the server was not read: %s", exc)
            return None
        return found if found is not None and found[1] < KEEP else None

    async def keep(self) -> None:
        for lane, ident in self.lanes:
            learnt = lane.learnt()
            if learnt:
                with contextlib.suppress(StoreError):  # the run's outcome matters more
                    await self.store.keep_capacity(ident, learnt)


def learners(models: Sequence[LLM]) -> list[tuple[BaseLLM, str]]:
    """The handles of ``models`` whose lanes meet a server and learn what a job's store
    keeps, each once, with its limit identity."""
    handles = {id(h): h for m in models for h in _leaves(m)}
    return [(handle, identity(handle)[0]) for handle in handles.values()]


def _leaves(llm: LLM) -> list[BaseLLM]:
    """The handles whose lanes meet a server: a router's or a cascade's own handles, and
    none whose limits are shared (their shared store keeps what they learn)."""
    if not isinstance(llm, BaseLLM):
        return []
    if llm.routed:
        return [leaf for h in getattr(llm, "handles", ()) for leaf in _leaves(h)]
    return [] if llm.limits.shared is not None else [llm]


class Durability:
    """The store, job and sink of one batch.

    Args:
        store: the result store (None: nothing is stored).
        job: the job name under which items' statuses are recorded (needs ``store``).
        only_failed: run only the items that did not succeed in the job's last runs;
            succeeded items come from the store, never-started ones are skipped.
        cache: serve any request found in the store (False: only the job's own
            succeeded items are reused; other calls go to the model).
        sink: where finished items are streamed (a path or a sink).
    """

    def __init__(
        self,
        *,
        store: JobStore | None,
        job: str | None,
        only_failed: bool,
        cache: bool,
        sink: Sink | str | os.PathLike[str] | None,
    ) -> None:
        if job is not None and store is None:
            raise ConfigError(
                f"job={job!r} needs a store to record its items; pass "
                "store=fanflow.Store() (the default file is .fanflow/store.db)"
            )
        if job is not None and not job:
            raise ConfigError("job must be a non-empty name, got ''")
        if only_failed and job is None:
            raise ConfigError(
                "only_failed=True needs job= (and store=): it re-runs the failed items of that job"
            )
        self.store = store
        self.job = job
        self.only_failed = only_failed
        self.cache = cache
        self.sink = sink_for(sink) if sink is not None else None
        self.prior: dict[int, tuple[Status, str | None]] = {}
        self._prior_by_id: dict[str, tuple[Status, str | None]] | None = None
        self.finished = 0

    @classmethod
    def of(
        cls,
        *,
        store: JobStore | None,
        job: str | None,
        only_failed: bool,
        cache: bool,
        sink: Sink | str | os.PathLike[str] | None,
    ) -> Durability | None:
        """The batch's durability, or None when it has no store, job or sink."""
        if store is None and job is None and sink is None and not only_failed:
            return None
        return cls(store=store, job=job, only_failed=only_failed, cache=cache, sink=sink)

    async def around(
        self, run: Callable[[], Awaitable[int]], total: int | None, models: Sequence[LLM] = ()
    ) -> None:
        """Run the batch (``run`` returns how many inputs it saw) within this job; the
        lanes of ``models`` start from what the job's store kept of their server, and
        keep there what they learnt (:class:`Learning`)."""
        store, job = self.store, self.job
        # One run of a job at a time (two would both call the model for every item):
        # a second run is refused here, before any call, naming the process running it.
        lock = store.lock_job(job) if store is not None and job is not None else None
        learning = None
        try:
            if store is not None and job is not None:
                self.prior = await store.start_job(job, total)
                learning = await Learning.start(store, models)
            if self.sink is not None:
                self.sink.open()
            try:
                seen = await run()
            except (asyncio.CancelledError, KeyboardInterrupt):
                self._interrupted()
                raise
            finally:
                if self.sink is not None:
                    self.sink.close()
            if store is not None and job is not None:
                await store.finish_job(job, seen)
        finally:
            if learning is not None:
                await learning.keep()
            if lock is not None:
                lock.release()

    def _interrupted(self) -> None:
        if self.store is None or self.job is None:
            return
        log.warning(
            "fanflow: job %r was interrupted; %d items finished in this run and are saved "
            "in %s. To resume, run it again with the same job= and store= (finished items "
            "are not repeated); only_failed=True re-runs just the failures.",
            self.job,
            self.finished,
            self.store.location,
        )

    async def run(
        self,
        llm: LLM,
        request: Request,
        opts: Run,
        *,
        index: int,
        item: Any,
        label: str | None,
        parse: Callable[[Response], T],
    ) -> CallRecord[T]:
        """Run one item: from the store if it may be reused, else through the engine."""
        prior = self._prior_of(index, item)
        succeeded_before = prior is not None and prior[0] is Status.SUCCEEDED
        if self.only_failed and prior is None:
            now = asyncio.get_running_loop().time()
            return CallRecord(
                status=Status.SKIPPED,
                request=request,
                error=Skipped(
                    f"item {index} was not run: only_failed=True runs only the items of job "
                    f"{self.job!r} that failed before; run without only_failed to run the rest"
                ),
                start=now,
                end=now,
                label=label,
                index=index,
            )
        return await execute_stored(
            llm,
            request,
            opts,
            store=self.store,
            index=index,
            label=label,
            parse=parse,
            reuse=self.cache or succeeded_before,
            item=self._ref(index, item),
        )

    def _prior_of(self, index: int, item: Any) -> tuple[Status, str | None] | None:
        """The item's status in the job's earlier runs: found by its position, or for a
        request line (``fanflow.read_requests``) by its ``custom_id``, wherever it is
        now in the file."""
        custom_id = getattr(item, "custom_id", None)
        if custom_id is None or self.store is None or self.job is None:
            return self.prior.get(index)
        if self._prior_by_id is None:  # read once, at the first such item
            self._prior_by_id = {
                i.input_id: (i.status, i.key)
                for i in self.store.items(self.job)
                if i.input_id is not None
            }
        return self._prior_by_id.get(str(custom_id))

    def _ref(self, index: int, item: Any) -> ItemRef | None:
        if self.job is None:
            return None
        ident = input_id(item, index)
        return ItemRef(self.job, index, None if ident is None else str(ident))

    async def settle(self, record: CallRecord[Any], item: Any) -> None:
        """Record the status of an item that made no call (its input was bad)."""
        assert record.index is not None
        ref = self._ref(record.index, item)
        if ref is not None and self.store is not None:
            await self.store.save_item(record, ref)

    def emit(self, record: CallRecord[Any], item: Any) -> None:
        """Stream a finished (and committed) item to the sink."""
        if record.status is Status.SUCCEEDED:
            self.finished += 1
        if self.sink is not None:
            assert record.index is not None
            self.sink.write(record, input_id(item, record.index))
