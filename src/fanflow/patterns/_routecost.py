"""What a router's or cascade's items would cost, for ``fanflow.estimate``.

A routed handle names no model until a deployment is chosen, so the estimate plans each
item the way the handle would send it when every deployment is healthy (decision 0270):

- ``spread``: the items go round the deployments in proportion to their weights (each
  item to the one with the fewest items per weight so far, as the router does while all
  have room), each priced at its deployment's price;
- ``fallback``: every item on the first deployment (the backups see no call while it is
  healthy);
- a cascade: the first tier only (``samples`` calls an item with ``agreement``), the
  calls that are certain to be made.

:func:`bounds` gives the range around that: all items on the cheapest deployment up to
all on the dearest (a router), or the first tier alone up to every tier asked (a
cascade).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .._llm import BaseLLM
from .._pricing import Price, price_of
from .._router import Router
from .._tokens import request_tokens
from .._types import Request
from ._cascade import Agreement, Cascade

__all__ = ["Call", "Planner", "bounds"]

Prices = Mapping[str, Price] | None


@dataclass(frozen=True, slots=True)
class Call:
    """Calls the estimate counts for one item on one (non-routed) handle."""

    request: Request  # as that handle sends it (its model and defaults filled in)
    calls: int
    prices: Prices  # the pattern's prices, with the deployment's own over them
    deployment: str | None  # the router's or cascade's name for it (None: not routed)


def _over(prices: Prices, member: Prices) -> Prices:
    return {**(prices or {}), **member} if member else prices


def _samples(llm: Cascade) -> int:
    """Calls a tier before the last makes for one item."""
    return llm.accept.samples if isinstance(llm.accept, Agreement) else 1


class Planner:
    """Where each item of an estimate goes; keeps the spread's counts between items."""

    def __init__(self) -> None:
        self._given: dict[int, list[int]] = {}  # id(router) -> items given to each member

    def calls(self, llm: BaseLLM, request: Request, prices: Prices) -> list[Call]:
        """The calls one item makes on ``llm`` (a handle, router or cascade)."""
        return self._plan(llm, request, prices, None, 1)

    def _plan(
        self, llm: BaseLLM, request: Request, prices: Prices, name: str | None, n: int
    ) -> list[Call]:
        if isinstance(llm, Router):
            i = self._pick(llm)
            member = llm.members[i]
            overlay = _over(prices, member.prices)
            return self._plan(member.llm, request, overlay, member.info.name, n)
        if isinstance(llm, Cascade):
            k = _samples(llm)
            return self._plan(llm.handles[0], request, prices, llm.infos[0].name, n * k)
        return [Call(llm.prepare(request), n, prices, name)]

    def _pick(self, router: Router) -> int:
        given = self._given.setdefault(id(router), [0] * len(router.members))
        if router.strategy == "fallback":
            chosen = 0
        else:
            weights = [m.weight for m in router.members]
            chosen = min(range(len(given)), key=lambda j: ((given[j] + 1) / weights[j], j))
        given[chosen] += 1
        return chosen


def _cost(llm: BaseLLM, request: Request, prices: Prices, batch: bool) -> float | None:
    prepared = llm.prepare(request)
    price = price_of(prepared.model, prices)
    if price is None:
        return None
    tokens = request_tokens(prepared)
    return price.batch_cost(*tokens) if batch else price.cost(*tokens)


def bounds(
    llm: BaseLLM, request: Request, prices: Prices, *, batch: bool = False
) -> tuple[float, float] | None:
    """The least and most one item may cost on ``llm`` (None: a price is unknown)."""
    if isinstance(llm, Router):
        found = [bounds(m.llm, request, _over(prices, m.prices), batch=batch) for m in llm.members]
        if any(b is None for b in found):
            return None
        lows, highs = zip(*[b for b in found if b is not None], strict=True)
        return min(lows), max(highs)
    if isinstance(llm, Cascade):
        k = _samples(llm)
        tiers = [bounds(t, request, prices, batch=batch) for t in llm.handles]
        if any(b is None for b in tiers):
            return None
        *early, last = [b for b in tiers if b is not None]
        return k * early[0][0], k * sum(high for _, high in early) + last[1]
    cost = _cost(llm, request, prices, batch)
    return None if cost is None else (cost, cost)
