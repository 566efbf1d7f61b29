"""The batch backend: patterns' model calls through the providers' batch APIs.

``fanflow.map(llm, prompt, items, mode="batch")`` runs the same engine over a batching
handle (``BatchLLM``, in ``_batchllm.py``) whose one "attempt" puts the request into a
provider batch and waits for its line. So records are made exactly as for real-time calls (status,
usage, attempts, events, store, sinks), with the batch price as the cost and the batch
id in ``record.batch_id``.

A :class:`BatchQueue` does the batching:

- requests are collected for ``linger`` seconds (or until a batch is full: the
  provider's documented request and byte limits) and submitted as one batch; identical
  requests (the same cache key) go in once and share the answer;
- the batch id and its requests are committed to the journal (the store, when there is
  one) before anything else happens, so a process killed while batches run resumes by
  polling the same batches: a request is never submitted twice;
- each batch is polled adaptively (first after ``poll`` seconds, then every tenth of
  the time it has run so far, never more than ``max_poll``; sooner when the reported
  progress says it is about to end), so a run ends within one short poll of its
  batches;
- its answers are committed to the store like any call's, then handed out; requests
  the batch did not answer (expired, cancelled, missing or malformed lines) raise the
  retryable :class:`fanflow.errors.BatchIncomplete` and go into a new batch on retry, each
  failure kept in the record's attempts;
- with ``mode="auto"`` and a deadline, once the time left is what real-time calls need
  for the requests still unanswered (estimated from the handle's limits), pending
  batches are cancelled and those requests are sent in real time, within the handle's
  limits.

The design and its measurements: docs/decisions/0140-batch-backend.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

from .._batchapi import BatchAPI, BatchLine, BatchState
from .._batchinfo import batch_extra
from .._decide import Seen, decide
from .._events import observing
from .._exceptions import (
    BadRequest,
    ConfigError,
    NotFound,
    ProviderError,
)
from .._llm import LLM
from .._retry import DEFAULT_RETRY
from .._tokens import request_tokens
from .._types import Request, Response

#: Journal ids of batches being created: ``intent:<token>`` until the provider's id is known.
INTENT = "intent:"

__all__ = ["BatchOptions", "BatchQueue", "Journal", "MemoryJournal", "Mode", "batch_api_of"]

log = logging.getLogger("fanflow")

T = TypeVar("T")

Mode = Literal["realtime", "batch", "auto"]
MODES = ("realtime", "batch", "auto")


@dataclass(frozen=True)
class BatchOptions:
    """How ``mode="batch"`` / ``"auto"`` batches and polls.

    Args:
        poll: seconds before a batch's first poll, and the shortest wait between polls.
        max_poll: the longest wait between polls.
        linger: seconds to collect requests before a batch is submitted (a full batch
            goes at once).
        max_requests: requests per batch (None: the provider's documented limit).
        max_bytes: bytes per batch file or body (None: the provider's limit).
        realtime_latency: seconds a real-time call is expected to take, for ``auto``'s
            estimate of when to move to real time.
        reserve: seconds before the deadline at which ``auto`` moves what is left to
            real time (None: estimated from the handle's limits and
            ``realtime_latency`` for the requests still unanswered).
    """

    poll: float = 1.0
    max_poll: float = 60.0
    linger: float = 0.5
    max_requests: int | None = None
    max_bytes: int | None = None
    realtime_latency: float = 10.0
    reserve: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.poll <= self.max_poll:
            raise ConfigError(
                f"poll must be > 0 and <= max_poll, got poll={self.poll}, max_poll={self.max_poll}"
            )
        if self.linger < 0:
            raise ConfigError(f"linger must be >= 0 seconds, got {self.linger}")
        for name in ("max_requests", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}; use None for the API's")
        if self.realtime_latency <= 0:
            raise ConfigError(f"realtime_latency must be > 0 seconds, got {self.realtime_latency}")
        if self.reserve is not None and self.reserve < 0:
            raise ConfigError(f"reserve must be >= 0 seconds, got {self.reserve}")

    def __repr__(self) -> str:
        return f"fanflow.backends.BatchOptions(poll={self.poll}, max_poll={self.max_poll})"

    def cap(self) -> int:
        """Requests per batch when the provider is not known yet (the smallest limit)."""
        return self.max_requests or 50_000


def batch_api_of(llm: LLM, mode: str) -> BatchAPI:
    """The batch endpoints of ``llm``, or a ConfigError saying why there are none."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use 'realtime', 'batch' or 'auto'")
    make = getattr(llm, "batches", None)
    if not callable(make):
        raise ConfigError(
            f"mode={mode!r} needs a provider with a batch API (fanflow.openai(...) or "
            f"fanflow.anthropic(...)); {llm!r} has none. Use mode='realtime'"
        )
    api = make()
    if not isinstance(api, BatchAPI):
        raise ConfigError(f"{llm!r}.batches() did not return a batch API")
    return api


# --------------------------------------------------------------------------- journal

# A batch's answers to commit: (key, custom id or None, response).
Answered: TypeAlias = list[tuple[str, str | None, Response]]


@runtime_checkable
class Journal(Protocol):
    """Where submitted batches are committed (``fanflow.Store`` implements it)."""

    def batch_of(self, key: str) -> tuple[str, str] | None: ...

    def lookup(self, key: str) -> Response | None: ...

    async def record_batch(self, batch_id: str, provider: str, keys: list[str]) -> None: ...

    async def settle_batch(
        self, batch_id: str, status: str, answered: Answered, unanswered: list[str]
    ) -> None: ...


class MemoryJournal:
    """The journal of a run without a store (nothing survives the process)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[str, str]] = {}
        self.answers: dict[str, Response] = {}

    def batch_of(self, key: str) -> tuple[str, str] | None:
        return self.items.get(key)

    def lookup(self, key: str) -> Response | None:
        return self.answers.get(key)

    async def record_batch(self, batch_id: str, provider: str, keys: list[str]) -> None:
        for key in keys:
            self.items[key] = (batch_id, "submitted")

    async def settle_batch(
        self, batch_id: str, status: str, answered: Answered, unanswered: list[str]
    ) -> None:
        for key, _, response in answered:
            self.answers[key] = response
            self.items[key] = (batch_id, "done")
        for key in unanswered:
            if self.items.get(key, ("", ""))[0] == batch_id:
                del self.items[key]


# --------------------------------------------------------------------------- queue


@dataclass
class _Entry:
    key: str
    line: bytes
    futures: list[asyncio.Future[BatchLine | None]] = field(default_factory=list)
    tokens: int = 0
    wire: str = ""  # the line's custom_id


class _Pending:
    """The requests collected for the next batch: their entries by cache key, the bytes
    of their lines and the custom_ids the lines carry."""

    __slots__ = ("entries", "ids", "size")

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.size = 0
        self.ids: set[str] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: _Entry) -> _Entry:
        self.entries[entry.key] = entry
        self.size += len(entry.line) + 1
        self.ids.add(entry.wire)
        return entry

    def drop(self, key: str, fut: asyncio.Future[BatchLine | None]) -> bool:
        """Forget a waiter that was cancelled; whether its entry went with it (no
        waiter left)."""
        entry = self.entries.get(key)
        if entry is None or fut not in entry.futures:
            return False
        entry.futures.remove(fut)
        if entry.futures:
            return False
        del self.entries[key]
        self.size -= len(entry.line) + 1
        self.ids.discard(entry.wire)
        return True

    def take(self) -> list[_Entry]:
        """Every entry, in the order they came; none is left."""
        entries = list(self.entries.values())
        self.entries.clear()
        self.size = 0
        self.ids.clear()
        return entries


class _Running:
    """The submitted batches a queue follows, and per batch the futures waiting for
    each of its keys' lines."""

    __slots__ = ("followed", "waiting")

    def __init__(self) -> None:
        self.waiting: dict[str, dict[str, list[asyncio.Future[BatchLine | None]]]] = {}
        self.followed: set[str] = set()  # batches a poller follows now or did

    def __contains__(self, batch_id: str) -> bool:
        return batch_id in self.waiting

    def ids(self) -> list[str]:
        return list(self.waiting)

    def count(self) -> int:
        """Requests waiting for a submitted batch."""
        return sum(len(keys) for keys in self.waiting.values())

    def keys(self, batch_id: str) -> list[str]:
        return list(self.waiting.get(batch_id, {}))

    def wait(self, batch_id: str, key: str, fut: asyncio.Future[BatchLine | None]) -> None:
        self.waiting.setdefault(batch_id, {}).setdefault(key, []).append(fut)

    def pop(self, batch_id: str) -> dict[str, list[asyncio.Future[BatchLine | None]]]:
        """Stop following ``batch_id``: what waited for it."""
        return self.waiting.pop(batch_id, {})

    def fail(self, batch_id: str, provider: str, error: Exception) -> None:
        """Fail every request waiting for ``batch_id``, never leave them hanging: with
        the provider's error, or (a bug, a store error) one saying the batch could not
        be followed."""
        _resolve(self.pop(batch_id), _failed(provider, error))

    def release_all(self) -> int:
        """Hand every waiting request None (it goes in real time); how many there were."""
        n = 0
        for waiting in self.waiting.values():
            n += len(waiting)
            _resolve(waiting, lambda _key: None)
            waiting.clear()
        return n

    def move(self, old: str, new: str) -> None:
        """An intent found as batch ``new``: its waiting requests wait for that."""
        into = self.waiting.setdefault(new, {})
        for key, futures in self.pop(old).items():
            into.setdefault(key, []).extend(futures)


@dataclass
class QueueStatistics:
    """What a :class:`BatchQueue` did."""

    batches: int = 0
    submitted: int = 0
    resumed: int = 0
    unknown_lines: int = 0
    duplicate_lines: int = 0
    moved_to_realtime: int = 0
    answered_twice: int = 0
    switched_at: float | None = None


class BatchQueue:
    """Collects requests into provider batches, polls them, hands out their lines.

    Use as ``async with BatchQueue(...) as queue``: leaving it stops its pollers (the
    provider's batches go on; their ids are in the journal).
    """

    def __init__(
        self,
        api: BatchAPI,
        journal: Journal,
        options: BatchOptions,
        *,
        retry_attempts: int = DEFAULT_RETRY.attempts,
    ) -> None:
        self.api = api
        self.journal = journal
        self.options = options
        self.max_requests = min(options.max_requests or api.max_requests, api.max_requests)
        self.max_bytes = min(options.max_bytes or api.max_bytes, api.max_bytes)
        self.retry_attempts = retry_attempts
        self.stats = QueueStatistics()
        self.switched = False
        self._pending = _Pending()
        # Cache key -> the user's custom_id its line carries (where it is not the key).
        self._wire: dict[str, str] = {}
        self._running = _Running()
        self._requests: dict[str, Request] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flush: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._release: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> BatchQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for timer in (self._flush, self._release):
            if timer is not None:
                timer.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in self._pending.entries.values():
            for fut in entry.futures:
                fut.cancel()

    async def cancel_running(self, timeout: float = 10.0) -> None:
        """Ask the provider to cancel the batches still running (nothing will read their
        results: without a journal that outlives this run, they would be paid for and
        lost)."""
        running = self._running.ids()
        if not running:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(self._cancel_batch(b) for b in running))

    # -- counts -------------------------------------------------------------------

    @property
    def unanswered(self) -> int:
        """Requests waiting for a batch (pending or submitted)."""
        return len(self._pending) + self._running.count()

    # -- submitting ---------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def submit(self, key: str, request: Request) -> BatchLine | None:
        """Put ``request`` into a batch; return its line (None: go to real time)."""
        if self.switched:
            return None
        known = self.journal.batch_of(key)
        if known is not None:
            batch_id, state = known
            if state == "done":
                stored = self.journal.lookup(key)
                if stored is not None:
                    return BatchLine(key, "succeeded", response=stored)
            else:
                return await self._attach(batch_id, key, request)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[BatchLine | None] = loop.create_future()
        too_large = self._enqueue(key, request, [fut])
        if too_large is not None:
            return too_large
        try:
            return await fut
        except asyncio.CancelledError:
            if self._pending.drop(key, fut):
                self._wire.pop(key, None)
            raise

    def _enqueue(
        self, key: str, request: Request, futures: list[asyncio.Future[BatchLine | None]]
    ) -> BatchLine | None:
        """Add ``request`` to the next batch (its line, if it is too large for one)."""
        entry = self._pending.entries.get(key)
        if entry is None:
            wire = self._wire_id(key, request)
            line = self.api.line(wire, request)
            if len(line) + self.api.line_overhead > self.max_bytes:
                return _too_large(self.api.provider, key, len(line), self.max_bytes)
            tokens = sum(request_tokens(request))
            entry = self._pending.add(_Entry(key, line, tokens=tokens, wire=wire))
        entry.futures.extend(futures)
        if len(self._pending) >= self.max_requests or self._pending.size >= self.max_bytes:
            self._flush_now()
        elif self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self.options.linger, self._flush_now)
        return None

    def _wire_id(self, key: str, request: Request) -> str:
        """The custom_id of ``request``'s line: the user's where it has one no other
        pending line carries (ids are unique within a batch), else the cache key."""
        wanted = users_id(self.api, request)
        if wanted is None or wanted in self._pending.ids:
            self._wire.pop(key, None)
            return key
        self._wire[key] = wanted
        return wanted

    def _flush_now(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        entries = self._pending.take()
        chunk: list[_Entry] = []
        size = 0
        for entry in entries:
            cost = len(entry.line) + 1
            if chunk and (len(chunk) >= self.max_requests or size + cost > self.max_bytes):
                self._spawn(self._run(chunk))
                chunk, size = [], 0
            chunk.append(entry)
            size += cost
        if chunk:
            self._spawn(self._run(chunk))

    async def _run(self, entries: list[_Entry]) -> None:
        keys = [e.key for e in entries]
        waiting = {e.key: e.futures for e in entries}
        provider = self.api.provider
        token = uuid.uuid4().hex
        intent = f"{INTENT}{token}"
        try:
            # The intent first: a process killed while the batch is being created finds
            # it again by its token on restart (where the API keeps metadata).
            await self.journal.record_batch(intent, provider, keys)
            state = await _create(self.api, self.retry_attempts, [e.line for e in entries], token)
        except ProviderError as exc:
            await self.journal.settle_batch(intent, "not created", [], keys)
            line = BatchLine("", "errored", error=exc)
            _resolve(waiting, lambda _key: line)
            return
        except asyncio.CancelledError:
            _cancel(waiting)
            raise
        except Exception as exc:  # a bug or a store error: fail the items, never hang them
            _resolve(waiting, _failed(self.api.provider, exc))
            return
        # Committed before anything else: a restart finds this batch and polls it.
        await self._adopt(intent, state.id, keys)
        self.stats.batches += 1
        self.stats.submitted += len(keys)
        self._running.waiting[state.id] = waiting
        if self.switched:
            self._spawn(self._cancel_batch(state.id))
        await self._follow(state)

    async def _adopt(self, intent: str, batch_id: str, keys: list[str]) -> None:
        """Commit the batch id for ``keys`` and close the intent it came from."""
        await self.journal.record_batch(batch_id, self.api.provider, keys)
        await self.journal.settle_batch(intent, "created", [], [])

    async def _attach(self, batch_id: str, key: str, request: Request) -> BatchLine | None:
        """Wait for ``key``'s line in a batch submitted before (by an earlier run)."""
        fut: asyncio.Future[BatchLine | None] = asyncio.get_running_loop().create_future()
        first = batch_id not in self._running
        self._running.wait(batch_id, key, fut)
        self._requests[key] = request
        wanted = users_id(self.api, request)
        if wanted is not None:  # maybe its line's id (or the key, if it was taken)
            self._wire[key] = wanted
        if first:
            self.stats.resumed += 1
            self._spawn(self._resume(batch_id))
        return await fut

    async def _resume(self, batch_id: str) -> None:
        await asyncio.sleep(0)  # let the other requests of this run attach first
        try:
            if batch_id.startswith(INTENT):
                found = await self._control(
                    "looking for a batch", lambda: self.api.find(batch_id[len(INTENT) :])
                )
                keys = self._running.keys(batch_id)
                if found is None:  # never created (or the API cannot tell): send again
                    await self._resubmit(batch_id)
                    return
                await self._adopt(batch_id, found.id, keys)
                self._running.move(batch_id, found.id)
                if found.id in self._running.followed:
                    return
                batch_id = found.id
            try:
                state = await self._control(
                    "polling a batch", lambda: self.api.poll(batch_id), batch_id
                )
            except NotFound:  # a journal from another endpoint or account: send again
                log.warning(
                    "fanflow: batch %s in the store's journal is unknown to %s; its requests "
                    "are submitted again",
                    batch_id,
                    self.api.provider,
                )
                await self._resubmit(batch_id)
                return
        except Exception as exc:
            self._running.fail(batch_id, self.api.provider, exc)
            return
        await self._follow(state)

    async def _resubmit(self, batch_id: str) -> None:
        """Forget a journalled batch that does not exist; its waiting requests go into
        the next batch."""
        waiting = self._running.pop(batch_id)
        await self.journal.settle_batch(batch_id, "not found", [], list(waiting))
        for key, futures in waiting.items():
            too_large = self._enqueue(key, self._requests.pop(key), futures)
            for fut in futures if too_large is not None else ():
                if not fut.done():
                    fut.set_result(too_large)

    async def _follow(self, state: BatchState) -> None:
        """Poll a batch until it ends, then hand out its lines."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        batch_id = state.id
        self._running.followed.add(batch_id)
        try:
            wait = self.options.poll
            while not state.ended:
                await self._nap(wait)
                state = await self._control(
                    "polling a batch", lambda: self.api.poll(batch_id), batch_id
                )
                wait = _next_poll(self.options, state, loop.time() - start)
            lines = await self._control(
                "reading batch results", lambda: self.api.results(state), batch_id
            )
            await self._settle(state, lines)
        except Exception as exc:
            self._running.fail(batch_id, self.api.provider, exc)

    async def _settle(self, state: BatchState, lines: list[BatchLine]) -> None:
        batch_id = state.id
        waiting = self._running.pop(batch_id)
        by_key, repeated = _match(lines, waiting, self._wire)
        self.stats.duplicate_lines += repeated
        known = set(waiting)
        unknown = [cid for cid in by_key if cid not in known and self.journal.batch_of(cid) is None]
        if unknown:
            self.stats.unknown_lines += len(unknown)
            log.warning(
                "fanflow: batch %s returned %d result lines for requests fanflow did not "
                "send (custom ids such as %r); they were ignored",
                batch_id,
                len(unknown),
                unknown[0],
            )
        answered, unanswered = _answered(by_key, known, unknown)
        done_keys = {k for k, _, _ in answered}
        late = len(done_keys - known) if self.switched else 0
        if late:  # answered by the batch after they had moved to real time: paid twice
            self.stats.answered_twice += late
            log.warning(
                "fanflow: cancelled batch %s still answered %d requests already sent in real "
                "time (paid twice; the answers are kept in the store)",
                batch_id,
                late,
            )
        # Answers are committed before they are handed out (promise 5).
        await self.journal.settle_batch(batch_id, state.status, answered, unanswered)

        line_for = _lines_of(self.api.provider, state, by_key)

        def after_switch(key: str) -> BatchLine | None:
            line = line_for(key)
            if line.kind in ("succeeded", "errored"):
                return line
            self.stats.moved_to_realtime += 1
            return None  # unanswered after a switch to real time: send it in real time

        _resolve(waiting, after_switch if self.switched else line_for)

    def _control(
        self, what: str, call: Callable[[], Awaitable[T]], batch_id: str | None = None
    ) -> Awaitable[T]:
        """A call to the batch endpoints, retried on transient errors (:func:`_retried`)."""
        return _retried(self.api, self.retry_attempts, what, call, batch_id)

    # -- moving to real time ------------------------------------------------------

    def switch(self) -> None:
        """Stop batching: what is not submitted yet, and every request still to come,
        goes in real time; running batches are cancelled, and what they answered
        before the cancel took hold is kept (waited for at most ``2 * poll`` seconds),
        the rest goes in real time too."""
        if self.switched:
            return
        self.switched = True
        loop = asyncio.get_running_loop()
        self.stats.switched_at = loop.time()
        self._wake.set()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        pending = {e.key: e.futures for e in self._pending.take()}
        _resolve(pending, lambda _key: None)
        self.stats.moved_to_realtime += len(pending)
        for batch_id in self._running.ids():
            self._spawn(self._cancel_batch(batch_id))
        self._release = loop.call_later(2 * self.options.poll, self._release_all)

    def _release_all(self) -> None:
        """Send whatever the cancelled batches have not answered yet in real time."""
        self.stats.moved_to_realtime += self._running.release_all()

    async def _nap(self, seconds: float) -> None:
        """Sleep between polls; cut short by a switch to real time (then poll often)."""
        if self.switched:
            await asyncio.sleep(min(seconds, self.options.poll))
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _cancel_batch(self, batch_id: str) -> None:
        try:
            await self._control("cancelling a batch", lambda: self.api.cancel(batch_id), batch_id)
        except ProviderError as exc:
            log.warning("fanflow: could not cancel batch %s: %s", batch_id, exc)


async def _retried(
    api: BatchAPI,
    at_least: int,
    what: str,
    call: Callable[[], Awaitable[T]],
    batch_id: str | None = None,
    *,
    observe: bool = True,
    recover: Callable[[], Awaitable[T | None]] | None = None,
) -> T:
    """A call to the batch endpoints, retried on transient errors as the engine's calls
    are (:func:`fanflow._decide.decide`; never requeued, never a tail retry), with at
    least ``at_least`` attempts.

    ``observe``: wrap each try in the instrumentation's span (False: ``call`` does).
    ``recover``: after each wait, what the lost try may have done anyway (not None:
    that is the result)."""
    policy = api.llm.retry or DEFAULT_RETRY
    attempts = max(policy.attempts, at_least)
    number = 0
    while True:
        number += 1
        try:
            if not observe:
                return await call()
            with observing(what, api.provider, batch_id):
                return await call()
        except ProviderError as exc:
            wait = decide(exc, Seen(tries=number), policy, attempts=attempts).wait
            if wait is None:
                raise
            log.info("fanflow: %s failed (%s); retrying in %.1f s", what, exc, wait)
            await asyncio.sleep(wait)
        if recover is not None:
            with contextlib.suppress(ProviderError):
                found = await recover()
                if found is not None:
                    return found


async def _create(api: BatchAPI, at_least: int, lines: list[bytes], token: str) -> BatchState:
    """Create a batch, retrying transient errors. Before a retry, a batch whose create
    reply was lost is looked for by its token (OpenAI keeps metadata), so a retry never
    submits the same requests twice where the API allows telling."""
    metadata = {"fanflow_token": token}

    async def submit() -> BatchState:
        with observing("submitting a batch", api.provider) as created:
            state = await api.submit(lines, metadata)
            created(state.id)
        return state

    return await _retried(
        api, at_least, "submitting a batch", submit, observe=False, recover=lambda: api.find(token)
    )


def _lines_of(
    provider: str, state: BatchState, by_key: Mapping[str, BatchLine]
) -> Callable[[str], BatchLine]:
    """The line each request of an ended batch gets: its own result line (its error
    naming the batch), else the batch's failure, else expired or canceled."""
    batch_id = state.id
    named = batch_extra(batch_id)

    def line_for(key: str) -> BatchLine:
        line = by_key.get(key)
        if line is not None:
            error = line.error.with_extra(named) if line.error is not None else None
            return replace(line, error=error, batch_id=batch_id)
        if state.failed_reason is not None:
            error = BadRequest(
                f"{provider}: batch {batch_id} failed: {state.failed_reason}", extra=named
            )
            return BatchLine(key, "errored", error=error, batch_id=batch_id)
        kind: Literal["expired", "canceled"] = (
            "expired" if state.status == "expired" else "canceled"
        )
        return BatchLine(key, kind, batch_id=batch_id)

    return line_for


def _next_poll(options: BatchOptions, state: BatchState, elapsed: float) -> float:
    """Seconds to the next poll of a batch that has run ``elapsed`` seconds: a tenth of
    that, within [poll, max_poll]; sooner if its progress says it is about to end."""
    wait = elapsed * 0.1
    if 0 < state.done < state.total:
        eta = (state.total - state.done) * elapsed / state.done
        wait = min(wait, eta)
    return min(max(wait, options.poll), options.max_poll)


def _too_large(provider: str, key: str, size: int, max_bytes: int) -> BatchLine:
    """The line of a request too large for any batch."""
    error = BadRequest(
        f"{provider}: the request is {size:,} bytes as a batch line, more than a batch may "
        f"hold ({max_bytes:,} bytes); shorten it or send it with mode='realtime'"
    )
    return BatchLine(key, "errored", error=error)


def _answered(
    by_key: Mapping[str, BatchLine], known: set[str], unknown: list[str]
) -> tuple[Answered, list[str]]:
    """A batch's answers to commit (key, no custom id, response), lines fanflow did not
    send left out, and the keys it sent that got none."""
    answered: Answered = [
        (k, None, line.response)
        for k, line in by_key.items()
        if line.kind == "succeeded" and line.response is not None and k not in unknown
    ]
    done = {k for k, _, _ in answered}
    return answered, [k for k in known if k not in done]


def _match(
    lines: list[BatchLine], waiting: Mapping[str, object], wire: dict[str, str]
) -> tuple[dict[str, BatchLine], int]:
    """A batch's result lines by cache key, and how many lines repeated one. A line's
    custom_id is its request's cache key, or the user's custom_id the request carries
    (``wire``, whose entries for ``waiting`` are taken); a line whose id is neither
    stays under its own id (unknown to fanflow)."""
    named: dict[str, list[str]] = {}
    for key in waiting:
        users = wire.pop(key, None)
        if users is not None:
            named.setdefault(users, []).append(key)
    by_key: dict[str, BatchLine] = {}
    repeated = 0
    later = []
    for line in lines:
        if line.custom_id in waiting or line.custom_id not in named:
            repeated += line.custom_id in by_key
            by_key.setdefault(line.custom_id, line)
        else:
            later.append(line)
    # After the keys: a user's id two requests carried went with the one whose line did
    # not fall back to its cache key.
    for line in later:
        keys = named[line.custom_id]
        key = next((k for k in keys if k not in by_key), keys[0])
        repeated += key in by_key
        by_key.setdefault(key, line)
    return by_key, repeated


def users_id(api: BatchAPI, request: Request) -> str | None:
    """The custom_id the user gave ``request`` (``read_requests`` keeps a Batch API
    line's in its metadata), if ``api`` takes it as a line's id."""
    wanted = request.metadata.get("custom_id")
    return wanted if isinstance(wanted, str) and api.takes_id(wanted) else None


def _resolve(
    waiting: Mapping[str, list[asyncio.Future[BatchLine | None]]],
    line_for: Callable[[str], BatchLine | None],
) -> None:
    for key, futures in waiting.items():
        line = line_for(key)
        for fut in futures:
            if not fut.done():
                fut.set_result(line)


def _failed(provider: str, exc: Exception) -> Callable[[str], BatchLine]:
    """The line of every request of a batch that failed: the provider's error, or one
    saying the batch could not be followed (a failure on our side)."""
    if isinstance(exc, ProviderError):
        line = BatchLine("", "errored", error=exc)
        return lambda _key: line
    error = ProviderError(
        f"{provider}: the batch could not be followed ({type(exc).__name__}: {exc}); its "
        "id is in the store's journal if there is one, and a rerun of the job polls it again"
    )
    error.__cause__ = exc
    line = BatchLine("", "errored", error=error)
    return lambda _key: line


def _cancel(waiting: Mapping[str, list[asyncio.Future[BatchLine | None]]]) -> None:
    for futures in waiting.values():
        for fut in futures:
            fut.cancel()
