"""Self-consistency voting: sample a task several times, take the majority answer.

Answers are normalised before counting (by default: whitespace collapsed, case folded,
a trailing period dropped; or a function of yours, e.g. one that extracts the final
answer). Failed samples are excluded from the count and reported.

Tie rule: among answers with the top count, the winner is the one that first appeared
at the lowest sample index. ``tied`` lists every answer sharing the top count.

With ``early_stop=True`` samples are drawn in waves, and sampling stops after a wave
once either the leader cannot be overtaken by the samples left, or the Beta stopping
rule of Adaptive-Consistency (Aggarwal et al., EMNLP 2023) holds: with ``v1`` and ``v2``
the counts of the two leading answers, ``P(p > 0.5) > threshold`` for
``p ~ Beta(v1 + 1, v2 + 1)`` (docs/decisions/0021).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Unpack

from .._events import observed
from .._exceptions import AllFailed, BudgetExceeded, ConfigError
from .._llm import LLM
from .._progress import with_progress
from .._types import CallRecord, Response, Status
from ._common import (
    PatternResult,
    check_model,
    durably,
    now,
    run_calls,
    sample,
    spread,
)
from ._options import Options, resolve

__all__ = ["VoteResult", "beta_confidence", "normalize_answer", "vote"]

Normalize = Callable[[str], Any] | Literal["default"] | None
StopReason = Literal["unbeatable", "beta"]


def normalize_answer(text: str) -> str:
    """The default normaliser: collapse whitespace, case-fold, drop a trailing period."""
    return " ".join(text.split()).casefold().rstrip(".").strip()


def beta_confidence(v1: int, v2: int) -> float:
    """``P(p > 0.5)`` for ``p ~ Beta(v1 + 1, v2 + 1)`` (exact, for integer counts).

    For integer ``a, b`` the regularised incomplete beta function is a binomial sum:
    ``P(p <= 1/2) = sum_{j=a}^{a+b-1} C(a+b-1, j) / 2^(a+b-1)``.
    """
    a, b = v1 + 1, v2 + 1
    m = a + b - 1
    return float(sum(math.comb(m, j) for j in range(a)) / 2**m)


@dataclass(frozen=True, kw_only=True, repr=False)
class VoteResult(PatternResult):
    """The majority answer, how sure it is, and every sample.

    It unpacks as ``winner, confidence = result``.

    Attributes:
        winner: the winning normalised answer.
        confidence: ``count / n_counted``, the winner's share of the samples that were
            counted (failed samples left out): the same as ``share_of_counted``. Two
            failed samples of five and three agreeing give 1.0; ``share_of_samples``
            (``count / samples_used``) gives 0.6.
        count: the winner's count.
        n_counted: samples that succeeded and were counted.
        distribution: count per normalised answer, most common first (ties in order of
            first appearance).
        tied: every answer sharing the top count (one element when there is no tie).
        samples_used: samples drawn (counted + failed; not those the budget skipped).
        stopped_early: True when early stopping left samples undrawn.
        stop_reason: ``"unbeatable"`` or ``"beta"`` when stopped early.
        samples: the record of every sample, in sample order (value: normalised answer).
    """

    winner: Any
    confidence: float
    count: int
    n_counted: int
    distribution: dict[Any, int]
    tied: tuple[Any, ...]
    samples_used: int
    stopped_early: bool = False
    stop_reason: StopReason | None = None

    def __iter__(self) -> Iterator[Any]:
        """``winner, confidence = result``."""
        return iter((self.winner, self.confidence))

    @property
    def share_of_counted(self) -> float:
        """``count / n_counted``: the winner's share of the samples counted (this is
        ``confidence``)."""
        return self.count / self.n_counted

    @property
    def share_of_samples(self) -> float:
        """``count / samples_used``: the winner's share of every sample drawn, the
        failed ones included."""
        return self.count / self.samples_used if self.samples_used else 0.0

    @property
    def samples(self) -> tuple[CallRecord[Any], ...]:
        return self.records

    @property
    def failures(self) -> dict[int, BaseException]:
        """Failed samples by sample index (excluded from the count)."""
        return {i: r.error for i, r in enumerate(self.records) if r.error is not None and not r.ok}

    @property
    def tie(self) -> bool:
        return len(self.tied) > 1


def _tally(records: Sequence[CallRecord[Any]]) -> tuple[dict[Any, int], dict[Any, int]]:
    counts: dict[Any, int] = {}
    first: dict[Any, int] = {}
    for i, r in enumerate(records):
        if r.status is Status.SUCCEEDED:
            counts[r.value] = counts.get(r.value, 0) + 1
            first.setdefault(r.value, i)
    return counts, first


def _ranked(counts: dict[Any, int], first: dict[Any, int]) -> list[tuple[Any, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], first[kv[0]]))


def _should_stop(ranked: list[tuple[Any, int]], left: int, threshold: float) -> StopReason | None:
    if not ranked:
        return None
    v1 = ranked[0][1]
    v2 = ranked[1][1] if len(ranked) > 1 else 0
    if v1 > v2 + left:
        return "unbeatable"
    if beta_confidence(v1, v2) > threshold:
        return "beta"
    return None


class _DefaultTemperature(float):
    """vote's default temperature (0.7), told apart from a 0.7 the caller passed, so
    that ``temperature=`` and ``temperatures=`` given together can be refused."""

    __slots__ = ()


_DEFAULT_TEMPERATURE: float = _DefaultTemperature(0.7)


@with_progress
@observed("vote")
async def vote(
    llm: LLM | Sequence[LLM],
    task: str | Sequence[str],
    *,
    n: int = 5,
    temperature: float | None = _DEFAULT_TEMPERATURE,
    temperatures: tuple[float, float] | None = None,
    normalize: Normalize = "default",
    early_stop: bool = False,
    wave: int | None = None,
    threshold: float = 0.95,
    system: str | None = None,
    progress: bool = False,
    **options: Unpack[Options],
) -> VoteResult:
    """Sample ``task`` up to ``n`` times and return the majority answer.

    ``winner, confidence = await fanflow.vote(llm, task)`` unpacks the result.

    Args:
        llm: the model, or several models: sample *i* uses ``llm[i % len(llm)]``.
        task: the prompt, or several prompts: sample *i* uses ``task[i % len(task)]``.
        n: the most samples to draw.
        temperature: sampling temperature of every sample (None: the handle's).
        temperatures: ``(low, high)``: spread the samples' temperatures evenly over the
            range, as :func:`fan_out` does (instead of ``temperature``: not both).
        normalize: ``"default"`` (:func:`normalize_answer`), None (exact text), or a
            function of the reply text returning a hashable answer. If it raises, that
            sample fails with a ``ParseError`` and is not counted.
        early_stop: sample in waves and stop once the result is settled (see the module
            docstring); ``samples_used`` says how many were drawn.
        wave: samples per wave with ``early_stop`` (default: :func:`default_wave`); only
            with ``early_stop=True``.
        threshold: the Beta rule's confidence threshold.
        system: a system prompt.
        **options: the call options (:class:`fanflow.Options`); ``concurrency`` is the
            most samples in flight; samples the budget cannot cover are not counted.

    Returns:
        A :class:`VoteResult`.

    Raises:
        AllFailed: no sample succeeded (each sample's error is listed).
    """
    o = resolve("vote", options)
    models = list(llm) if isinstance(llm, Sequence) else [llm]
    prompts = [task] if isinstance(task, str) else list(task)
    _check_counts(models, prompts, n)
    _check_sampling(temperature, temperatures, early_stop=early_stop, wave=wave)
    if not 0.5 <= threshold < 1:
        raise ConfigError(f"threshold must be in [0.5, 1), got {threshold}")
    size = default_wave(n) if wave is None else wave
    norm = _normalizer(normalize)

    def parse(response: Response) -> Any:
        return norm(response.text) if norm is not None else response.text

    started = now()
    opts = o.run()
    durable = o.durability()
    plain = None if temperature is None else float(temperature)  # not the marker type
    temps = spread(n, temperatures) if temperatures is not None else [plain] * n
    everything = [
        sample(
            prompts[i % len(prompts)],
            i,
            system=system,
            temperature=temps[i],
            pattern="vote",
            role="sample",
        )
        for i in range(n)
    ]
    records: list[CallRecord[Any]] = []
    reason: StopReason | None = None

    async def draw() -> StopReason | None:
        while len(records) < n:
            batch = range(len(records), n if not early_stop else min(n, len(records) + size))
            records.extend(
                await run_calls(
                    models[0],
                    everything[batch.start : batch.stop],
                    opts,
                    models=[models[i % len(models)] for i in batch],
                    indices=list(batch),
                    labels=[f"sample {i}" for i in batch],
                    parse=parse,
                    store=o.store,
                    cache=o.cache,
                    durable=durable,
                )
            )
            if any(isinstance(r.error, BudgetExceeded) for r in records):
                return None  # the budget is spent: later waves would be skipped too
            if early_stop and len(records) < n:
                stop = _should_stop(_ranked(*_tally(records)), n - len(records), threshold)
                if stop is not None:
                    return stop
        return None

    reason = await durably(durable, n, draw)
    return _result(records, reason, makespan=now() - started)


def _check_counts(models: list[LLM], prompts: list[str], n: int) -> None:
    """Refuse a vote that could not ask every model and prompt it was given."""
    if not models or not prompts:
        raise ConfigError("vote needs at least one model and one prompt")
    for model in models:
        check_model(model, "vote")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    for count, what in ((len(models), "models"), (len(prompts), "prompts")):
        if count > n:
            raise ConfigError(
                f"vote got {count} {what} but n={n} samples, so the last {count - n} would "
                f"never be asked (sample i uses number i % {count}); raise n to at least "
                f"{count} or pass fewer {what}"
            )


def _check_sampling(
    temperature: float | None,
    temperatures: tuple[float, float] | None,
    *,
    early_stop: bool,
    wave: int | None,
) -> None:
    """Refuse sampling options that contradict each other."""
    if temperatures is not None and temperature is not _DEFAULT_TEMPERATURE:
        raise ConfigError(
            f"vote got both temperature={temperature} and temperatures={temperatures}; "
            "give temperature= for one temperature or temperatures=(low, high) to spread "
            "the samples over a range, not both"
        )
    if wave is not None and not early_stop:
        raise ConfigError(
            f"vote got wave={wave} without early_stop=True: samples are drawn in waves "
            "only with early_stop; pass early_stop=True or leave wave out"
        )
    if wave is not None and wave < 1:
        raise ConfigError(f"wave must be >= 1, got {wave}")


def _normalizer(normalize: Normalize) -> Callable[[str], Any] | None:
    """The function that turns a reply into the answer counted (None: the exact text)."""
    if normalize == "default":
        return normalize_answer
    if normalize is None or callable(normalize):
        return normalize
    raise ConfigError(f"normalize must be 'default', None or a function, got {normalize!r}")


def _result(
    records: list[CallRecord[Any]], reason: StopReason | None, *, makespan: float
) -> VoteResult:
    """Count the samples that succeeded; AllFailed when none did."""
    counts, first = _tally(records)
    ranked = _ranked(counts, first)
    if not ranked:
        raise AllFailed(
            f"vote: all {len(records)} samples failed; nothing to count",
            [r.error or RuntimeError(str(r.status)) for r in records],
        )
    winner, top = ranked[0]
    counted = sum(counts.values())
    return VoteResult(
        winner=winner,
        confidence=top / counted,
        count=top,
        n_counted=counted,
        distribution=dict(ranked),
        tied=tuple(answer for answer, c in ranked if c == top),
        samples_used=sum(1 for r in records if r.status is not Status.SKIPPED),
        stopped_early=reason is not None,
        stop_reason=reason,
        records=tuple(records),
        makespan=makespan,
    )


def default_wave(n: int) -> int:
    """Samples per early-stop wave: a majority of ``n`` for small ``n``, at most 5.

    A first wave of ``ceil((n + 1) / 2)`` unanimous samples settles a small vote at
    once; for large ``n``, waves of 5 let the Beta rule stop early (5 of 5 agreeing
    gives ``P = 0.984``).
    """
    return max(1, min(n, math.ceil((n + 1) / 2), 5))
