"""Durable calls: serve a request from a result store, or run it and commit it first.

This is the engine's seam to persistence. It knows a store only by the
:class:`ResultStore` protocol (``fanflow.Store`` is the SQLite implementation), and wraps
:func:`fanflow._engine.execute` with two steps:

1. before the call, look the request up by its *cache key*; a hit becomes a record with
   ``cached=True`` that costs nothing (no attempt, no tokens, no admission slot);
2. after the call, commit its response (and the item's terminal status, for a job)
   and only then return the record: what the caller saw, the store has (promise 5).

Every pattern that takes ``store=`` calls :func:`execute_stored` instead of ``execute``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from ._engine import CallOptions, execute
from ._events import CallEnded, emit
from ._exceptions import ParseError
from ._llm import LLM, BaseLLM
from ._types import CallRecord, Request, Response, Status, Usage

__all__ = [
    "ItemRef",
    "ResultStore",
    "cache_key",
    "cached_record",
    "execute_stored",
    "namespace_of",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ItemRef:
    """Which job item a call belongs to, so its terminal status is committed with it."""

    job: str
    index: int
    input_id: str | None = None


@runtime_checkable
class ResultStore(Protocol):
    """What the engine needs of a result store (``fanflow.Store`` implements it)."""

    def lookup(self, key: str) -> Response | None:
        """The stored response for a cache key, or None."""
        ...

    async def save(self, record: CallRecord[Any], *, key: str, item: ItemRef | None) -> None:
        """Commit ``record``'s response under ``key`` (unless it came from the store) and
        the item's terminal status (if given); return only once it is committed."""
        ...


def cache_key(llm: LLM, request: Request) -> str:
    """The key a request's result is stored under: its idempotency key within a namespace.

    ``request.key`` covers the request's canonical form (the model included, once the
    handle has filled it in) and its sample salt. The namespace adds the handle's class,
    its model and its name, so two handles that leave ``request.model`` unset (two
    ``fanflow.function`` models, say) never share entries. A handle may set a
    ``cache_namespace`` string to separate entries further (per endpoint, say); the
    namespace is hashed, never stored.
    """
    blob = f"{namespace_of(llm)}\n{request.key}".encode()
    return hashlib.sha256(blob).hexdigest()


def namespace_of(llm: LLM) -> str:
    """The cache namespace of a handle (see :func:`cache_key`)."""
    namespace = getattr(llm, "cache_namespace", None)
    if isinstance(namespace, str):
        return namespace
    cls = type(llm)
    model = getattr(llm, "model", None)
    name = getattr(llm, "name", None)
    return f"{cls.__module__}.{cls.__qualname__}|{model}|{name}"


def cached_record(
    request: Request,
    response: Response,
    *,
    parse: Callable[[Response], T] | None,
    index: int | None,
    label: str | None,
    opts: CallOptions,
) -> CallRecord[T]:
    """The record of a call served from the store: no attempts, no usage, no cost."""
    now = asyncio.get_running_loop().time()
    status = Status.SUCCEEDED
    value: Any = response
    error: BaseException | None = None
    if parse is not None:
        try:
            value = parse(response)
        except Exception as exc:
            who = f"item {index}" if index is not None else "the call"
            status, value = Status.FAILED, None
            error = ParseError(
                f"{who}: the stored reply could not be used: {type(exc).__name__}: {exc}; "
                "fix the parser, or pass cache=False to ask the model again"
            )
            error.__cause__ = exc
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
    opts: CallOptions,
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
    key = cache_key(llm, request)
    if reuse:
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
        await store.save(record, key=key, item=item)
    return record
