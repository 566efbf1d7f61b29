"""The batching handle: a model call that is one line of a provider batch.

:class:`BatchLLM` wraps the caller's handle; the engine runs it like any handle, so a
batched call's record is made exactly as a real-time one's. Its one "attempt" puts the
request into the :class:`~fanflow.backends._batch.BatchQueue` and waits for its line;
after an ``auto`` switch it makes one real-time attempt through the caller's handle,
within its lane. :func:`realtime_reserve` is ``auto``'s estimate of how long real time
needs for what is left.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

from .._batchinfo import BATCH, BatchInfo, batch_info
from .._durable import cache_identity, cache_key
from .._exceptions import BatchIncomplete
from .._limits import Limits
from .._llm import BaseLLM
from .._pricing import Price, price_of, priced
from .._tokens import request_tokens
from .._types import Request, Response
from ._batch import BatchOptions, BatchQueue

__all__ = ["BatchLLM", "realtime_reserve"]


class BatchLLM(BaseLLM):
    """A handle whose attempts go through a provider batch (or real time, after an
    ``auto`` switch). Made by the batch backend around the caller's handle."""

    def __init__(
        self,
        inner: BaseLLM,
        queue: BatchQueue,
        *,
        window: int,
        prices: Mapping[str, Price] | None,
        realtime_timeout: float | None,
        realtime_concurrency: int | None = None,
        gate: asyncio.Semaphore | None = None,
    ) -> None:
        super().__init__(
            model=inner.model,
            limits=Limits(concurrency=window),
            retry=inner.retry,
            timeout=None,  # an attempt waits for its batch, however long it takes
        )
        self.defaults = dict(inner.defaults)
        self.inner = inner
        self.queue = queue
        self.prices = prices
        self.realtime_timeout = realtime_timeout
        # ``gate``: one shared by the batching handles of a router's deployments.
        self._gate = (
            asyncio.Semaphore(realtime_concurrency) if realtime_concurrency is not None else gate
        )

    def __repr__(self) -> str:
        return f"fanflow.BatchLLM({self.inner!r})"

    @property
    def round_trip_is_work(self) -> bool:
        """No: an attempt's round trip is mostly its wait for the batch to run."""
        return False

    @property
    def batch_priced(self) -> bool:
        """Batch price until an ``auto`` switch sends the rest in real time."""
        return not self.queue.switched

    def cache_identity(self) -> dict[str, Any]:
        """The caller's handle's: a batched answer is its model's answer."""
        return cache_identity(self.inner)

    async def complete(self, request: Request) -> Response:
        key = cache_key(self.inner, request)
        line = await self.queue.submit(key, request)
        if line is None:
            return await self._realtime(request)
        if line.kind == "succeeded" and line.response is not None:
            return self._priced(request, line.response)
        if line.error is not None:
            raise line.error
        raise BatchIncomplete(
            f"{self.queue.api.provider}: batch {line.batch_id} ended ({line.kind}) before "
            "answering this request; fanflow sends it again",
            batch_id=line.batch_id,
        )

    def _priced(self, request: Request, response: Response) -> Response:
        model = response.model or request.model
        price = price_of(model, self.prices)
        if price is None or response.usage is None:
            return response
        usage = response.usage
        cost = priced(usage, price, batch=True).dollars
        full = priced(usage, price).dollars
        return Response(
            response.text,
            usage=usage,
            model=response.model,
            finish_reason=response.finish_reason,
            latency=response.latency,
            cost=cost,
            raw=response.raw,
            extra=_saved(response, full - cost),
        )

    async def _realtime(self, request: Request) -> Response:
        """One real-time attempt through the caller's handle, within its limits."""
        inner = self.inner
        lane = inner.lane(request.model)
        tokens = request_tokens(request) if lane.needs_tokens else None
        if self._gate is not None:
            await self._gate.acquire()
        try:
            permit = await lane.acquire(tokens)
            start = asyncio.get_running_loop().time()
            response: Response | None = None
            error: BaseException | None = None
            try:
                if self.realtime_timeout is None:
                    response = await inner.complete(request)
                else:
                    async with asyncio.timeout(self.realtime_timeout):
                        response = await inner.complete(request)
            except BaseException as exc:
                error = exc
                raise
            finally:
                lane.finish(permit, start, response, error)
            return response
        finally:
            if self._gate is not None:
                self._gate.release()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _saved(response: Response, saved: float) -> dict[str, Any]:
    """The extension of a batched response, with what its batch price saved added."""
    info = batch_info(response.extra)
    if info is None:
        return dict(response.extra)
    return {**response.extra, BATCH: BatchInfo(info.batch_id, saved)}


def realtime_reserve(llm: BaseLLM, n: int, options: BatchOptions, tokens: int = 0) -> float:
    """Seconds real-time calls need for ``n`` requests (``tokens`` in all) within the
    handle's limits, with margins: ``auto`` moves to real time this long before the
    deadline."""
    if options.reserve is not None:
        return options.reserve
    if n <= 0:
        return 0.0
    limits = llm.limits
    latency = options.realtime_latency
    need = latency
    if limits.concurrency is not None:
        need = max(need, math.ceil(n / limits.concurrency) * latency)
    if limits.rpm is not None:
        need = max(need, n / limits.rpm * limits.period + latency)
    if limits.tpm is not None and tokens:
        need = max(need, tokens / limits.tpm * limits.period + latency)
    # A margin of a quarter, one poll to see the switch, two polls of grace for what the
    # cancelled batches answered before the cancel took hold.
    return need * 1.25 + 3 * options.poll
