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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn, Unpack

from .._engine import Run
from .._events import observed
from .._exceptions import ConfigError, QuorumNotMet
from .._llm import LLM, BaseLLM
from .._progress import with_progress
from .._types import CallRecord, Request, Status
from ..store import Store
from ._common import (
    PatternResult,
    RecordView,
    check_model,
    check_model_or_function,
    describe,
    durably,
    is_llm,
    now,
    reused,
    run_calls,
    run_function,
    spread,
)
from ._options import Options, resolve
from ._prompt import check_fields, fill

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
            f"fanflow.results.Worker(index={self.index}, temperature={self.temperature}, "
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
        """Workers that failed (cancelled and skipped ones included), not those that
        timed out: ``succeeded``, ``failed`` and ``timed_out`` never overlap."""
        return [w for w in self.workers if w.status not in (Status.SUCCEEDED, Status.TIMED_OUT)]

    @property
    def timed_out(self) -> list[Worker]:
        """Workers that ran out of time (``worker_timeout``, ``deadline``, ``timeout``)."""
        return [w for w in self.workers if w.status is Status.TIMED_OUT]

    @property
    def unsuccessful(self) -> list[Worker]:
        """Every worker that did not succeed: ``failed`` and ``timed_out`` together."""
        return [w for w in self.workers if w.status is not Status.SUCCEEDED]

    @property
    def outputs(self) -> list[str]:
        """The successful workers' outputs, in worker order."""
        return [w.output for w in self.workers if w.ok and w.output is not None]


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


@with_progress
@observed("fan_out")
async def fan_out(
    llm: LLM,
    task: str,
    *,
    workers: int | None = None,
    temperatures: tuple[float, float] | None = (0.3, 0.9),
    focus: Sequence[str] | None = None,
    aggregate: Aggregator = None,
    aggregate_prompt: str = DEFAULT_AGGREGATE_PROMPT,
    worker_timeout: float | Sequence[float | None] | None = 15.0,
    min_success: int | None = None,
    previous: FanOutResult | None = None,
    system: str | None = None,
    progress: bool = False,
    **options: Unpack[Options],
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
        worker_timeout: seconds each worker may take in all, retries included, counted
            from the start of the fan-out: one number for every worker, or one per
            worker (``[10, 10, 30]``; None: no limit). A worker out of time ends
            ``timed_out``; the others go on. The call option ``deadline`` still bounds
            every call; the earlier of the two applies.
        min_success: the quorum (default ``ceil(workers / 2)``).
        previous: an earlier result of the same fan-out: its successful workers whose
            request is unchanged are reused, only the others run again.
        system: a system prompt for the workers.
        **options: the call options (:class:`fanflow.Options`) of the workers and the
            aggregator; ``concurrency`` is the most workers in flight. With ``store``,
            running the same fan-out again re-runs only the workers that did not
            succeed; with ``job``, workers are the job's items (by worker index). An
            aggregator the budget cannot cover falls back to concat, and
            ``aggregation_error`` says so.

    Returns:
        A :class:`FanOutResult`.

    Raises:
        QuorumNotMet: fewer than ``min_success`` workers succeeded; the message names
            each failed worker's error and ``metadata`` is the :class:`FanOutResult`.
    """
    o = resolve("fan_out", options)
    check_model(llm, "fan_out")
    if aggregate is not None and aggregate != "concat":
        check_model_or_function(aggregate, "fan_out", "aggregate")
    n = _worker_count(workers, focus)
    limits = _worker_timeouts(worker_timeout, n)
    durable = o.durability()
    required = math.ceil(n / 2) if min_success is None else min_success
    if not 1 <= required <= n:
        raise ConfigError(f"min_success must be between 1 and workers={n}, got {min_success}")
    check_fields(aggregate_prompt, ("task", "outputs"), "aggregate_prompt")
    started = now()
    temps = spread(n, temperatures)
    focuses: list[str | None] = [focus[i % len(focus)] if focus else None for i in range(n)]
    requests = _worker_requests(llm, task, system, temps, focuses)
    done: dict[str, CallRecord[Any]] = {}
    if previous is not None:
        done = {w.record.key: w.record for w in previous.workers if w.ok and w.record.key}
    todo = [i for i in range(n) if requests[i].key not in done]
    opts = o.run()
    each = [_within(opts, started, limits[i]) for i in todo]
    fresh = await durably(
        durable,
        n,
        lambda: run_calls(
            llm,
            [requests[i] for i in todo],
            each,
            indices=todo,
            labels=[f"worker {i}" for i in todo],
            store=o.store,
            cache=o.cache,
            durable=durable,
        ),
    )
    by_index = dict(zip(todo, fresh, strict=True))
    crew = tuple(
        Worker(i, temps[i], focuses[i], by_index.get(i) or reused(done[requests[i].key]))
        for i in range(n)
    )
    ok = [w for w in crew if w.ok]
    if len(ok) < required:
        _quorum_not_met(crew, len(ok), required, makespan=now() - started)
    answer, how, record, error = await _aggregate(
        llm if aggregate is None else aggregate,
        task,
        ok,
        aggregate_prompt,
        opts,
        o.store,
        o.cache,
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


def _worker_requests(
    llm: LLM,
    task: str,
    system: str | None,
    temps: list[float | None],
    focuses: list[str | None],
) -> list[Request]:
    """One request a worker, keyed as the engine (and a store) will see it."""
    requests = []
    for i, (temperature, area) in enumerate(zip(temps, focuses, strict=True)):
        prompt = task if area is None else f"{task}\n\nFocus on: {area}"
        requests.append(
            Request.of(
                prompt,
                system=system,
                temperature=temperature,
                sample=i,
                metadata={"pattern": "fan_out", "worker": i, "focus": area},
            )
        )
    if isinstance(llm, BaseLLM):
        requests = [llm.prepare(r) for r in requests]
    return requests


def _quorum_not_met(
    crew: tuple[Worker, ...], succeeded: int, required: int, *, makespan: float
) -> NoReturn:
    result = FanOutResult(
        answer=None,
        aggregation=None,
        workers=crew,
        required=required,
        records=tuple(w.record for w in crew),
        makespan=makespan,
    )
    raise QuorumNotMet(
        _quorum_message(crew, succeeded, required),
        succeeded=succeeded,
        required=required,
        metadata=result,
    )


def _worker_timeouts(
    worker_timeout: float | Sequence[float | None] | None, n: int
) -> list[float | None]:
    """One time limit per worker (None: none), checked."""
    if worker_timeout is None or isinstance(worker_timeout, int | float):
        limits: list[float | None] = [worker_timeout] * n
    else:
        limits = list(worker_timeout)
        if len(limits) != n:
            raise ConfigError(
                f"worker_timeout has {len(limits)} values for {n} workers; give one per "
                "worker, or one number for all"
            )
    for i, limit in enumerate(limits):
        if limit is not None and limit <= 0:
            raise ConfigError(
                f"worker_timeout of worker {i} must be > 0 seconds, got {limit}; use None "
                "for no limit"
            )
    return limits


def _within(opts: Run, started: float, limit: float | None) -> Run:
    """``opts`` for one worker: its own time limit, or the deadline if that is sooner."""
    if limit is None:
        return opts
    end = started + limit
    return replace(opts, deadline=end if opts.deadline is None else min(end, opts.deadline))


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
    opts: Run,
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
            fill(prompt, {"task": task, "outputs": _listing(ok)}, "aggregate_prompt"),
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
