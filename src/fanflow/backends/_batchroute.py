"""Batch mode over a router or a cascade (decision 0272).

Each handle a routed handle's calls run on (a router's deployments, a cascade's tiers,
nested ones too) gets a batching handle of its own, over its provider's batch API and a
:class:`~fanflow.backends._batch.BatchQueue` of its own, and the same routing runs over
those (``Routed.with_handles``). So a spread router's items go into each deployment's
batches by its weights, a fallback's into the first's, a cascade's first tier's into
that tier's batches and the escalated ones into the next tier's; what a deployment's
batches cannot answer (its key refused, its batches failing past their retries) moves
to the next deployment's batches with fresh attempts, as in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from .._batchapi import BatchAPI
from .._durable import cache_key
from .._exceptions import ConfigError
from .._llm import LLM, BaseLLM
from .._pricing import Price
from .._router import Routed, Router
from .._types import Request
from ._batch import BatchQueue, MemoryJournal, batch_api_of
from ._batchllm import BatchLLM

__all__ = ["Queues", "batch_apis", "batching"]

#: Makes the batching handle of one handle, given that deployment's own price (None:
#: the pattern's).
Make = Callable[[BaseLLM, Price | None], BaseLLM]


def batch_apis(llm: LLM, mode: str) -> list[BatchAPI]:
    """The batch API of each handle ``llm``'s calls run on, or a ConfigError naming the
    deployment (or tier) that has none."""
    if not isinstance(llm, Routed):
        return [batch_api_of(llm, mode)]
    apis: list[BatchAPI] = []
    for info, handle in zip(llm.infos, llm.handles, strict=True):
        try:
            apis += batch_apis(handle, mode)
        except ConfigError as exc:
            raise ConfigError(f"{llm!r}, deployment {info.name!r}: {exc}") from None
    return apis


def batching(llm: BaseLLM, make: Make, price: Price | None = None) -> BaseLLM:
    """``llm`` with each handle its calls run on replaced by ``make``'s batching one."""
    if not isinstance(llm, Routed):
        return make(llm, price)
    own = llm.own_prices() if isinstance(llm, Router) else [None] * len(llm.handles)
    made = llm.with_handles([batching(h, make, p) for h, p in zip(llm.handles, own, strict=True)])
    if isinstance(made, Router) and not all(_fresh(h) for h in made.handles):
        made.prefer = _journaled(made)
    return made


def _fresh(llm: BaseLLM) -> bool:
    """Whether nothing of ``llm``'s can be in a batch already (no journal to resume)."""
    return isinstance(llm, BatchLLM) and isinstance(llm.queue.journal, MemoryJournal)


def _journaled(router: Router) -> Callable[[Request], BaseLLM | None]:
    """The deployment whose journal has a request in a batch already: a resumed job's
    item waits for that batch rather than going into another deployment's."""

    def prefer(request: Request) -> BaseLLM | None:
        for llm in router.handles:
            if isinstance(llm, BatchLLM):
                key = cache_key(llm.inner, llm.prepare(request))
                if llm.queue.journal.batch_of(key) is not None:
                    return llm
        return None

    return prefer


class Queues:
    """The batch queues of one run (one per deployment), switched and closed together."""

    def __init__(self, queues: Sequence[BatchQueue]) -> None:
        self.queues = tuple(queues)

    @property
    def switched(self) -> bool:
        return all(q.switched for q in self.queues)

    @property
    def unanswered(self) -> int:
        return sum(q.unanswered for q in self.queues)

    def switch(self) -> None:
        for queue in self.queues:
            queue.switch()

    async def cancel_running(self) -> None:
        await asyncio.gather(*(q.cancel_running() for q in self.queues))

    async def __aenter__(self) -> Queues:
        self._stack = contextlib.AsyncExitStack()
        for queue in self.queues:
            await self._stack.enter_async_context(queue)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()
