"""Dry run: what a map would send and cost, before running it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Unpack

from .._llm import LLM, BaseLLM
from .._pricing import price_of
from .._tokens import request_tokens
from .._types import Request
from ._options import Options, resolve
from ._priming import PRIME_MIN_ITEMS, cache_provider, prefix_of
from ._prompt import Prompt, build_request

__all__ = ["EstimateResult", "estimate"]


@dataclass(frozen=True, slots=True)
class EstimateResult:
    """The expected size of a map (one attempt per item, no retries).

    ``output_tokens`` is an upper bound: each request's ``max_tokens`` (or the default
    reservation when it sets none). ``cost`` is the real-time cost and ``batch_cost``
    the same through the provider's batch API (``mode="batch"``, at each price's batch
    rate); both are None when a model's price is unknown. ``by_model`` gives each
    model's calls and real-time cost (None: no price), for requests naming their own.
    ``cached_cost`` is the
    real-time cost when the prefix the items share is read from the provider's prompt
    cache, as a primed map reads it (``cached_prefix_tokens`` per call after the first;
    on Anthropic the first writes it); None when nothing can be cached.
    ``batch_cached_cost`` is ``batch_cost`` with the same prefix read from the cache
    after the first line, which on Anthropic writes it for an hour (fanflow's batch
    breakpoints ask for the 1-hour cache, 2x input); a batch's cache reads are best
    effort at the providers, so it is the lower end.
    """

    items: int
    input_tokens: int
    output_tokens: int
    cost: float | None
    unpriced_models: tuple[str | None, ...] = ()
    batch_cost: float | None = None
    by_model: Mapping[str | None, tuple[int, float | None]] = field(default_factory=dict)
    cached_cost: float | None = None
    cached_prefix_tokens: int = 0
    batch_cached_cost: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __repr__(self) -> str:
        cost = "unknown" if self.cost is None else f"${self.cost:.4f}"
        batch = "unknown" if self.batch_cost is None else f"${self.batch_cost:.4f}"
        return (
            f"fanflow.results.EstimateResult(items={self.items}, input_tokens={self.input_tokens}, "
            f"output_tokens={self.output_tokens}, cost={cost}, batch_cost={batch})"
        )


def estimate(
    llm: LLM,
    prompt: Prompt,
    items: Iterable[Any],
    *,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    **options: Unpack[Options],
) -> EstimateResult:
    """Expected tokens and cost of ``fanflow.map(llm, prompt, items, ...)``, without
    sending anything. Takes the same prompt and request options as :func:`map`, and the
    same call options (:class:`fanflow.Options`); it reads only ``prices``, so a call's
    options can be passed to both unchanged.

    Prompt tokens are estimated as for rate limits (see ``docs/decisions/0041``);
    output tokens are counted at ``max_tokens`` each, so the cost is an upper bound.

    Raises:
        TemplateError: an item lacks a field the prompt needs (as ``map`` would record).
    """
    prices = resolve("estimate", options).call.prices
    params = {
        k: v
        for k, v in (("temperature", temperature), ("max_tokens", max_tokens), ("seed", seed))
        if v is not None
    }
    n = input_total = output_total = 0
    cost: float | None = 0.0
    batch_cost: float | None = 0.0
    unpriced: list[str | None] = []
    by_model: dict[str | None, tuple[int, float | None]] = {}
    first: list[Request] = []
    for index, item in enumerate(items):
        request = build_request(prompt, item, index, system=system, params=params)
        if isinstance(llm, BaseLLM):
            request = llm.prepare(request)
        if len(first) <= PRIME_MIN_ITEMS:
            first.append(request)
        input_tokens, output_tokens = request_tokens(request)
        n += 1
        input_total += input_tokens
        output_total += output_tokens
        price = price_of(request.model, prices)
        calls, spent = by_model.get(request.model, (0, 0.0))
        if price is None or spent is None:
            by_model[request.model] = (calls + 1, None)
        else:
            by_model[request.model] = (calls + 1, spent + price.cost(input_tokens, output_tokens))
        if price is None:
            if request.model not in unpriced:
                unpriced.append(request.model)
            cost = batch_cost = None
        elif cost is not None and batch_cost is not None:
            cost += price.cost(input_tokens, output_tokens)
            batch_cost += price.batch_cost(input_tokens, output_tokens)
    prefix = prefix_of(llm, first) if n > PRIME_MIN_ITEMS else None
    if prefix is None or not prefix.cacheable or cost is None:
        return EstimateResult(
            n, input_total, output_total, cost, tuple(unpriced), batch_cost, by_model
        )
    price = price_of(first[0].model, prices)
    assert price is not None  # every model was priced (cost is not None)
    tokens = prefix.tokens
    written = tokens if cache_provider(llm) == "anthropic" else 0
    # The same calls with the shared prefix read from the cache (and written once).
    whole = price.cost(tokens, 0)
    reads = (n - 1) * (whole - price.cost(tokens, 0, cached=tokens))
    saved = reads + whole - price.cost(tokens, 0, written=written)
    # A batch: its first line writes for an hour (fanflow's batch breakpoints), at the
    # batch share.
    hour = price.cost(tokens, 0, written=written, written_1h=written)
    batch_saved = (reads + whole - hour) * price.batch
    return EstimateResult(
        n,
        input_total,
        output_total,
        cost,
        tuple(unpriced),
        batch_cost,
        by_model,
        cost - saved,
        tokens,
        None if batch_cost is None else batch_cost - batch_saved,
    )
