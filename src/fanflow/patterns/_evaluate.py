"""Evaluation: one call per criterion, all at once, each returning a score and why.

The score is read from a JSON reply (``{"score": 7, "explanation": "..."}``), else from
"Score: 7/10"-style text, else the first number. A reply with no score, or a score
outside the scale, ends that criterion ``failed`` with a ``ParseError`` (the reply is
kept in its record); the other criteria are unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._budget import Budget
from .._events import Hook
from .._exceptions import ConfigError
from .._llm import LLM
from .._pricing import Price
from .._retry import RetryPolicy
from .._types import CallRecord, Request, Response
from ..store import Store
from ._common import PatternResult, RecordView, now, options_with, run_calls
from ._parsing import find_json, find_number
from ._prompt import check_fields, fill

__all__ = ["DEFAULT_EVALUATE_PROMPT", "Evaluation", "Score", "evaluate"]

DEFAULT_EVALUATE_PROMPT = (
    "Rate the following content for {criterion} on a scale from {low} to {high}.\n\n"
    "Content:\n{content}\n\n"
    'Reply with JSON only: {{"score": <{low}-{high}>, "explanation": "<one or two sentences>"}}'
)


@dataclass(frozen=True, repr=False)
class Score(RecordView):
    """One criterion's outcome: the score, the explanation and the call's record."""

    criterion: str
    record: CallRecord[tuple[float, str]]

    def __repr__(self) -> str:
        return f"fanflow.Score({self.criterion!r}, score={self.score}, status={self.status.value})"

    @property
    def score(self) -> float | None:
        return self.record.value[0] if self.record.value is not None else None

    @property
    def explanation(self) -> str | None:
        return self.record.value[1] if self.record.value is not None else None


@dataclass(frozen=True, kw_only=True, repr=False)
class Evaluation(PatternResult):
    """Every criterion's :class:`Score`, in the order given."""

    criteria: tuple[Score, ...]

    def __getitem__(self, criterion: str) -> Score:
        for s in self.criteria:
            if s.criterion == criterion:
                return s
        raise KeyError(criterion)

    @property
    def scores(self) -> dict[str, float | None]:
        """Score per criterion (None where it failed)."""
        return {s.criterion: s.score for s in self.criteria}

    @property
    def mean(self) -> float | None:
        """The mean of the scores that were read (None if none was)."""
        got = [s.score for s in self.criteria if s.score is not None]
        return sum(got) / len(got) if got else None


def _reader(low: int, high: int) -> Any:
    def read(response: Response) -> tuple[float, str]:
        text = response.text
        score = find_number(text, keys=("score", "rating"), words=("score", "rating"))
        if score is None:
            raise ValueError(f"no score in the reply {text[:200]!r}")
        if not low <= score <= high:
            raise ValueError(f"score {score:g} is outside {low}..{high} in {text[:200]!r}")
        data = find_json(text)
        explanation = text.strip()
        if isinstance(data, dict):
            for key in ("explanation", "reason", "reasoning", "rationale"):
                if isinstance(data.get(key), str):
                    explanation = data[key]
                    break
        return score, explanation

    return read


async def evaluate(
    llm: LLM,
    content: str,
    criteria: Sequence[str] = ("accuracy", "clarity", "completeness", "tone"),
    *,
    scale: tuple[int, int] = (1, 10),
    prompt: str = DEFAULT_EVALUATE_PROMPT,
    system: str | None = None,
    temperature: float | None = 0.0,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int | None = None,
    hooks: Sequence[Hook] = (),
    store: Store | None = None,
    cache: bool = True,
    budget: float | Budget | None = None,
    prices: Mapping[str, Price] | None = None,
) -> Evaluation:
    """Score ``content`` on every criterion at once, one call per criterion.

    Args:
        llm: the grader model.
        content: what to evaluate.
        criteria: the criteria, each a short phrase.
        scale: the inclusive score range.
        prompt: the grader's prompt; ``{criterion}``, ``{content}``, ``{low}`` and
            ``{high}`` are filled in.
        system: a system prompt. temperature: the graders' temperature.
        timeout: seconds per attempt. retry: the retry policy.
        concurrency: the most criteria in flight. hooks: receive every call's events.
        store: a :class:`fanflow.Store` for every call it makes: a call stored before
            is served from it (``cached=True``, costing nothing), a new one is committed
            before it counts.
        cache: serve calls found in the store (False: ask the model again and store
            the new replies).
        budget: the most its calls may spend together: dollars (a number) or a
            :class:`fanflow.Budget` (share one to cap several patterns at once). Each
            attempt reserves its expected cost first; calls the budget cannot cover end
            ``skipped`` with ``BudgetExceeded``.
        prices: model prices beyond the built-in table, ``{model: fanflow.Price}``.

    Returns:
        An :class:`Evaluation`; a criterion whose call or score failed is data there.
    """
    if not criteria:
        raise ConfigError("evaluate needs at least one criterion")
    low, high = scale
    if low >= high:
        raise ConfigError(f"scale must be (low, high) with low < high, got {scale}")
    fields = ("criterion", "content", "low", "high")
    check_fields(prompt, fields, "evaluate's prompt")
    started = now()
    options = options_with(budget, prices)
    opts = options(concurrency=concurrency, timeout=timeout, retry=retry, hooks=hooks)
    requests = [
        Request.of(
            fill(prompt, dict(zip(fields, (c, content, low, high), strict=True))),
            system=system,
            temperature=temperature,
            metadata={"pattern": "evaluate", "criterion": c},
        )
        for c in criteria
    ]
    records = await run_calls(
        llm,
        requests,
        opts,
        labels=list(criteria),
        parse=_reader(low, high),
        store=store,
        cache=cache,
    )
    return Evaluation(
        criteria=tuple(Score(c, r) for c, r in zip(criteria, records, strict=True)),
        records=tuple(records),
        makespan=now() - started,
    )
