"""Task-parallel calls: ``call``, ``gather`` (all-or-nothing or settled) and ``race``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar, Unpack

from .._durable import execute_stored
from .._engine import Run, status_of
from .._events import observed
from .._exceptions import AllFailed, CallTimeout
from .._llm import LLM
from .._progress import shown, with_progress
from .._types import CallRecord, Request, Response, Status
from ._common import check_model
from ._options import Options, Resolved, resolve

__all__ = ["Call", "call", "gather", "race"]

T = TypeVar("T")


@dataclass(frozen=True)
class Shared:
    """An enclosing ``gather``'s or ``race``'s options as its calls share them (one
    run: one gate, one deadline, one budget cap)."""

    options: Resolved
    run: Run

    @classmethod
    def of(cls, options: Resolved) -> Shared:
        return cls(options, options.run())

    def inside(self, own: Resolved) -> Run:
        """The run of a call with options ``own``: what it set wins, the rest is this
        run's (the sooner deadline applies; hooks of both)."""
        outer, given = self.run, own.given
        if not given:
            return outer  # the call set nothing of its own (the common case: no copy)
        mine = own.run().within(outer, given)
        return replace(
            mine,
            budget=mine.budget if "budget" in given else outer.budget,
            # A budget prices its calls (CallOptions.start), so the call's prices go with it.
            prices=mine.prices if {"prices", "budget"} & given else outer.prices,
            hooks=tuple(dict.fromkeys((*outer.hooks, *mine.hooks))),
        )


class Call:
    """One model call, not yet started. ``await`` it for the :class:`Response`.

    Made by :func:`call`. ``gather`` and ``race`` use :meth:`record` to keep every
    attempt of it; awaiting it directly raises the call's error when it fails.
    """

    __slots__ = ("_options", "_progress", "llm", "request")

    def __init__(
        self, llm: LLM, request: Request, options: Resolved, *, progress: bool = False
    ) -> None:
        self.llm = llm
        self.request = request
        self._options = options
        self._progress = progress

    def __repr__(self) -> str:
        return f"fanflow.results.Call({self.request.prompt[:40]!r})"

    async def record(self, outer: Shared | None = None) -> CallRecord[Response]:
        """Run the call and return its record (failures are data).

        ``outer``: the options of an enclosing ``gather`` or ``race``, for what this
        call did not set itself.
        """
        return await shown(self._record(outer), progress=self._progress, total=1)

    async def _record(self, outer: Shared | None) -> CallRecord[Response]:
        own = self._options
        store, cache = own.store, own.cache
        if outer is None:
            opts = own.run()
        else:
            opts = outer.inside(own)
            store = own.store if "store" in own.given else outer.options.store
            cache = own.cache if "cache" in own.given else outer.options.cache
        label = self.request.metadata.get("label") if self.request.metadata else None
        return await execute_stored(
            self.llm, self.request, opts, store=store, reuse=cache, label=label
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
    progress: bool = False,
    **options: Unpack[Options],
) -> Call:
    """One call through the engine (admission, timeout, retries, hedging).

    ``await fanflow.call(llm, "...")`` returns the :class:`Response` or raises the
    call's error after its retries. Pass calls to :func:`gather` or :func:`race`.

    ``**options`` are the call options (:class:`fanflow.Options`); ``deadline`` counts
    from when the call starts. Options a call sets win over those of the ``gather`` or
    ``race`` it is passed to; pass one ``Budget`` to cap several calls together.
    ``progress=True`` shows the call live while it runs (inside a ``gather`` or ``race``
    given ``progress=True``, that one display counts it).
    """
    o = resolve("call", options)
    check_model(llm, "call")
    if isinstance(prompt, Request):
        request = prompt
    else:
        request = Request.of(
            prompt, system=system, temperature=temperature, max_tokens=max_tokens, seed=seed
        )
    return Call(llm, request, o, progress=progress)


async def _outcome(aw: Awaitable[Any], index: int, outer: Shared | None = None) -> CallRecord[Any]:
    """Run a Call or any awaitable to a record (failures are data); ``outer`` gives a
    Call the options it did not set, and bounds any other awaitable by its deadline."""
    if isinstance(aw, Call):
        return replace(await aw.record(outer), index=index)
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = outer.run.deadline if outer is not None else None
    try:
        async with asyncio.timeout_at(deadline):
            value = await aw
    except TimeoutError:
        error = CallTimeout("the deadline passed before it finished; raise deadline=")
        return CallRecord(
            status=Status.TIMED_OUT, error=error, start=start, end=loop.time(), index=index
        )
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
@observed("gather")
async def gather(
    *calls: Awaitable[Any],
    settled: bool = False,
    progress: bool = False,
    **options: Unpack[Options],
) -> list[Any]:
    """Run calls at once.

    Args:
        calls: :func:`call` objects or any awaitables.
        settled: False (all-or-nothing): return the values in argument order; the first
            failure cancels the others and is raised. True: return every outcome as a
            :class:`fanflow.CallRecord` in argument order, never raising for a failure.
        **options: the call options (:class:`fanflow.Options`) for every :func:`call`
            that did not set them itself (``concurrency``: the most of them in flight);
            ``deadline`` also bounds any other awaitable (it ends ``timed_out``).

    Returns:
        Values (all-or-nothing) or records (settled), in argument order. For a
        :func:`call`, the value is its :class:`fanflow.Response`.
    """
    outer = Shared.of(resolve("gather", options))
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_outcome(aw, i, outer)) for i, aw in enumerate(calls)]
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
@observed("race")
async def race(*calls: Awaitable[Any], progress: bool = False, **options: Unpack[Options]) -> Any:
    """Run calls at once; the first *success* wins and the others are cancelled.

    Args:
        calls: :func:`call` objects or any awaitables.
        **options: the call options (:class:`fanflow.Options`) for every :func:`call`
            that did not set them itself; ``deadline`` is the time to wait for a
            success (``timeout=`` is its old spelling here, deprecated: everywhere else
            ``timeout`` means seconds per attempt).

    Returns:
        The winner's value (a :class:`fanflow.Response` for a :func:`call`).

    Raises:
        AllFailed: every call failed; ``failures`` holds each error in argument order.
        CallTimeout: no call succeeded within ``timeout``.
    """
    o = resolve("race", options, renamed={"timeout": "deadline"})
    if not calls:
        raise AllFailed("race() needs at least one call", [])
    # The race's deadline is its own (no success by then raises CallTimeout), so it is
    # not handed to the calls, which would end timed_out first.
    timeout = o.call.deadline
    outer = Shared.of(replace(o, call=replace(o.call, deadline=None)))
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_outcome(aw, i, outer)) for i, aw in enumerate(calls)]
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
            f"({len(failures)} of {len(calls)} had failed); raise deadline=",
            timeout=timeout,
        ) from None
    finally:
        if any(not t.done() for t in tasks):
            await _cancel_all(tasks)
    raise AllFailed(
        f"all {len(calls)} calls of the race failed",
        [failures[i] for i in sorted(failures)],
    )
