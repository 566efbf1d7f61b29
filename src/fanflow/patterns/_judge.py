"""Best-of-N: N candidates at once, then one judge call picks the best.

The judge is asked for the number of the best candidate. Its reply is read robustly:
a JSON object (``{"best": 2}``, also ``choice``/``winner``/``candidate``/``index``),
else a number after a telling word ("Candidate 2"), else the first number anywhere.

Fallback rule: if the judge fails, its reply has no number, or the number is out of
range, the winner is the first successful candidate (lowest sample index), and the
result says so (``selection="fallback"`` with ``fallback_reason``). Nothing about the
judge's reply can crash the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Unpack

from .._events import observed
from .._exceptions import AllFailed, ConfigError
from .._llm import LLM
from .._progress import with_progress
from .._types import CallRecord, Request, Response
from ._common import PatternResult, check_model, describe, now, run_calls, run_items, samples
from ._options import Options, resolve
from ._parsing import find_number
from ._prompt import check_fields, fill

__all__ = ["DEFAULT_JUDGE_PROMPT", "BestOfNResult", "best_of_n", "parse_choice"]

DEFAULT_JUDGE_PROMPT = (
    "You are judging {count} candidate answers to the same task by these criteria: "
    "{criteria}.\n\nTask:\n{task}\n\n{candidates}\n\n"
    'Reply with JSON only: {{"best": <candidate number 1-{count}>, "reason": "<one sentence>"}}'
)

Selection = Literal["judge", "fallback", "only"]
_KEYS = ("best", "choice", "winner", "candidate", "answer", "index", "number")
_WORDS = ("candidate", "answer", "option", "choice", "best", "number", "#")


def parse_choice(text: str, count: int) -> int | None:
    """The 1-based candidate number in a judge's reply, or None (no number, or out of
    ``1..count``)."""
    number = find_number(text, keys=_KEYS, words=_WORDS)
    if number is None or number != int(number) or not 1 <= number <= count:
        return None
    return int(number)


@dataclass(frozen=True, kw_only=True, repr=False)
class BestOfNResult(PatternResult):
    """The chosen candidate and how it was chosen.

    Attributes:
        best: the chosen candidate's text.
        index: its sample index (0-based, among all ``n`` candidates).
        selection: ``"judge"`` (the judge chose), ``"fallback"`` (the judge failed or
            gave no usable number: the first successful candidate), or ``"only"`` (one
            candidate succeeded: no judge call).
        fallback_reason: why the fallback rule was used.
        candidates: each candidate's record, in sample order.
        judge: the judge call's record (None when there was none).
    """

    best: str
    index: int
    selection: Selection
    fallback_reason: str | None = None
    candidates: tuple[CallRecord[str], ...] = field(default=(), repr=False)
    judge: CallRecord[Any] | None = field(default=None, repr=False)

    @property
    def judge_reply(self) -> str | None:
        response = self.judge.response if self.judge is not None else None
        return response.text if response is not None else None


@with_progress
@observed("best_of_n")
async def best_of_n(
    llm: LLM,
    task: str,
    *,
    n: int = 3,
    judge: LLM | None = None,
    criteria: str = "correctness, completeness and clarity",
    judge_prompt: str = DEFAULT_JUDGE_PROMPT,
    temperature: float | None = 0.8,
    system: str | None = None,
    progress: bool = False,
    **options: Unpack[Options],
) -> BestOfNResult:
    """Generate ``n`` candidates at once and let a judge pick the best.

    Args:
        llm: the candidates' model.
        task: the prompt.
        n: how many candidates.
        judge: the judge's model (None: ``llm``).
        criteria: what the judge weighs, in words.
        judge_prompt: the judge's prompt; ``{task}``, ``{criteria}``, ``{count}`` and
            ``{candidates}`` (numbered from 1) are filled in.
        temperature: the candidates' temperature (None: the handle's).
        system: a system prompt for the candidates.
        **options: the call options (:class:`fanflow.Options`); ``concurrency`` is the
            most candidates in flight. A judge the budget cannot cover falls back to the
            first candidate, and ``fallback_reason`` says so.

    Returns:
        A :class:`BestOfNResult`.

    Raises:
        AllFailed: no candidate succeeded (each one's error is listed).
    """
    o = resolve("best_of_n", options)
    check_model(llm, "best_of_n")
    if judge is not None:
        check_model(judge, "best_of_n", "judge")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    check_fields(judge_prompt, ("task", "criteria", "count", "candidates"), "judge_prompt")
    started = now()
    opts = o.run()
    requests = samples(
        task, n, system=system, temperature=temperature, pattern="best_of_n", role="candidate"
    )
    labels: list[str | None] = [f"candidate {i}" for i in range(n)]
    candidates = await run_items(llm, requests, opts, o, labels=labels)
    ok = [r for r in candidates if r.ok]
    if not ok:
        raise AllFailed(
            f"best_of_n: all {n} candidates failed",
            [r.error or RuntimeError(describe(r)) for r in candidates],
        )

    def result(
        chosen: CallRecord[str],
        selection: Selection,
        reason: str | None = None,
        judged: CallRecord[Any] | None = None,
    ) -> BestOfNResult:
        assert chosen.value is not None
        assert chosen.index is not None
        return BestOfNResult(
            best=chosen.value,
            index=chosen.index,
            selection=selection,
            fallback_reason=reason,
            candidates=tuple(candidates),
            judge=judged,
            records=tuple(candidates) + ((judged,) if judged is not None else ()),
            makespan=now() - started,
        )

    if len(ok) == 1:
        return result(ok[0], "only")
    listing = "\n\n".join(f"Candidate {k}:\n{r.value}" for k, r in enumerate(ok, 1))
    judge_request = Request.of(
        fill(
            judge_prompt,
            {"task": task, "criteria": criteria, "count": len(ok), "candidates": listing},
        ),
        temperature=0.0,
        metadata={"pattern": "best_of_n", "role": "judge"},
    )

    def choose(response: Response) -> int | None:
        return parse_choice(response.text, len(ok))

    [judged] = await run_calls(
        judge or llm,
        [judge_request],
        opts,
        labels=["judge"],
        parse=choose,
        store=o.store,
        cache=o.cache,
    )
    if not judged.ok:
        return result(ok[0], "fallback", f"the judge failed: {describe(judged)}", judged)
    if judged.value is None:
        reply = judged.response.text if judged.response is not None else ""
        reason = f"the judge's reply named no candidate in 1..{len(ok)}: {reply[:200]!r}"
        return result(ok[0], "fallback", reason, judged)
    return result(ok[judged.value - 1], "judge", None, judged)
