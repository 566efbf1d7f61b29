"""Plumbing shared by the composite patterns (fan_out, vote, best_of_n, ...).

Every pattern sends its calls through :func:`fanflow._durable.execute_stored` (the
engine's :func:`fanflow._engine.execute`, plus the result store when the pattern was
given ``store=``), so limits, retries, timeouts, hooks, records and caching behave the
same everywhere; this module only starts several of them at once and adds up what
happened.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from .._durable import Durability, execute_stored
from .._engine import Run, status_of
from .._exceptions import ConfigError
from .._llm import LLM
from .._repr import render, seconds, short
from .._types import CallRecord, Request, Response, Status, Summary, summarize
from ..store import ResultStore
from ._options import Resolved

__all__ = [
    "PatternResult",
    "call_user",
    "check_model",
    "check_model_or_function",
    "durably",
    "is_llm",
    "run_calls",
    "run_items",
    "sample",
    "samples",
    "spread",
    "text_of",
]

T = TypeVar("T")


def text_of(response: Response) -> str:
    """The reply text (the default ``parse`` of every pattern)."""
    return response.text


def is_llm(obj: object) -> bool:
    """Whether ``obj`` is a model handle (has ``complete``) rather than a plain callable."""
    return callable(getattr(obj, "complete", None))


def check_model(obj: object, pattern: str, role: str = "llm") -> None:
    """Reject, before any call, an object that is not a fanflow model, with the fix.

    Objects shaped like other libraries' models (``agenerate``, LangChain's
    ``ainvoke``) and plain functions are wrapped once by :func:`fanflow.function`; a
    pattern never guesses (docs/decisions/0112-foreign-models-rejected-with-the-fix.md).
    """
    if is_llm(obj):
        return
    kind = type(obj).__name__
    if callable(getattr(obj, "agenerate", None)):
        what = f"a {kind} object with agenerate()"
    elif callable(getattr(obj, "ainvoke", None)):
        what = f"a LangChain-style chat model ({kind}, with ainvoke())"
    elif callable(obj):
        raise ConfigError(
            f"{pattern}: {role} is a function, not a fanflow model; wrap it once: "
            f"{role} = fanflow.function(fn) (fn receives a fanflow.Request; "
            "request.prompt is the text)"
        )
    else:
        raise ConfigError(
            f"{pattern}: {role} must be a fanflow model (fanflow.openai(...), "
            f"fanflow.anthropic(...), fanflow.local(), fanflow.function(fn)), got {kind}"
        )
    raise ConfigError(
        f"{pattern}: {role} is {what}, not a fanflow model; wrap it once: "
        f"{role} = fanflow.function(model)"
    )


def check_model_or_function(obj: object, pattern: str, role: str) -> None:
    """For a role that takes a model or a plain function (an aggregator, a guard):
    reject another library's model object, with the fix, rather than call it."""
    if is_llm(obj):
        return
    foreign = any(callable(getattr(obj, name, None)) for name in ("agenerate", "ainvoke"))
    if foreign or not callable(obj):
        check_model(obj, pattern, role)


async def call_user(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a user's sync or async function and return its (awaited) result."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def run_calls(
    llm: LLM,
    requests: Sequence[Request],
    opts: Run | Sequence[Run],
    *,
    models: Sequence[LLM] | None = None,
    labels: Sequence[str | None] | None = None,
    indices: Sequence[int] | None = None,
    parse: Callable[[Response], Any] | None = None,
    store: ResultStore | None = None,
    cache: bool = True,
    durable: Durability | None = None,
) -> list[CallRecord[Any]]:
    """Run requests at once through the engine; one record each, in argument order.

    ``models`` gives each request its own model (default: ``llm`` for every one), and
    ``opts`` may be a sequence of options, one per request.

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
            model = models[i] if models is not None else llm
            these = opts if isinstance(opts, Run) else opts[i]
            if durable is not None:
                call = durable.run(
                    model, request, these, index=index, item=None, label=label, parse=parse
                )
            else:
                call = execute_stored(
                    model,
                    request,
                    these,
                    store=store,
                    index=index,
                    label=label,
                    parse=parse,
                    reuse=cache,
                )
            tasks.append(tg.create_task(call))
    records = [t.result() for t in tasks]
    if durable is not None:
        for record in records:
            durable.emit(record, None)
    return records


async def run_items(
    llm: LLM,
    requests: Sequence[Request],
    opts: Run,
    options: Resolved,
    *,
    labels: Sequence[str | None],
    parse: Callable[[Response], Any] | None = None,
) -> list[CallRecord[Any]]:
    """A pattern's calls at once, each an item of its job and its sink (if it has
    them), served from and committed to its store."""
    durable = options.durability()
    return await durably(
        durable,
        len(requests),
        lambda: run_calls(
            llm,
            requests,
            opts,
            labels=labels,
            parse=parse,
            store=options.store,
            cache=options.cache,
            durable=durable,
        ),
    )


async def durably(durable: Durability | None, total: int, body: Callable[[], Awaitable[T]]) -> T:
    """Run a pattern's ``body`` within its job and sink (``total`` items), if any."""
    if durable is None:
        return await body()
    out: list[T] = []

    async def run() -> int:
        out.append(await body())
        return total

    await durable.around(run, total)
    return out[0]


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

    ``summary`` adds the calls up (tokens, retries, failures, ``busy_time`` = the
    model's time on the calls, what they would take one after another; None when not
    known); ``speedup`` is that over ``makespan``.
    """

    records: tuple[CallRecord[Any], ...] = field(default=(), repr=False)
    makespan: float = 0.0

    def _fields(self) -> Iterator[tuple[str, Any]]:
        """The result's own fields (optional ones only when set), then its totals."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.repr and f.name != "makespan" and not (value is None and f.default is None):
                yield f.name, value
        yield "calls", len(self.records)
        yield "makespan", round(self.makespan, 3)

    def __repr__(self) -> str:
        fields = ((name, _show(value)) for name, value in self._fields())
        return render(f"results.{type(self).__name__}", fields)

    def __rich_repr__(self) -> Iterator[tuple[str, Any]]:
        yield from self._fields()

    @property
    def summary(self) -> Summary:
        return summarize(self.records, makespan=self.makespan)

    @property
    def busy_time(self) -> float | None:
        """The model's time on the calls: what running them one by one would take."""
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
        sample(task, i, system=system, temperature=temperature, pattern=pattern, role=role)
        for i in range(n)
    ]


def sample(
    task: str,
    i: int,
    *,
    system: str | None,
    temperature: float | None,
    pattern: str,
    role: str,
) -> Request:
    """Sample ``i`` of a task (``sample=i`` gives it its own key)."""
    return Request.of(
        task,
        system=system,
        temperature=temperature,
        sample=i,
        metadata={"pattern": pattern, role: i},
    )


def spread(n: int, temperatures: tuple[float, float] | None) -> list[float | None]:
    """``n`` temperatures spread evenly over ``(low, high)`` (both ends included)."""
    if temperatures is None:
        return [None] * n
    low, high = temperatures
    if n == 1:
        return [low]
    return [round(low + (high - low) * i / (n - 1), 6) for i in range(n)]


def _show(value: Any) -> str:
    """A field of a pattern result: per-call views as their statuses, floats rounded,
    long values shortened whole (:func:`fanflow._repr.short`)."""
    if isinstance(value, tuple | list) and value and all(isinstance(v, RecordView) for v in value):
        return "[" + ", ".join(v.status.value for v in value) + "]"
    if isinstance(value, float) and not isinstance(value, bool):
        return seconds(value)
    return short(value)


def now() -> float:
    return asyncio.get_running_loop().time()
