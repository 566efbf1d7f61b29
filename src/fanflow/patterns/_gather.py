"""Task-parallel calls: ``call``, ``gather`` (all-or-nothing or settled) and ``race``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Generator, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from .._budget import Budget, as_budget
from .._durable import execute_stored
from .._engine import make_options, status_of
from .._events import Hook
from .._exceptions import AllFailed, CallTimeout
from .._llm import LLM
from .._pricing import Price
from .._progress import with_progress
from .._retry import RetryPolicy
from .._types import CallRecord, Request, Response, Status
from ..store import Store

__all__ = ["Call", "call", "gather", "race"]

T = TypeVar("T")


class Call:
    """One model call, not yet started. ``await`` it for the :class:`Response`.

    Made by :func:`call`. ``gather`` and ``race`` use :meth:`record` to keep every
    attempt of it; awaiting it directly raises the call's error when it fails.
    """

    __slots__ = ("_cache", "_kwargs", "_store", "llm", "request")

    def __init__(
        self,
        llm: LLM,
        request: Request,
        kwargs: dict[str, Any],
        store: Store | None = None,
        cache: bool = True,
    ) -> None:
        self.llm = llm
        self.request = request
        self._kwargs = kwargs
        self._store = store
        self._cache = cache

    def __repr__(self) -> str:
        return f"fanflow.Call({self.request.prompt[:40]!r})"

    async def record(self) -> CallRecord[Response]:
        """Run the call and return its record (failures are data)."""
        opts = make_options(**self._kwargs)
        label = self.request.metadata.get("label") if self.request.metadata else None
        return await execute_stored(
            self.llm, self.request, opts, store=self._store, reuse=self._cache, label=label
        )

    async def _result(self) -> Response:
        record = await self.record()
        if record.error is not None:
            raise record.error
        assert record.value is not None
        return record.value

    def __await__(self) -> Generator[Any, None, Response]:
        return self._result().__await__()


def call(
    llm: LLM,
    prompt: str | Request,
    *,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
    retry: RetryPolicy | None = None,
    hedge_after: float | None = None,
    hooks: Sequence[Hook] = (),
    store: Store | None = None,
    cache: bool = True,
    budget: float | Budget | None = None,
    prices: Mapping[str, Price] | None = None,
) -> Call:
    """One call through the engine (admission, timeout, retries, hedging).

    ``await fanflow.call(llm, "...")`` returns the :class:`Response` or raises the
    call's error after its retries. Pass calls to :func:`gather` or :func:`race`.
    With ``store=`` (a :class:`fanflow.Store`) a call stored before is served from it
    (its record says ``cached=True``; ``cache=False`` asks the model again) and a new
    one is committed before it is returned.

    ``budget=`` (dollars, or a :class:`fanflow.Budget`) caps what the call may spend,
    retries included; pass one ``Budget`` to every call of a :func:`gather` or
    :func:`race` to cap them together. A call the budget cannot cover ends ``skipped``
    with :class:`fanflow.BudgetExceeded`. ``prices=`` adds model prices
    (``{model: fanflow.Price}``) to the built-in table.
    """
    if isinstance(prompt, Request):
        request = prompt
    else:
        request = Request.of(
            prompt, system=system, temperature=temperature, max_tokens=max_tokens, seed=seed
        )
    kwargs: dict[str, Any] = {
        "timeout": timeout,
        "deadline": deadline,
        "retry": retry,
        "hedge_after": hedge_after,
        "hooks": tuple(hooks),
        "budget": as_budget(budget),
        "prices": prices,
    }
    return Call(llm, request, kwargs, store, cache)


async def _outcome(aw: Awaitable[Any], index: int) -> CallRecord[Any]:
    """Run a Call or any awaitable to a record (failures are data)."""
    if isinstance(aw, Call):
        return replace(await aw.record(), index=index)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        value = await aw
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return CallRecord(
            status=status_of(exc), error=exc, start=start, end=loop.time(), index=index
        )
    return CallRecord(
        status=Status.SUCCEEDED, value=value, start=start, end=loop.time(), index=index
    )


async def _cancel_all(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    # Wait until every child has really stopped: no orphans, no pending-task warnings.
    await asyncio.gather(*tasks, return_exceptions=True)


@with_progress
async def gather(
    *calls: Awaitable[Any], settled: bool = False, progress: bool = False
) -> list[Any]:
    """Run calls at once.

    Args:
        calls: :func:`call` objects or any awaitables.
        settled: False (all-or-nothing): return the values in argument order; the first
            failure cancels the others and is raised. True: return every outcome as a
            :class:`fanflow.CallRecord` in argument order, never raising for a failure.

    Returns:
        Values (all-or-nothing) or records (settled), in argument order. For a
        :func:`call`, the value is its :class:`fanflow.Response`.
    """
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_outcome(aw, i)) for i, aw in enumerate(calls)]
    try:
        if settled:
            return list(await asyncio.gather(*tasks))
        pending: set[asyncio.Task[CallRecord[Any]]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [t.result() for t in done if t.result().status is not Status.SUCCEEDED]
            if failed:
                first = min(failed, key=lambda r: r.index if r.index is not None else 0)
                await _cancel_all(tasks)
                assert first.error is not None
                raise first.error
        return [t.result().value for t in tasks]
    finally:
        if any(not t.done() for t in tasks):
            await _cancel_all(tasks)


@with_progress
async def race(*calls: Awaitable[Any], timeout: float | None = None, progress: bool = False) -> Any:
    """Run calls at once; the first *success* wins and the others are cancelled.

    Args:
        calls: :func:`call` objects or any awaitables.
        timeout: seconds to wait for a success (None: no limit).

    Returns:
        The winner's value (a :class:`fanflow.Response` for a :func:`call`).

    Raises:
        AllFailed: every call failed; ``failures`` holds each error in argument order.
        CallTimeout: no call succeeded within ``timeout``.
    """
    if not calls:
        raise AllFailed("race() needs at least one call", [])
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_outcome(aw, i)) for i, aw in enumerate(calls)]
    failures: dict[int, BaseException] = {}
    try:
        pending: set[asyncio.Task[CallRecord[Any]]] = set(tasks)
        async with asyncio.timeout(timeout):
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winners = [t.result() for t in done if t.result().status is Status.SUCCEEDED]
                if winners:
                    winner = min(winners, key=lambda r: r.index if r.index is not None else 0)
                    await _cancel_all(tasks)
                    return winner.value
                for t in done:
                    record = t.result()
                    assert record.index is not None
                    assert record.error is not None
                    failures[record.index] = record.error
    except TimeoutError:
        await _cancel_all(tasks)
        raise CallTimeout(
            f"no call of the race succeeded within {timeout:g} s "
            f"({len(failures)} of {len(calls)} had failed); raise timeout=",
            timeout=timeout,
        ) from None
    finally:
        if any(not t.done() for t in tasks):
            await _cancel_all(tasks)
    raise AllFailed(
        f"all {len(calls)} calls of the race failed",
        [failures[i] for i in sorted(failures)],
    )
