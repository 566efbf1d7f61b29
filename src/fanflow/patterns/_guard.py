"""Guardrails in parallel: answer the query and check it at the same time.

The answer and the guard start together. If the guard flags the query, the answer is
withheld (the refusal is returned) and, if it is still running, cancelled. If the
guard itself fails (error, timeout, or a reply that is neither SAFE nor UNSAFE),
``fail_closed`` decides: True withholds the answer, False lets it through. Compared
with checking first and answering after, the parallel run saves the shorter of the
two latencies when the query is allowed; the result reports the saving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .._budget import Budget
from .._durable import execute_stored
from .._engine import CallOptions
from .._events import Hook
from .._llm import LLM
from .._pricing import Price
from .._retry import RetryPolicy
from .._types import CallRecord, Request, Response, Status
from ..store import Store
from ._common import PatternResult, is_llm, now, options_with, run_function, text_of
from ._parsing import find_json
from ._prompt import check_fields, fill

__all__ = ["DEFAULT_GUARD_PROMPT", "DEFAULT_REFUSAL", "GuardedResult", "guarded", "read_verdict"]

DEFAULT_GUARD_PROMPT = (
    "You are a safety filter. Decide whether answering the user's message below would "
    "be harmful, abusive, or against policy.\n\nUser message:\n{query}\n\n"
    "Reply with exactly one word: UNSAFE if it must not be answered, otherwise SAFE."
)
DEFAULT_REFUSAL = "Sorry, I can't help with that request."

Guard = LLM | Callable[[str], Any] | None


def read_verdict(text: str) -> bool:
    """True if a guard's reply flags the query, False if it clears it.

    Reads ``{"flagged": true}`` / ``{"safe": false}`` JSON, else the words UNSAFE /
    SAFE (UNSAFE wins when both appear). Raises ValueError for anything else.
    """
    data = find_json(text)
    if isinstance(data, dict):
        for key, flags in (("flagged", True), ("unsafe", True), ("safe", False)):
            if isinstance(data.get(key), bool):
                return bool(data[key]) is flags
    lowered = text.casefold()
    if "unsafe" in lowered:
        return True
    if "safe" in lowered:
        return False
    raise ValueError(f"the guard's reply says neither SAFE nor UNSAFE: {text[:200]!r}")


def _verdict(response: Response) -> bool:
    return read_verdict(response.text)


@dataclass(frozen=True, kw_only=True, repr=False)
class GuardedResult(PatternResult):
    """What the caller may show, and how it was decided.

    Attributes:
        output: the answer, or the refusal when it was withheld (None if the answer was
            allowed but its call failed: see ``answer.error``).
        allowed: True when the answer was let through.
        flagged: the guard's verdict (None when the guard failed).
        first_finished: ``"guard"`` or ``"answer"``: which call ended first.
        time_saved: seconds saved against checking first and answering after.
        guard: the guard's record (its value is the verdict).
        answer: the answer's record (``cancelled`` when withheld while still running).
    """

    output: str | None
    allowed: bool
    flagged: bool | None
    first_finished: Literal["guard", "answer"]
    time_saved: float
    guard: CallRecord[Any] = field(repr=False)
    answer: CallRecord[str] = field(repr=False)

    @property
    def refused(self) -> bool:
        return not self.allowed

    @property
    def guard_error(self) -> BaseException | None:
        return self.guard.error


async def _check(
    guard: Guard,
    llm: LLM,
    query: str,
    prompt: str,
    opts: CallOptions,
    store: Store | None,
    cache: bool,
) -> CallRecord[Any]:
    if guard is None or is_llm(guard):
        request = Request.of(
            fill(prompt, {"query": query}, "guard_prompt"),
            temperature=0.0,
            metadata={"pattern": "guarded", "role": "guard"},
        )
        model: Any = llm if guard is None else guard
        return await execute_stored(
            model, request, opts, store=store, reuse=cache, label="guard", parse=_verdict
        )
    record = await run_function(cast(Callable[..., Any], guard), query, label="guard")
    if record.ok and not isinstance(record.value, bool):
        error = TypeError(
            f"the guard function returned {type(record.value).__name__}; "
            "return True to flag the query, False to allow it"
        )
        return CallRecord(Status.FAILED, error=error, start=record.start, end=record.end)
    return record


async def guarded(
    llm: LLM,
    query: str,
    *,
    guard: Guard = None,
    guard_prompt: str = DEFAULT_GUARD_PROMPT,
    refusal: str = DEFAULT_REFUSAL,
    fail_closed: bool = True,
    system: str | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    hooks: Sequence[Hook] = (),
    store: Store | None = None,
    cache: bool = True,
    budget: float | Budget | None = None,
    prices: Mapping[str, Price] | None = None,
) -> GuardedResult:
    """Answer ``query`` while a guard checks it; withhold the answer if flagged.

    Args:
        llm: the answering model.
        query: the user's message (sent as is to the answering model).
        guard: the checker: None (``llm`` with ``guard_prompt``), another model, or a
            function ``fn(query) -> bool`` (sync or async; True flags the query).
        guard_prompt: the guard model's prompt; ``{query}`` is filled in.
        refusal: returned instead of the answer when it is withheld.
        fail_closed: when the guard fails: True withholds the answer, False allows it.
        system: a system prompt for the answer.
        timeout: seconds per attempt. retry: the retry policy. hooks: receive events.
        store: a :class:`fanflow.Store` for every call it makes: a call stored before
            is served from it (``cached=True``, costing nothing), a new one is committed
            before it counts.
        cache: serve calls found in the store (False: ask the model again and store
            the new replies).
        budget: the most its calls may spend together: dollars (a number) or a
            :class:`fanflow.Budget` (share one to cap several patterns at once). Each
            attempt reserves its expected cost first; calls the budget cannot cover end
            ``skipped`` with ``BudgetExceeded`` (a skipped guard counts as a failed guard:
            ``fail_closed`` decides).
        prices: model prices beyond the built-in table, ``{model: fanflow.Price}``.

    Returns:
        A :class:`GuardedResult`.
    """
    check_fields(guard_prompt, ("query",), "guard_prompt")
    started = now()
    options = options_with(budget, prices)
    opts = options(timeout=timeout, retry=retry, hooks=hooks)
    request = Request.of(query, system=system, metadata={"pattern": "guarded", "role": "answer"})
    loop = asyncio.get_running_loop()
    answer_task = loop.create_task(
        execute_stored(llm, request, opts, store=store, reuse=cache, label="answer", parse=text_of)
    )
    guard_task = loop.create_task(_check(guard, llm, query, guard_prompt, opts, store, cache))
    try:
        checked = await guard_task
        flagged: bool | None = checked.value if checked.ok else None
        allowed = flagged is False or (flagged is None and not fail_closed)
        if allowed or answer_task.done():
            answer = await answer_task
        else:
            answer_task.cancel()
            try:
                await answer_task
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            answer = CallRecord(
                Status.CANCELLED, request=request, start=started, end=now(), label="answer"
            )
    finally:
        for t in (answer_task, guard_task):
            t.cancel()
        await asyncio.gather(answer_task, guard_task, return_exceptions=True)
    makespan = now() - started
    guard_time = checked.latency or 0.0
    sequential = guard_time + ((answer.latency or 0.0) if allowed else 0.0)
    answer_end = answer.end if answer.end is not None else float("inf")
    guard_end = checked.end if checked.end is not None else float("inf")
    return GuardedResult(
        output=(answer.value if allowed else refusal),
        allowed=allowed,
        flagged=flagged,
        first_finished="answer" if answer_end < guard_end else "guard",
        time_saved=max(0.0, sequential - makespan),
        guard=checked,
        answer=answer,
        records=(checked, answer),
        makespan=makespan,
    )
