"""A batch's durability: its store, its job and its sink.

Patterns that run items (``map``, ``as_completed``, and later ``Pool``/``fan_out``) hand
each item to :meth:`Durability.run` instead of calling the engine directly; it decides
whether the item's call may be served from the store (a succeeded item of the same job
always is; any other item when ``cache=True``), runs the rest through
:func:`fanflow._durable.execute_stored` (committed before returning), and streams each
finished item to the sink.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from .._durable import ItemRef, execute_stored
from .._engine import CallOptions
from .._exceptions import ConfigError, Skipped
from .._llm import LLM
from .._types import CallRecord, Request, Response, Status
from ..store import Sink, Store, sink_for

__all__ = ["Durability", "input_id"]

T = TypeVar("T")

log = logging.getLogger("fanflow")


def input_id(item: Any, index: int) -> Any:
    """An item's id for sinks and stores: its ``id`` field if it has one, else its index."""
    if isinstance(item, Mapping) and "id" in item:
        return item["id"]
    return index


class Durability:
    """The store, job and sink of one batch.

    Args:
        store: the result store (None: nothing is stored).
        job: the job name under which items' statuses are recorded (needs ``store``).
        only_failed: run only the items that did not succeed in the job's last runs;
            succeeded items come from the store, never-started ones are skipped.
        cache: serve any request found in the store (False: only the job's own
            succeeded items are reused; other calls go to the model).
        sink: where finished items are streamed (a path or a sink).
    """

    def __init__(
        self,
        *,
        store: Store | None,
        job: str | None,
        only_failed: bool,
        cache: bool,
        sink: Sink | str | os.PathLike[str] | None,
    ) -> None:
        if job is not None and store is None:
            raise ConfigError(
                f"job={job!r} needs a store to record its items; pass "
                "store=fanflow.Store() (the default file is .fanflow/store.db)"
            )
        if job is not None and not job:
            raise ConfigError("job must be a non-empty name, got ''")
        if only_failed and job is None:
            raise ConfigError(
                "only_failed=True needs job= (and store=): it re-runs the failed items of that job"
            )
        self.store = store
        self.job = job
        self.only_failed = only_failed
        self.cache = cache
        self.sink = sink_for(sink) if sink is not None else None
        self.prior: dict[int, tuple[Status, str | None]] = {}
        self.finished = 0

    @classmethod
    def of(
        cls,
        *,
        store: Store | None,
        job: str | None,
        only_failed: bool,
        cache: bool,
        sink: Sink | str | os.PathLike[str] | None,
    ) -> Durability | None:
        """The batch's durability, or None when it has no store, job or sink."""
        if store is None and job is None and sink is None and not only_failed:
            return None
        return cls(store=store, job=job, only_failed=only_failed, cache=cache, sink=sink)

    async def around(self, run: Callable[[], Awaitable[int]], total: int | None) -> None:
        """Run the batch (``run`` returns how many inputs it saw) within this job."""
        store, job = self.store, self.job
        # One run of a job at a time (two would both call the model for every item):
        # a second run is refused here, before any call, naming the process running it.
        lock = store.lock_job(job) if store is not None and job is not None else None
        try:
            if store is not None and job is not None:
                self.prior = await store.start_job(job, total)
            if self.sink is not None:
                self.sink.open()
            try:
                seen = await run()
            except (asyncio.CancelledError, KeyboardInterrupt):
                self._interrupted()
                raise
            finally:
                if self.sink is not None:
                    self.sink.close()
            if store is not None and job is not None:
                await store.finish_job(job, seen)
        finally:
            if lock is not None:
                lock.release()

    def _interrupted(self) -> None:
        if self.store is None or self.job is None:
            return
        log.warning(
            "fanflow: job %r was interrupted; %d items finished in this run and are saved "
            "in %s. To resume, run it again with the same job= and store= (finished items "
            "are not repeated); only_failed=True re-runs just the failures.",
            self.job,
            self.finished,
            self.store.path,
        )

    async def run(
        self,
        llm: LLM,
        request: Request,
        opts: CallOptions,
        *,
        index: int,
        item: Any,
        label: str | None,
        parse: Callable[[Response], T],
    ) -> CallRecord[T]:
        """Run one item: from the store if it may be reused, else through the engine."""
        prior = self.prior.get(index)
        succeeded_before = prior is not None and prior[0] is Status.SUCCEEDED
        if self.only_failed and prior is None:
            now = asyncio.get_running_loop().time()
            return CallRecord(
                status=Status.SKIPPED,
                request=request,
                error=Skipped(
                    f"item {index} was not run: only_failed=True runs only the items of job "
                    f"{self.job!r} that failed before; run without only_failed to run the rest"
                ),
                start=now,
                end=now,
                label=label,
                index=index,
            )
        return await execute_stored(
            llm,
            request,
            opts,
            store=self.store,
            index=index,
            label=label,
            parse=parse,
            reuse=self.cache or succeeded_before,
            item=self._ref(index, item),
        )

    def _ref(self, index: int, item: Any) -> ItemRef | None:
        if self.job is None:
            return None
        ident = input_id(item, index)
        return ItemRef(self.job, index, None if ident is None else str(ident))

    async def settle(self, record: CallRecord[Any], item: Any) -> None:
        """Record the status of an item that made no call (its input was bad)."""
        assert record.index is not None
        ref = self._ref(record.index, item)
        if ref is not None and self.store is not None:
            await self.store.save_item(record, ref)

    def emit(self, record: CallRecord[Any], item: Any) -> None:
        """Stream a finished (and committed) item to the sink."""
        if record.status is Status.SUCCEEDED:
            self.finished += 1
        if self.sink is not None:
            assert record.index is not None
            self.sink.write(record, input_id(item, record.index))
