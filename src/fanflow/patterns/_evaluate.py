"""Evaluation: one call per criterion, all at once, each returning a score and why.

The score is read from a JSON reply (``{"score": 7, "explanation": "..."}``), else from
"Score: 7/10"-style text, else the first number. A reply with no score, or a score
outside the scale, ends that criterion ``failed`` with a ``ParseError`` (the reply is
kept in its record); the other criteria are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Unpack

from .._events import observed
from .._exceptions import ConfigError
from .._llm import LLM
from .._progress import with_progress
from .._types import CallRecord, Request, Response
from ._common import PatternResult, RecordView, check_model, now, run_items
from ._options import Options, resolve
from ._parsing import find_json, find_number
from ._prompt import check_fields, fill

__all__ = ["DEFAULT_EVALUATE_PROMPT", "EvaluateResult", "Score", "evaluate"]

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
        status = self.status.value
        return f"fanflow.results.Score({self.criterion!r}, score={self.score}, status={status})"

    @property
    def score(self) -> float | None:
        return self.record.value[0] if self.record.value is not None else None

    @property
    def explanation(self) -> str | None:
        return self.record.value[1] if self.record.value is not None else None


@dataclass(frozen=True, kw_only=True, repr=False)
class EvaluateResult(PatternResult):
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


@with_progress
@observed("evaluate")
async def evaluate(
    llm: LLM,
    content: str,
    criteria: Sequence[str] = ("accuracy", "clarity", "completeness", "tone"),
    *,
    scale: tuple[int, int] = (1, 10),
    prompt: str = DEFAULT_EVALUATE_PROMPT,
    system: str | None = None,
    temperature: float | None = 0.0,
    progress: bool = False,
    **options: Unpack[Options],
) -> EvaluateResult:
    """Score ``content`` on every criterion at once, one call per criterion.

    Args:
        llm: the grader model.
        content: what to evaluate.
        criteria: the criteria, each a short phrase.
        scale: the inclusive score range.
        prompt: the grader's prompt; ``{criterion}``, ``{content}``, ``{low}`` and
            ``{high}`` are filled in.
        system: a system prompt. temperature: the graders' temperature.
        **options: the call options (:class:`fanflow.Options`); ``concurrency`` is the
            most criteria in flight.

    Returns:
        An :class:`EvaluateResult`; a criterion whose call or score failed is data there.
    """
    o = resolve("evaluate", options)
    check_model(llm, "evaluate")
    if not criteria:
        raise ConfigError("evaluate needs at least one criterion")
    low, high = scale
    if low >= high:
        raise ConfigError(f"scale must be (low, high) with low < high, got {scale}")
    fields = ("criterion", "content", "low", "high")
    check_fields(prompt, fields, "evaluate's prompt")
    started = now()
    requests = [
        Request.of(
            fill(prompt, dict(zip(fields, (c, content, low, high), strict=True))),
            system=system,
            temperature=temperature,
            metadata={"pattern": "evaluate", "criterion": c},
        )
        for c in criteria
    ]
    records = await run_items(
        llm, requests, o.run(), o, labels=list(criteria), parse=_reader(low, high)
    )
    return EvaluateResult(
        criteria=tuple(Score(c, r) for c, r in zip(criteria, records, strict=True)),
        records=tuple(records),
        makespan=now() - started,
    )
