"""What fanflow needs of a store: the protocols a second store (PostgreSQL, say) implements.

``fanflow.Store`` (SQLite, ``_sqlite.py``) is one implementation. Everything above the
store layer types against these protocols, never against the SQLite class:

- :class:`ResultStore`: the cache of responses by key, what one durable call needs
  (``fanflow._durable.execute_stored``);
- :class:`JobStore`: that plus the journal of jobs' items and a lock per job (one run at
  a time), what a batch's durability (``fanflow._durable.Durability``), the Ray backend
  and the CLI need.

A store that is given to ``backend="ray"`` is pickled to the worker processes: it must
pickle to something that opens *the same* store there (``fanflow.Store`` pickles to its
file path and options; a network store would pickle to its URL, never its password).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .._types import CallRecord, Response, Status, Usage

__all__ = ["ItemInfo", "ItemRef", "JobInfo", "JobStore", "ResultStore", "RunLock"]


@dataclass(frozen=True, slots=True)
class ItemRef:
    """Which job item a call belongs to, so its terminal status is committed with it."""

    job: str
    index: int
    input_id: str | None = None


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """One item of a job as the store last recorded it.

    ``requeues`` counts its 429/529s that did not use up an attempt
    (:attr:`Attempt.requeued`); ``note`` is its latest attempt's :attr:`Attempt.note`.
    """

    index: int
    input_id: str | None
    key: str | None
    status: Status
    error_type: str | None
    error: str | None
    cached: bool
    usage: Usage
    cost: float | None
    updated: float
    requeues: int = 0
    note: str | None = None

    def __repr__(self) -> str:
        return f"fanflow.ItemInfo(index={self.index}, status={self.status.value!r})"


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job's progress: items by terminal status, and when it last ran.

    ``total`` is the number of inputs (None until a run has seen them all); ``pending``
    counts inputs with no terminal status yet (never started, or in flight at a crash).
    """

    name: str
    total: int | None
    runs: int
    created: float
    updated: float
    counts: Mapping[Status, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"fanflow.JobInfo(name={self.name!r}, total={self.total}, "
            f"succeeded={self.succeeded}, failed={self.failed}, pending={self.pending})"
        )

    @property
    def succeeded(self) -> int:
        return self.counts.get(Status.SUCCEEDED, 0)

    @property
    def failed(self) -> int:
        """Items that ended without success (failed, timed out, cancelled or skipped)."""
        return sum(n for s, n in self.counts.items() if s is not Status.SUCCEEDED)

    @property
    def pending(self) -> int | None:
        if self.total is None:
            return None
        return max(self.total - sum(self.counts.values()), 0)

    @property
    def done(self) -> bool:
        """Every input has succeeded."""
        return self.total is not None and self.succeeded >= self.total


@runtime_checkable
class ResultStore(Protocol):
    """What one durable call needs of a store (``fanflow.Store`` implements it)."""

    def lookup(self, key: str) -> Response | None:
        """The stored response for a cache key, or None."""
        ...

    async def save(self, record: CallRecord[Any], *, key: str, item: ItemRef | None) -> None:
        """Commit ``record``'s response under ``key`` (unless it came from the store) and
        the item's terminal status (if given); return only once it is committed."""
        ...


class RunLock(Protocol):
    """A job's lock for one run (:meth:`JobStore.lock_job`)."""

    def release(self) -> None:
        """Let the next run have the job. Safe to call twice."""
        ...


@runtime_checkable
class JobStore(ResultStore, Protocol):
    """A result store that also keeps a journal of jobs and their items.

    Promise 5 rests on its two write methods: they return only once the write is
    durable (committed), so what a caller was told about is never lost.
    """

    @property
    def location(self) -> str:
        """Where the store lives, for messages (a file path; never a secret)."""
        ...

    async def save_item(self, record: CallRecord[Any], item: ItemRef) -> None:
        """Commit the terminal status of a job item that made no call (a bad input)."""
        ...

    def lock_job(self, name: str) -> RunLock:
        """Take job ``name`` for one run; raise ``StoreError`` at once (naming the holder)
        if another run, in this or another process, has it. Two runs of one job would
        both call the model for every item (docs/decisions/0095-one-run-per-job.md)."""
        ...

    async def start_job(self, name: str, total: int | None) -> dict[int, tuple[Status, str | None]]:
        """Record a run of job ``name``; return its items' last status and cache key."""
        ...

    async def finish_job(self, name: str, total: int) -> None:
        """Record that a run of job ``name`` saw all ``total`` inputs."""
        ...

    def jobs(self) -> list[JobInfo]:
        """Every job in the store, most recently run first."""
        ...

    def job(self, name: str) -> JobInfo | None:
        """A job's progress, or None if the store has no job of that name."""
        ...

    def items(self, job: str, *, status: Status | Iterable[Status] | None = None) -> list[ItemInfo]:
        """A job's items as last recorded, in index order; optionally only some statuses."""
        ...

    def close(self) -> None:
        """Commit what is queued and release the store. Safe to call twice."""
        ...

    async def aclose(self) -> None:
        """Like :meth:`close`, without blocking the event loop."""
        ...
