"""Guardrails in parallel: answer the query and check it at the same time.

The answer and the guard start together. If the guard flags the query, the answer is
withheld (the refusal is returned) and, if it is still running, cancelled. If the
guard itself fails (error, timeout, or a reply that is neither SAFE/UNSAFE nor YES/NO:
the guard's error quotes it),
``fail_closed`` decides: True withholds the answer, False lets it through. Compared
with checking first and answering after, the parallel run saves the shorter of the
two latencies when the query is allowed; the result reports the saving.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Unpack, cast

from .._durable import Durability, execute_stored
from .._events import observed
from .._llm import LLM
from .._progress import with_progress
from .._types import CallRecord, Request, Response, Status
from ._common import (
    PatternResult,
    check_model,
    check_model_or_function,
    durably,
    is_llm,
    now,
    run_function,
    text_of,
)
from ._options import Options, Resolved, resolve
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

    Reads ``{"flagged": true}`` / ``{"safe": false}`` JSON, else a reply that starts
    with YES or NO, read as the answer to "is it safe to answer?" (YES clears the query,
    NO flags it), else the words UNSAFE / SAFE (UNSAFE or "not safe" wins when both
    appear). A guard that asks the opposite question ("is it harmful?") passes its own
    reader:
    ``guarded(..., verdict=lambda text: text.strip().upper().startswith("YES"))``.
    Raises ValueError, quoting the reply, for anything else.
    """
    data = find_json(text)
    if isinstance(data, dict):
        for key, flags in (("flagged", True), ("unsafe", True), ("safe", False)):
            if isinstance(data.get(key), bool):
                return bool(data[key]) is flags
    first = _YES_NO.match(text)
    if first is not None:  # the answer comes first: "NO - it is not safe."
        return first.group(1).casefold() == "no"
    lowered = text.casefold()
    if "unsafe" in lowered or _NOT_SAFE.search(lowered):
        return True
    if "safe" in lowered:
        return False
    raise ValueError(
        f"the guard's reply says neither SAFE/UNSAFE nor YES/NO: {text[:200]!r}; make the "
        "guard prompt ask for one of them, or pass verdict=fn(text) -> bool (True flags)"
    )


# YES or NO as the reply's first word ("YES - it is a harmless question.").
_YES_NO = re.compile(r"\W*(yes|no)\b", re.IGNORECASE)
_NOT_SAFE = re.compile(r"\bnot\s+safe\b")


def _reader(verdict: Callable[[str], bool] | None) -> Callable[[Response], bool]:
    read = verdict or read_verdict

    def parse(response: Response) -> bool:
        flagged = read(response.text)
        if not isinstance(flagged, bool):
            raise TypeError(
                f"verdict returned {type(flagged).__name__} for the reply "
                f"{response.text[:200]!r}; return True to flag the query, False to allow it"
            )
        return flagged

    return parse


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
    run: Callable[[LLM, Request, str, Callable[[Response], Any]], Awaitable[CallRecord[Any]]],
    verdict: Callable[[str], bool] | None,
) -> CallRecord[Any]:
    if guard is None or is_llm(guard):
        request = Request.of(
            fill(prompt, {"query": query}, "guard_prompt"),
            temperature=0.0,
            metadata={"pattern": "guarded", "role": "guard"},
        )
        model: Any = llm if guard is None else guard
        return await run(model, request, "guard", _reader(verdict))
    record = await run_function(cast(Callable[..., Any], guard), query, label="guard")
    if record.ok and not isinstance(record.value, bool):
        error = TypeError(
            f"the guard function returned {type(record.value).__name__}; "
            "return True to flag the query, False to allow it"
        )
        return CallRecord(Status.FAILED, error=error, start=record.start, end=record.end)
    return record


@with_progress
@observed("guarded")
async def guarded(
    llm: LLM,
    query: str,
    *,
    guard: Guard = None,
    guard_prompt: str = DEFAULT_GUARD_PROMPT,
    refusal: str = DEFAULT_REFUSAL,
    fail_closed: bool = True,
    system: str | None = None,
    verdict: Callable[[str], bool] | None = None,
    progress: bool = False,
    **options: Unpack[Options],
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
        verdict: reads the guard model's reply: ``fn(text) -> bool``, True flags the
            query (raise if the reply cannot be read). Default :func:`read_verdict`:
            JSON, SAFE/UNSAFE, or YES/NO (YES: safe to answer).
        **options: the call options (:class:`fanflow.Options`) of both calls. A guard
            the budget cannot cover counts as a failed guard (``fail_closed`` decides).

    Returns:
        A :class:`GuardedResult`.
    """
    o = resolve("guarded", options)
    check_model(llm, "guarded")
    check_fields(guard_prompt, ("query",), "guard_prompt")
    if guard is not None:
        check_model_or_function(guard, "guarded", "guard")
    durable = o.durability()
    return await durably(
        durable,
        2,
        lambda: _guarded(
            llm,
            query,
            guard,
            guard_prompt,
            refusal,
            fail_closed,
            system,
            verdict,
            o.start(),
            durable,
        ),
    )


async def _guarded(
    llm: LLM,
    query: str,
    guard: Guard,
    guard_prompt: str,
    refusal: str,
    fail_closed: bool,
    system: str | None,
    verdict: Callable[[str], bool] | None,
    o: Resolved,
    durable: Durability | None,
) -> GuardedResult:
    started = now()
    opts = o.calls()

    def run(
        model: LLM, request: Request, label: str, parse: Callable[[Response], Any]
    ) -> Awaitable[CallRecord[Any]]:
        index = 0 if label == "answer" else 1
        if durable is not None:
            return durable.run(
                model, request, opts, index=index, item=None, label=label, parse=parse
            )
        return execute_stored(
            model,
            request,
            opts,
            store=o.store,
            reuse=o.cache,
            label=label,
            parse=parse,
        )

    request = Request.of(query, system=system, metadata={"pattern": "guarded", "role": "answer"})
    loop = asyncio.get_running_loop()
    answer_task: asyncio.Task[CallRecord[Any]] = loop.create_task(
        run(llm, request, "answer", text_of)  # type: ignore[arg-type]
    )
    guard_task = loop.create_task(_check(guard, llm, query, guard_prompt, run, verdict))
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
    if durable is not None:
        for index, record in enumerate((answer, checked)):  # the job's items 0 and 1
            durable.emit(replace(record, index=index), None)
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
