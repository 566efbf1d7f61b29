"""Plumbing shared by the composite patterns (fan_out, vote, best_of_n, ...).

Every pattern sends its calls through :func:`fanflow._durable.execute_stored` (the
engine's :func:`fanflow._engine.execute`, plus the result store when the pattern was
given ``store=``), so limits, retries, timeouts, hooks, records and caching behave the
same everywhere; this module only starts several of them at once and adds up what
happened.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from .._budget import Budget, as_budget
from .._durable import Durability, execute_stored
from .._engine import CallOptions, make_options, status_of
from .._llm import LLM
from .._pricing import Price
from .._types import CallRecord, Request, Response, Status, Summary, summarize
from ..store import ResultStore

__all__ = [
    "PatternResult",
    "call_user",
    "is_llm",
    "options_with",
    "run_calls",
    "text_of",
]

T = TypeVar("T")


def text_of(response: Response) -> str:
    """The reply text (the default ``parse`` of every pattern)."""
    return response.text


def is_llm(obj: object) -> bool:
    """Whether ``obj`` is a model handle (has ``complete``) rather than a plain callable."""
    return callable(getattr(obj, "complete", None))


async def call_user(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a user's sync or async function and return its (awaited) result."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def options_with(
    budget: float | Budget | None, prices: Mapping[str, Price] | None
) -> Callable[..., CallOptions]:
    """``make_options`` bound to one budget: every call of a pattern (workers,
    aggregator, judge, ...) draws on the same cap, even when ``budget`` is a number."""
    return functools.partial(make_options, budget=as_budget(budget), prices=prices)


async def run_calls(
    llm: LLM,
    requests: Sequence[Request],
    opts: CallOptions,
    *,
    labels: Sequence[str | None] | None = None,
    indices: Sequence[int] | None = None,
    parse: Callable[[Response], Any] | None = None,
    store: ResultStore | None = None,
    cache: bool = True,
    durable: Durability | None = None,
) -> list[CallRecord[Any]]:
    """Run requests at once through the engine; one record each, in argument order.

    With ``store``, each call is served from it when stored before (``cached=True``,
    unless ``cache`` is False) and committed to it before its record is returned. With
    ``durable`` (a job), each request is an item of that job: its terminal status is
    recorded, and an item that succeeded in an earlier run is always served from the
    store.

    Failures are data (the engine never raises but for cancellation); cancelling the
    caller cancels every call (a task group waits until they have stopped).
    """
    parse = parse or text_of
    async with asyncio.TaskGroup() as tg:
        tasks = []
        for i, request in enumerate(requests):
            index = indices[i] if indices is not None else i
            label = labels[i] if labels is not None else None
            if durable is not None:
                call = durable.run(
                    llm, request, opts, index=index, item=None, label=label, parse=parse
                )
            else:
                call = execute_stored(
                    llm,
                    request,
                    opts,
                    store=store,
                    index=index,
                    label=label,
                    parse=parse,
                    reuse=cache,
                )
            tasks.append(tg.create_task(call))
    return [t.result() for t in tasks]


async def run_function(
    fn: Callable[..., Any], *args: Any, index: int | None = None, label: str | None = None
) -> CallRecord[Any]:
    """Run a user's function as a record (no model call, so no attempts)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        value = await call_user(fn, *args)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return CallRecord(
            status=status_of(exc),
            error=exc,
            start=start,
            end=loop.time(),
            index=index,
            label=label,
        )
    return CallRecord(
        status=Status.SUCCEEDED, value=value, start=start, end=loop.time(), index=index, label=label
    )


def reused(record: CallRecord[T]) -> CallRecord[T]:
    """A record carried over from a previous run (counted as cached: no new work)."""
    return replace(record, cached=True)


def describe(record: CallRecord[Any]) -> str:
    """``"ServerError: ..."`` for a failed record (its status when there is no error)."""
    if record.error is None:
        return str(record.status)
    return f"{type(record.error).__name__}: {record.error}"


@dataclass(frozen=True, kw_only=True, repr=False)
class PatternResult:
    """What a pattern did: every call it made (``records``) and how long it took.

    ``summary`` adds the calls up (tokens, retries, failures, ``busy_time`` = the time
    spent answering calls, queueing excluded); ``speedup`` is that over ``makespan``.
    """

    records: tuple[CallRecord[Any], ...] = field(default=(), repr=False)
    makespan: float = 0.0

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={_short(getattr(self, f.name))}" for f in fields(self) if f.repr
        )
        return f"fanflow.{type(self).__name__}({shown})"

    @property
    def summary(self) -> Summary:
        return summarize(self.records, makespan=self.makespan)

    @property
    def busy_time(self) -> float:
        """The sum of the calls' latencies (what running them one by one would take)."""
        return self.summary.busy_time

    @property
    def speedup(self) -> float | None:
        return self.summary.speedup


class RecordView:
    """Mixin for per-call views (a worker, a criterion): reads ``self.record``."""

    record: CallRecord[Any]

    @property
    def status(self) -> Status:
        return self.record.status

    @property
    def ok(self) -> bool:
        return self.record.ok

    @property
    def error(self) -> BaseException | None:
        return self.record.error

    @property
    def latency(self) -> float | None:
        return self.record.latency


def samples(
    task: str,
    n: int,
    *,
    system: str | None,
    temperature: float | None,
    pattern: str,
    role: str,
) -> list[Request]:
    """``n`` samples of one task: same prompt, ``sample=i`` so each has its own key."""
    return [
        Request.of(
            task,
            system=system,
            temperature=temperature,
            sample=i,
            metadata={"pattern": pattern, role: i},
        )
        for i in range(n)
    ]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def chain_records(*groups: Iterable[CallRecord[Any] | None]) -> tuple[CallRecord[Any], ...]:
    """Flatten groups of records, dropping the ``None`` placeholders."""
    return tuple(r for group in groups for r in group if r is not None)


def now() -> float:
    return asyncio.get_running_loop().time()
