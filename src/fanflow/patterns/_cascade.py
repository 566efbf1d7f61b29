"""Cascades: a cheap model first, a stronger one only for what it cannot answer.

``fanflow.cascade(cheap, strong, accept=fn)`` is a handle (``BaseLLM.routed``, as a
router is): each call goes to the first tier; its answer is kept when ``accept(value)``
holds (``value``: the parsed value when the pattern parses, else the reply's text),
otherwise the next tier is asked, and the last tier's answer is kept whatever it is. A
tier whose call fails escalates too. ``accept=fanflow.routing.agreement(...)`` is the
ready rule from ``vote``: the tier is sampled a few times and its answer kept when the
samples agree. The item's record holds every tier's calls (``routes``), their attempts
and cost, and ``cascade_saved``: the last tier's price for the answer's tokens less
what the item cost (FrugalGPT, Chen, Zaharia and Zou 2023).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import marshal
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .._exceptions import ConfigError
from .._llm import BaseLLM
from .._pricing import Price, price_of
from .._router import Item, Routed, call_on, check_handles, describe_all, merge
from .._types import CallRecord, Deployment, Response
from ._vote import normalize_answer

__all__ = ["Agreement", "Cascade", "agreement", "cascade"]

T = TypeVar("T")


@dataclass(frozen=True)
class Agreement:
    """The ready ``accept`` of a cascade: sample a tier ``samples`` times and keep its
    answer when the most common one (after ``normalize``, as ``vote`` counts) has at
    least ``share`` of the samples that succeeded. Made by :func:`agreement`."""

    samples: int = 3
    share: float = 1.0
    temperature: float = 0.7
    normalize: Callable[[str], str] = normalize_answer

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"agreement needs samples >= 2 to compare, got {self.samples}")
        if not 0 < self.share <= 1:
            raise ConfigError(f"share must be in (0, 1], got {self.share}")

    def key(self, value: Any) -> Any:
        return self.normalize(value) if isinstance(value, str) else value


def agreement(
    samples: int = 3,
    share: float = 1.0,
    *,
    temperature: float = 0.7,
    normalize: Callable[[str], str] = normalize_answer,
) -> Agreement:
    """A cascade's ``accept`` from ``vote``'s confidence: escalate when the cheap
    tier's ``samples`` answers (at ``temperature``) agree on less than ``share`` of
    them (default: all must agree)."""
    return Agreement(samples, share, temperature, normalize)


Accept = Callable[[Any], bool] | Agreement


def _rule(accept: Accept) -> str:
    """The acceptance rule as the cache identity names it: the same in every process
    (a function by its name, an object by its repr, never an address)."""
    if isinstance(accept, Agreement):
        normalize = getattr(accept.normalize, "__qualname__", "")
        return (
            f"agreement(samples={accept.samples}, share={accept.share}, "
            f"temperature={accept.temperature}, normalize={normalize})"
        )
    if isinstance(accept, functools.partial):
        return f"partial({_rule(accept.func)}, {accept.args!r}, {accept.keywords!r})"
    code = getattr(accept, "__code__", None)
    if isinstance(code, types.CodeType):
        # Two lambdas share a name: their code tells them apart, and the values their
        # closure and defaults hold tell one threshold from another. (A value whose
        # repr has an address differs in every process: a store miss, never a wrong hit.)
        held = [cell.cell_contents for cell in getattr(accept, "__closure__", None) or ()]
        held += [getattr(accept, "__defaults__", None), getattr(accept, "__kwdefaults__", None)]
        digest = hashlib.sha256(marshal.dumps(code) + repr(held).encode()).hexdigest()[:16]
        return f"{accept.__module__}.{accept.__qualname__}:{digest}"
    return getattr(accept, "__qualname__", None) or repr(accept)


def _value(record: CallRecord[Any]) -> Any:
    value = record.value
    return value.text if isinstance(value, Response) else value


class Cascade(Routed):
    """Tiers of models, cheapest first; made by :func:`cascade`."""

    def __init__(
        self, handles: Sequence[BaseLLM], *, accept: Accept, names: Sequence[str] | None = None
    ) -> None:
        llms = check_handles("cascade", handles)
        if len(llms) < 2:
            raise ConfigError("fanflow.cascade() needs two or more handles, cheapest first")
        if not isinstance(accept, Agreement) and not callable(accept):
            raise ConfigError(
                f"accept must be a function of the answer returning True to keep it, or "
                f"fanflow.routing.agreement(...); got {type(accept).__name__}"
            )
        super().__init__(llms, describe_all("cascade", llms, names))
        self.accept = accept

    def __repr__(self) -> str:
        names = ", ".join(repr(d.name) for d in self.infos)
        return f"fanflow.cascade({names})"

    def with_handles(
        self, handles: Sequence[BaseLLM], prices: Sequence[Price | None] | None = None
    ) -> Cascade:
        made = Cascade(handles, accept=self.accept, names=[d.name for d in self.infos])
        made.infos = self.infos
        return made

    def cache_identity(self) -> dict[str, Any]:
        """The tiers and the acceptance rule: the answer depends on all of them."""
        return {
            "protocol": "fanflow.cascade",
            "tiers": [llm.cache_identity() for llm in self.handles],
            "accept": _rule(self.accept),
        }

    async def run(self, item: Item[T], start: float) -> CallRecord[T]:
        records: list[CallRecord[T]] = []
        last = len(self.handles) - 1
        for tier, (llm, info) in enumerate(zip(self.handles, self.infos, strict=True)):
            if tier == last:
                records.append(await call_on(llm, info, item))
                break
            calls, kept = await self._tier(llm, info, item)
            records += calls
            if kept:
                break
        final = merge(records, start, asyncio.get_running_loop().time())
        saved = _saved(final, self.handles[-1], self.infos[-1], item.opts.prices)
        return dataclasses.replace(final, cascade_saved=saved)

    async def _tier(
        self, llm: BaseLLM, info: Deployment, item: Item[T]
    ) -> tuple[list[CallRecord[T]], bool]:
        """One tier's calls (its answer last) and whether its answer is kept."""
        accept = self.accept
        if not isinstance(accept, Agreement):
            record = await call_on(llm, info, item)
            try:
                kept = record.ok and bool(accept(_value(record)))
            except Exception:  # a rule that cannot judge this answer: ask the next tier
                kept = False
            return [record], kept
        request = item.request
        if request.temperature is None:
            request = request.with_options(temperature=accept.temperature)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(call_on(llm, info, item, request=request.with_options(sample=i)))
                for i in range(accept.samples)
            ]
        samples = [t.result() for t in tasks]
        counts: dict[Any, int] = {}
        for r in samples:
            if r.ok:
                key = accept.key(_value(r))
                counts[key] = counts.get(key, 0) + 1
        if not counts:
            return samples, False
        top = max(counts, key=lambda k: counts[k])
        kept = counts[top] / sum(counts.values()) >= accept.share
        answer = next(r for r in samples if r.ok and accept.key(_value(r)) == top)
        return [r for r in samples if r is not answer] + [answer], kept


def _saved(
    final: CallRecord[Any],
    strong: BaseLLM,
    info: Deployment,
    prices: Mapping[str, Price] | None,
) -> float | None:
    """The last tier's price for the answer's tokens, less what the item cost."""
    if not final.ok or final.cost is None or final.response is None:
        return None
    if final.deployment == info:
        # The last tier answered: what the earlier tiers cost was spent for nothing.
        return -sum(r.cost or 0.0 for r in final.routes)
    price = price_of(strong.model, prices)
    if price is None:
        return None
    usage = final.response.usage
    return price.cost(usage.input_tokens, usage.output_tokens) - final.cost


def cascade(*handles: BaseLLM, accept: Accept, names: Sequence[str] | None = None) -> Cascade:
    """One handle over tiers of models, cheapest first: each call goes to the first;
    its answer is kept when ``accept(answer)`` is true (the parsed value when the
    pattern parses, else the text), otherwise the next tier is asked; the last tier's
    answer is kept whatever it is. A failed call escalates too.

    Args:
        handles: the tiers, cheapest first (two or more, each a handle of its own).
        accept: a function of a tier's answer, True to keep it, or
            :func:`agreement` (``vote``'s confidence: keep it when the tier's samples
            agree). A function that raises escalates the item.
        names: each tier's name in records and the summary (default: model@host).

    Returns:
        A handle: pass it to any pattern. ``result.summary.answered_by`` counts the
        items each tier answered, ``result.summary.cascade_saved`` the dollars saved
        against asking the last tier only.
    """
    return Cascade(handles, accept=accept, names=names)
