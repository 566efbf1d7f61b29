"""Dry run: what a map would send and cost, before running it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Unpack

from .._llm import LLM, BaseLLM
from .._pricing import price_of
from .._tokens import request_tokens
from .._types import Request
from .._util import given
from ._options import Options, resolve
from ._priming import PRIME_MIN_ITEMS, cache_provider, prefix_of
from ._prompt import Prompt, build_request
from ._routecost import Call, Planner, bounds

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

    For a router or cascade (decision 0270), ``cost`` is the plan with every deployment
    healthy: a router's items spread by its weights (``fallback``: all on the first), a
    cascade's on its first tier; ``by_deployment`` gives each deployment's (or tier's)
    calls and cost in that plan, and ``cost_range`` the least and most the items may
    cost: all on the cheapest deployment to all on the dearest, or the first tier alone
    to every tier asked. ``calls`` counts the calls planned (a cascade's
    ``agreement`` samples its first tier several times an item).
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
    cost_range: tuple[float, float] | None = None
    by_deployment: Mapping[str, tuple[int, float | None]] = field(default_factory=dict)
    calls: int | None = None

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
    params = given(temperature=temperature, max_tokens=max_tokens, seed=seed)
    routed = isinstance(llm, BaseLLM) and llm.routed
    tally = _Tally()
    planner = Planner()
    first: list[Request] = []
    for index, item in enumerate(items):
        request = build_request(prompt, item, index, system=system, params=params)
        if isinstance(llm, BaseLLM):
            calls = planner.calls(llm, request, prices)
        else:
            calls = [Call(request, 1, prices, None)]
        if len(first) <= PRIME_MIN_ITEMS:
            first.append(calls[0].request)
        tally.item(calls)
        if routed:
            assert isinstance(llm, BaseLLM)
            tally.spread(bounds(llm, request, prices))
    result = tally.result(routed)
    n, cost, batch_cost = result.items, result.cost, result.batch_cost
    # A router's or cascade's deployments would each fill their own prompt cache: none
    # is planned for them.
    prefix = prefix_of(llm, first) if n > PRIME_MIN_ITEMS and not routed else None
    if prefix is None or not prefix.cacheable or cost is None:
        return result
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
    return dataclasses.replace(
        result,
        cached_cost=cost - saved,
        cached_prefix_tokens=tokens,
        batch_cached_cost=None if batch_cost is None else batch_cost - batch_saved,
    )


def _add(
    table: dict[Any, tuple[int, float | None]], key: Any, calls: int, cost: float | None
) -> None:
    had, spent = table.get(key, (0, 0.0))
    table[key] = (had + calls, None if cost is None or spent is None else spent + cost)


class _Tally:
    """The sums of an estimate, call by call."""

    def __init__(self) -> None:
        self.items = self.calls = self.input_tokens = self.output_tokens = 0
        self.cost: float | None = 0.0
        self.batch_cost: float | None = 0.0
        self.unpriced: list[str | None] = []
        self.by_model: dict[str | None, tuple[int, float | None]] = {}
        self.by_deployment: dict[str, tuple[int, float | None]] = {}
        self.range: tuple[float, float] | None = (0.0, 0.0)

    def item(self, calls: list[Call]) -> None:
        """One item's calls (one, unless a cascade samples its first tier)."""
        self.items += 1
        for call in calls:
            k, model = call.calls, call.request.model
            input_tokens, output_tokens = request_tokens(call.request)
            self.calls += k
            self.input_tokens += k * input_tokens
            self.output_tokens += k * output_tokens
            price = price_of(model, call.prices)
            cost = None if price is None else k * price.cost(input_tokens, output_tokens)
            _add(self.by_model, model, k, cost)
            if call.deployment is not None:
                _add(self.by_deployment, call.deployment, k, cost)
            if price is None or cost is None:
                if model not in self.unpriced:
                    self.unpriced.append(model)
                self.cost = self.batch_cost = None
            elif self.cost is not None and self.batch_cost is not None:
                self.cost += cost
                self.batch_cost += k * price.batch_cost(input_tokens, output_tokens)

    def spread(self, found: tuple[float, float] | None) -> None:
        """One item's least and most cost on a router or cascade (None: unknown)."""
        if found is None or self.range is None:
            self.range = None
        else:
            self.range = (self.range[0] + found[0], self.range[1] + found[1])

    def result(self, routed: bool) -> EstimateResult:
        return EstimateResult(
            self.items,
            self.input_tokens,
            self.output_tokens,
            self.cost,
            tuple(self.unpriced),
            self.batch_cost,
            self.by_model,
            cost_range=self.range if routed else None,
            by_deployment=self.by_deployment,
            calls=self.calls,
        )
