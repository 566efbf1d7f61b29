"""Fan-out / fan-in: one task to N workers at once, then one aggregation.

Each worker gets its own temperature (spread evenly over a range) and/or focus area,
and its own time budget, so a slow or failing worker never delays the others. A
quorum (by default half the workers, rounded up) must succeed, or the pattern raises
:class:`fanflow.QuorumNotMet` instead of returning a degraded answer.

Workers are idempotent: worker *i*'s request carries ``sample=i``, so its key is a
stable function of (task, worker index, temperature, focus). Passing the previous
result as ``previous=`` re-runs only the workers that did not succeed; so does running
the same fan-out again with the same ``store=`` (in another process too), since a
succeeded worker's reply is committed there and failures are not. ``job="name"``
records each worker's terminal status as an item of that job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._budget import Budget
from .._durable import Durability
from .._engine import CallOptions
from .._events import Hook
from .._exceptions import ConfigError, QuorumNotMet
from .._llm import LLM, BaseLLM
from .._pricing import Price
from .._retry import RetryPolicy
from .._types import CallRecord, Request, Status
from ..store import Store
from ._common import (
    PatternResult,
    RecordView,
    describe,
    is_llm,
    now,
    options_with,
    reused,
    run_calls,
    run_function,
)

__all__ = ["DEFAULT_AGGREGATE_PROMPT", "FanOutResult", "Worker", "fan_out"]

DEFAULT_AGGREGATE_PROMPT = (
    "Several assistants answered the same task independently. Merge their answers into "
    "one answer that keeps everything correct and useful from each and drops repetition "
    "and contradictions.\n\nTask:\n{task}\n\n{outputs}\n\nMerged answer:"
)

Aggregation = Literal["llm", "function", "concat", "single"]
Aggregator = LLM | Callable[[list[str]], Any] | Literal["concat"] | None


@dataclass(frozen=True, repr=False)
class Worker(RecordView):
    """One worker of a fan-out: its settings and the record of its call."""

    index: int
    temperature: float | None
    focus: str | None
    record: CallRecord[str]

    def __repr__(self) -> str:
        return (
            f"fanflow.Worker(index={self.index}, temperature={self.temperature}, "
            f"focus={self.focus!r}, status={self.status.value})"
        )

    @property
    def output(self) -> str | None:
        return self.record.value


@dataclass(frozen=True, kw_only=True, repr=False)
class FanOutResult(PatternResult):
    """The merged answer and what happened to every worker.

    Attributes:
        answer: the aggregated answer (None only inside a ``QuorumNotMet``).
        aggregation: how it was merged: ``"llm"`` (the aggregator model),
            ``"function"`` (your callable), ``"concat"`` (outputs joined, asked for or
            because the aggregator failed: see ``aggregation_error``) or ``"single"``
            (one worker succeeded: its output is the answer).
        workers: every worker, in index order.
        required: the quorum that had to succeed.
        aggregator: the aggregator call's record (None without a model call).
        aggregation_error: why the aggregator failed, when it fell back to concat.
    """

    answer: str | None
    aggregation: Aggregation | None
    workers: tuple[Worker, ...]
    required: int
    aggregator: CallRecord[Any] | None = field(default=None, repr=False)
    aggregation_error: BaseException | None = None

    @property
    def succeeded(self) -> list[Worker]:
        return [w for w in self.workers if w.status is Status.SUCCEEDED]

    @property
    def failed(self) -> list[Worker]:
        """Workers that did not succeed (failed, timed out or cancelled)."""
        return [w for w in self.workers if w.status is not Status.SUCCEEDED]

    @property
    def timed_out(self) -> list[Worker]:
        return [w for w in self.workers if w.status is Status.TIMED_OUT]

    @property
    def outputs(self) -> list[str]:
        """The successful workers' outputs, in worker order."""
        return [w.output for w in self.workers if w.ok and w.output is not None]


def spread(n: int, temperatures: tuple[float, float] | None) -> list[float | None]:
    """``n`` temperatures spread evenly over ``(low, high)`` (both ends included)."""
    if temperatures is None:
        return [None] * n
    low, high = temperatures
    if n == 1:
        return [low]
    return [round(low + (high - low) * i / (n - 1), 6) for i in range(n)]


def _worker_count(workers: int | None, focus: Sequence[str] | None) -> int:
    n = workers if workers is not None else (len(focus) if focus else 3)
    if n < 1:
        raise ConfigError(f"workers must be >= 1, got {n}")
    if focus is not None and len(focus) > n:
        raise ConfigError(
            f"{len(focus)} focus areas but only {n} workers: the last focus areas would "
            "never be used; raise workers= or pass fewer focus areas"
        )
    return n


def _concat(workers: Sequence[Worker]) -> str:
    return "\n\n---\n\n".join(w.output for w in workers if w.output is not None)


def _listing(workers: Sequence[Worker]) -> str:
    parts = []
    for n, w in enumerate(workers, 1):
        head = f"Answer {n}" + (f" (focus: {w.focus})" if w.focus else "")
        parts.append(f"{head}:\n{w.output}")
    return "\n\n".join(parts)


async def fan_out(
    llm: LLM,
    task: str,
    *,
    workers: int | None = None,
    temperatures: tuple[float, float] | None = (0.3, 0.9),
    focus: Sequence[str] | None = None,
    aggregate: Aggregator = None,
    aggregate_prompt: str = DEFAULT_AGGREGATE_PROMPT,
    worker_timeout: float | None = 15.0,
    min_success: int | None = None,
    previous: FanOutResult | None = None,
    system: str | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int | None = None,
    hooks: Sequence[Hook] = (),
    store: Store | None = None,
    cache: bool = True,
    job: str | None = None,
    budget: float | Budget | None = None,
    prices: Mapping[str, Price] | None = None,
) -> FanOutResult:
    """Send ``task`` to several workers at once and merge what they answer.

    Args:
        llm: the workers' model.
        task: the prompt every worker gets.
        workers: how many workers (default: one per focus area, else 3).
        temperatures: ``(low, high)``; worker *i* of *N* gets
            ``low + (high - low) * i / (N - 1)``. None leaves the handle's temperature.
        focus: focus areas; worker *i* gets ``focus[i % len(focus)]`` appended to the task
            as ``"Focus on: <area>"``.
        aggregate: who merges: None (``llm`` itself), another model, a function
            ``fn(outputs) -> str`` (sync or async), or ``"concat"``. If it fails the
            outputs are concatenated and ``aggregation_error`` says why.
        aggregate_prompt: the aggregator's prompt; ``{task}`` and ``{outputs}`` (every
            successful output, numbered) are filled in.
        worker_timeout: seconds each worker may take in all, retries included (None: no
            limit). A worker out of time ends ``timed_out``; the others go on.
        min_success: the quorum (default ``ceil(workers / 2)``).
        previous: an earlier result of the same fan-out: its successful workers whose
            request is unchanged are reused, only the others run again.
        system: a system prompt for the workers.
        timeout: seconds per attempt (None: the handle's).
        retry: the retry policy (None: the handle's).
        concurrency: the most workers in flight at once (None: the handle's limit).
        hooks: receive every call's events.
        store: a :class:`fanflow.Store` for every call (workers and aggregator): a call
            stored before is served from it (``cached=True``, costing nothing), a new
            one is committed before it counts. Running the same fan-out again with the
            same store re-runs only the workers that did not succeed.
        cache: serve calls found in the store (False: ask the model again, except for
            the job's own succeeded workers).
        job: a name under which the store records each worker's terminal status
            (workers are the job's items, by worker index); needs ``store``.
        budget: the most its calls may spend together: dollars (a number) or a
            :class:`fanflow.Budget` (share one to cap several patterns at once). Each
            attempt reserves its expected cost first; calls the budget cannot cover end
            ``skipped`` with ``BudgetExceeded`` (an aggregator that is skipped falls back to
            concat, and ``aggregation_error`` says so).
        prices: model prices beyond the built-in table, ``{model: fanflow.Price}``.

    Returns:
        A :class:`FanOutResult`.

    Raises:
        QuorumNotMet: fewer than ``min_success`` workers succeeded; the message names
            each failed worker's error and ``metadata`` is the :class:`FanOutResult`.
    """
    n = _worker_count(workers, focus)
    durable = (
        Durability(store=store, job=job, only_failed=False, cache=cache, sink=None)
        if job is not None
        else None
    )
    required = math.ceil(n / 2) if min_success is None else min_success
    if not 1 <= required <= n:
        raise ConfigError(f"min_success must be between 1 and workers={n}, got {min_success}")
    started = now()
    temps = spread(n, temperatures)
    focuses: list[str | None] = [focus[i % len(focus)] if focus else None for i in range(n)]
    requests = []
    for i in range(n):
        prompt = task if focuses[i] is None else f"{task}\n\nFocus on: {focuses[i]}"
        requests.append(
            Request.of(
                prompt,
                system=system,
                temperature=temps[i],
                sample=i,
                metadata={"pattern": "fan_out", "worker": i, "focus": focuses[i]},
            )
        )
    if isinstance(llm, BaseLLM):  # keys as the engine (and a store) will see them
        requests = [llm.prepare(r) for r in requests]
    done: dict[str, CallRecord[Any]] = {}
    if previous is not None:
        done = {w.record.key: w.record for w in previous.workers if w.ok and w.record.key}
    todo = [i for i in range(n) if requests[i].key not in done]
    options = options_with(budget, prices)
    opts = options(
        concurrency=concurrency, timeout=timeout, deadline=worker_timeout, retry=retry, hooks=hooks
    )
    fresh: list[CallRecord[Any]] = []

    async def run_workers() -> int:
        fresh[:] = await run_calls(
            llm,
            [requests[i] for i in todo],
            opts,
            indices=todo,
            labels=[f"worker {i}" for i in todo],
            store=store,
            cache=cache,
            durable=durable,
        )
        if durable is not None:
            for record in fresh:
                durable.emit(record, None)
        return n

    if durable is None:
        await run_workers()
    else:
        await durable.around(run_workers, n)
    by_index = dict(zip(todo, fresh, strict=True))
    crew = tuple(
        Worker(i, temps[i], focuses[i], by_index.get(i) or reused(done[requests[i].key]))
        for i in range(n)
    )
    ok = [w for w in crew if w.ok]
    if len(ok) < required:
        result = FanOutResult(
            answer=None,
            aggregation=None,
            workers=crew,
            required=required,
            records=tuple(w.record for w in crew),
            makespan=now() - started,
        )
        raise QuorumNotMet(
            _quorum_message(crew, len(ok), required),
            succeeded=len(ok),
            required=required,
            metadata=result,
        )
    answer, how, record, error = await _aggregate(
        llm if aggregate is None else aggregate,
        task,
        ok,
        aggregate_prompt,
        options(timeout=timeout, retry=retry, hooks=hooks),
        store,
        cache,
    )
    return FanOutResult(
        answer=answer,
        aggregation=how,
        workers=crew,
        required=required,
        aggregator=record,
        aggregation_error=error,
        records=tuple(w.record for w in crew) + ((record,) if record is not None else ()),
        makespan=now() - started,
    )


def _quorum_message(crew: Sequence[Worker], succeeded: int, required: int) -> str:
    if succeeded == 0:
        head = f"fan_out: all {len(crew)} workers failed"
    else:
        head = f"fan_out: only {succeeded} of {len(crew)} workers succeeded, {required} required"
    lines = [head + ":"]
    for w in crew:
        if not w.ok:
            settings = ", ".join(
                part
                for part in (
                    f"temperature {w.temperature}" if w.temperature is not None else "",
                    f"focus {w.focus!r}" if w.focus else "",
                )
                if part
            )
            where = f"worker {w.index}" + (f" ({settings})" if settings else "")
            lines.append(f"  {where}: {w.status.value}: {describe(w.record)}")
    lines.append(
        "Fix the errors above, or lower min_success= to accept fewer answers; pass this "
        "error's metadata as previous= to re-run only the failed workers."
    )
    return "\n".join(lines)


async def _aggregate(
    aggregate: Aggregator,
    task: str,
    ok: Sequence[Worker],
    prompt: str,
    opts: CallOptions,
    store: Store | None,
    cache: bool,
) -> tuple[str, Aggregation, CallRecord[Any] | None, BaseException | None]:
    outputs = [w.output for w in ok if w.output is not None]
    if len(ok) == 1:
        return outputs[0], "single", None, None
    if aggregate == "concat":
        return _concat(ok), "concat", None, None
    if is_llm(aggregate):
        request = Request.of(
            prompt.format(task=task, outputs=_listing(ok)),
            metadata={"pattern": "fan_out", "role": "aggregator"},
        )
        [record] = await run_calls(
            aggregate,  # type: ignore[arg-type]
            [request],
            opts,
            labels=["aggregator"],
            store=store,
            cache=cache,
        )
        how: Aggregation = "llm"
    else:
        assert callable(aggregate)
        record = await run_function(aggregate, outputs, label="aggregator")
        if record.ok and not isinstance(record.value, str):
            error = TypeError(
                f"the aggregate function returned {type(record.value).__name__}; return a str"
            )
            record = CallRecord(
                status=Status.FAILED, error=error, start=record.start, end=record.end
            )
        how = "function"
    if record.ok and isinstance(record.value, str):
        return record.value, how, record, None
    return _concat(ok), "concat", record, record.error
