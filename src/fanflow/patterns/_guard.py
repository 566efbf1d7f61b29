"""Guardrails in parallel: answer the query and check it at the same time.

The answer and the guard start together. If the guard flags the query, the answer is
withheld (the refusal is returned) and, if it is still running, cancelled. If the
guard itself fails (error, timeout, or a reply that is neither SAFE/UNSAFE nor YES/NO:
the guard's error quotes it),
``fail_closed`` decides: True withholds the answer, False lets it through. Compared
with checking first and answering after, the parallel run saves the shorter of the
two latencies when the query is allowed; the result reports the saving.

A YES/NO reply answers the guard prompt's question, so which of them blocks depends on
that question: by default the guard is asked whether the query is harmful, and YES
blocks; ``block_on="NO"`` is for a prompt asking whether it is safe to answer
(docs/decisions/0160).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Unpack, cast

from .._durable import Durability, execute_stored
from .._events import observed
from .._exceptions import ConfigError
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

# The question guardrail examples ask: is the query harmful? YES blocks it.
DEFAULT_GUARD_PROMPT = (
    "You are a safety filter. Is this query requesting anything harmful, illegal, or "
    "inappropriate? Query: {query}\nAnswer YES or NO with brief explanation."
)
DEFAULT_REFUSAL = "Sorry, I can't help with that request."

Guard = LLM | Callable[[str], Any] | None
BlockOn = Literal["YES", "NO"]


def read_verdict(text: str, *, block_on: BlockOn = "YES") -> bool:
    """True if a guard's reply flags the query, False if it clears it.

    Reads ``{"flagged": true}`` / ``{"safe": false}`` JSON, else a reply that starts
    with YES or NO (``block_on`` is the one that flags: YES, for a guard asked "is it
    harmful?"; NO, for one asked "is it safe to answer?"), else the words UNSAFE / SAFE
    (UNSAFE or "not safe" wins when both appear). Raises ValueError, quoting the reply,
    for anything else.
    """
    data = find_json(text)
    if isinstance(data, dict):
        for key, flags in (("flagged", True), ("unsafe", True), ("safe", False)):
            if isinstance(data.get(key), bool):
                return bool(data[key]) is flags
    first = _YES_NO.match(text)
    if first is not None:  # the answer comes first: "YES - it asks for something illegal."
        return first.group(1).upper() == block_on
    lowered = text.casefold()
    if "unsafe" in lowered or _NOT_SAFE.search(lowered):
        return True
    if "safe" in lowered:
        return False
    raise ValueError(
        f"the guard's reply says neither SAFE/UNSAFE nor YES/NO: {text[:200]!r}; make the "
        "guard prompt ask for one of them, or pass verdict=fn(text) -> bool (True flags)"
    )


# YES or NO as the reply's first word ("YES - it asks for something illegal.").
_YES_NO = re.compile(r"\W*(yes|no)\b", re.IGNORECASE)
_NOT_SAFE = re.compile(r"\bnot\s+safe\b")
# A guard prompt that asks for YES or NO ...
_ASKS_YES_NO = (re.compile(r"\byes\b", re.IGNORECASE), re.compile(r"\bno\b", re.IGNORECASE))
# ... to the question "may it be answered?", where YES clears the query: "is it safe",
# "is this request safe to answer", "may I answer", "is it allowed", "OK to reply".
_ASKS_IF_ALLOWED = re.compile(
    r"\b(?:is|are)\s+(?:\w+\s+){0,3}?"
    r"(?:safe|allowed|permitted|acceptable|ok|okay|appropriate|fine)\b"
    r"|\b(?:safe|ok|okay|allowed|permitted|fine)\s+to\s+(?:answer|respond|reply|help|assist)\b"
    r"|\b(?:may|can|could|should)\s+(?:i|we|you)\s+(?:safely\s+)?"
    r"(?:answer|respond|reply|help|assist)\b",
    re.IGNORECASE,
)


def _polarity(
    guard: Guard,
    guard_prompt: str,
    block_on: str | None,
    verdict: Callable[[str], bool] | None,
) -> BlockOn:
    """Which YES/NO reply flags the query: ``block_on``, else YES.

    Raises:
        ConfigError: ``block_on`` is not YES or NO, or cannot apply (with ``verdict=``,
            a guard function, or the default prompt, whose question YES answers), or it
            is missing while a guard model is asked for YES/NO to "may it be answered?".
    """
    reads_prompt = verdict is None and (guard is None or is_llm(guard))
    if block_on is None:
        asked = _ASKS_IF_ALLOWED.search(guard_prompt)
        if reads_prompt and asked and all(w.search(guard_prompt) for w in _ASKS_YES_NO):
            raise ConfigError(
                f"guarded: the guard_prompt asks {asked.group(0)!r}, to which YES clears "
                "the query, but a YES/NO reply is read as the answer to 'is it harmful?' "
                "(YES blocks); pass block_on='NO' if NO means it must not be answered, or "
                "block_on='YES' if YES does"
            )
        return "YES"
    if block_on not in ("YES", "NO"):
        raise ConfigError(f"guarded: block_on must be 'YES' or 'NO', got {block_on!r}")
    if verdict is not None:
        raise ConfigError(
            "guarded: pass verdict= or block_on=, not both (verdict= reads the whole reply)"
        )
    if not reads_prompt:
        raise ConfigError(
            "guarded: block_on= reads a guard model's YES/NO reply; the guard function "
            "returns True to flag the query itself: drop block_on="
        )
    if block_on == "NO" and guard_prompt == DEFAULT_GUARD_PROMPT:
        raise ConfigError(
            "guarded: the default guard_prompt asks whether the query is harmful (YES "
            "blocks); block_on='NO' is for a guard_prompt asking whether it is safe to answer"
        )
    return cast(BlockOn, block_on)


def _reader(verdict: Callable[[str], bool] | None, block_on: BlockOn) -> Callable[[Response], bool]:
    def parse(response: Response) -> bool:
        flagged = (
            verdict(response.text) if verdict else read_verdict(response.text, block_on=block_on)
        )
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
    parse: Callable[[Response], bool],
) -> CallRecord[Any]:
    if guard is None or is_llm(guard):
        request = Request.of(
            fill(prompt, {"query": query}, "guard_prompt"),
            temperature=0.0,
            metadata={"pattern": "guarded", "role": "guard"},
        )
        model: Any = llm if guard is None else guard
        return await run(model, request, "guard", parse)
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
    block_on: BlockOn | None = None,
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
            JSON, SAFE/UNSAFE, or a reply starting YES or NO (``block_on`` flags).
        block_on: which reply starting YES or NO withholds the answer: ``"YES"`` for
            a guard asked whether the query is harmful (the default prompt's question,
            as guardrail examples ask it), ``"NO"`` for one asked whether it is safe to answer. Not
            given: YES, unless ``guard_prompt`` asks for YES/NO to "is it safe", "may I
            answer", "is it allowed" and the like, which is a ConfigError naming this
            argument (decision 0160).
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
    parse = _reader(verdict, _polarity(guard, guard_prompt, block_on, verdict))
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
            parse,
            o,
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
    parse: Callable[[Response], bool],
    o: Resolved,
    durable: Durability | None,
) -> GuardedResult:
    started = now()
    opts = o.run()

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
    guard_task = loop.create_task(_check(guard, llm, query, guard_prompt, run, parse))
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
