"""Core value types: what goes to a model, what comes back, and what happened.

Everything here is small, typed and immutable where possible, so that records can be
shared between tasks, hooks, stores and (later) processes without copying or locking.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Generic, Literal, Protocol, TypeVar

from ._batchinfo import batch_info
from ._exceptions import ProviderError
from ._repr import money, render, seconds, short

__all__ = [
    "Attempt",
    "CallRecord",
    "Deployment",
    "MapResult",
    "Message",
    "RateLimitState",
    "Request",
    "Response",
    "Status",
    "Summary",
    "Usage",
    "add_work",
    "speedup_of",
    "work_of",
]

T = TypeVar("T")

Role = Literal["system", "user", "assistant", "tool"]


class Status(enum.StrEnum):
    """The terminal status of one call or one item. Every input ends with exactly one."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    def __repr__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message."""

    role: Role
    content: str


def _freeze_json(value: Any) -> Any:
    """Return a JSON-compatible, order-independent form of ``value`` for hashing."""
    if isinstance(value, Mapping):
        return {
            str(k): _freeze_json(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
    if isinstance(value, list | tuple):
        return [_freeze_json(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return repr(value)


class _FrozenDict(dict[str, Any]):
    """A read-only dict that pickles (``types.MappingProxyType`` does not)."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Request.metadata is read-only; build a new request instead")

    __setitem__ = __delitem__ = update = clear = pop = popitem = setdefault = _readonly  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FrozenDict, (dict(self),))


_NO_METADATA: Mapping[str, Any] = _FrozenDict()


@dataclass(frozen=True, slots=True)
class Request:
    """A request to a chat model.

    Build one from a prompt with :meth:`Request.of`, or pass ``messages`` directly.
    ``metadata`` travels with the request (to hooks, records and stores) but is not
    part of its identity. ``sample`` is the salt that makes sample *i* of a vote a
    different call from sample *j*, while a retry of sample *i* keeps the same key.
    """

    messages: tuple[Message, ...]
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    top_p: float | None = None
    response_format: Mapping[str, Any] | None = None
    sample: int = 0
    # A factory returning one shared read-only mapping: no dict allocated per request.
    metadata: Mapping[str, Any] = field(
        default_factory=lambda: _NO_METADATA, compare=False, hash=False
    )
    # A ready-made chat-completions body (``fanflow.read_requests``), sent as written by
    # OpenAI-compatible handles: its tool turns, tools and other fields the typed ones
    # above do not hold. The typed fields are read from it; None for a built request.
    body: Mapping[str, Any] | None = None
    _key: str | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def of(
        cls,
        prompt: str,
        *,
        system: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        top_p: float | None = None,
        response_format: Mapping[str, Any] | None = None,
        sample: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> Request:
        """Build a request from a user prompt and an optional system prompt."""
        user = Message("user", prompt)
        return cls(
            messages=(user,) if system is None else (Message("system", system), user),
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            stop=tuple(stop) if stop is not None else None,
            top_p=top_p,
            response_format=response_format,
            sample=sample,
            metadata=_FrozenDict(metadata) if metadata else _NO_METADATA,
        )

    @property
    def prompt(self) -> str:
        """The text of the last user message ('' if there is none)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return ""

    @property
    def system(self) -> str | None:
        """The text of the system messages joined by blank lines, or None."""
        parts = [m.content for m in self.messages if m.role == "system"]
        return "\n\n".join(parts) if parts else None

    def with_options(self, **changes: Any) -> Request:
        """Return a copy with the given fields changed (as ``dataclasses.replace``).

        Every call through a handle with defaults passes here (``BaseLLM.prepare``), so it
        copies the slots directly instead of re-running ``__init__``.
        """
        unknown = changes.keys() - _REQUEST_FIELDS
        if unknown:
            raise TypeError(f"Request has no field(s) {sorted(unknown)}")
        new = object.__new__(type(self))
        put = object.__setattr__  # frozen: fill the slots as __init__ would
        for name in _REQUEST_FIELDS:
            put(new, name, changes[name] if name in changes else getattr(self, name))
        put(new, "_key", None)  # the cached key belongs to the old fields
        return new

    def canonical(self) -> dict[str, Any]:
        """The canonical form that identifies this request (metadata excluded)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("metadata", "_key") or (f.name == "body" and self.body is None):
                continue  # no body: the canonical form (and key) of every built request
            value = getattr(self, f.name)
            if f.name == "messages":
                value = [[m.role, m.content] for m in value]
            out[f.name] = _freeze_json(value)
        return out

    @property
    def key(self) -> str:
        """Stable idempotency key: sha256 of the canonical form (sample salt included).

        Computed once, on first use; cheap requests that never need a key never pay for it.
        """
        key = self._key
        if key is None:
            blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
            key = hashlib.sha256(blob.encode("utf-8")).hexdigest()
            object.__setattr__(self, "_key", key)  # a cache, not a change of value
        return key


_REQUEST_FIELDS = tuple(f.name for f in fields(Request) if f.name != "_key")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts reported by the provider (or estimated, when ``estimated`` is set).

    ``input_tokens`` counts every prompt token, cached or not (as OpenAI's
    ``prompt_tokens`` does; Anthropic's three counts are added up). Of those,
    ``cached_input_tokens`` were read from the provider's prompt cache and
    ``cache_write_input_tokens`` were written to it (Anthropic charges writes extra);
    ``cache_write_1h_input_tokens`` of those were written for an hour (Anthropic's
    ``"ttl": "1h"``, charged more than its 5-minute writes).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    cache_write_1h_input_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.estimated or other.estimated,
            self.cached_input_tokens + other.cached_input_tokens,
            self.cache_write_input_tokens + other.cache_write_input_tokens,
            self.cache_write_1h_input_tokens + other.cache_write_1h_input_tokens,
        )


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """A provider's rate-limit headers on one response, in one shape for every API.

    OpenAI's ``x-ratelimit-*`` and Anthropic's ``anthropic-ratelimit-*`` headers both
    map here. ``*_reset`` are seconds from ``observed_at`` (the event-loop time the
    response arrived) until that bucket is full again. A field is None when the server
    did not send it.
    """

    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset: float | None = None
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset: float | None = None
    observed_at: float | None = None


@dataclass(frozen=True, slots=True)
class Deployment:
    """Which deployment of a router (``fanflow.router``) or tier of a cascade answered:
    its name, model and base URL (never its key)."""

    name: str
    model: str | None = None
    base_url: str | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """What a model returned for one request.

    ``extra`` holds what a backend adds, by key (the batch backend's
    :class:`fanflow.backends.BatchInfo`; read it with :func:`fanflow.backends.batch_info`);
    it is not compared. ``deployment`` names the router's
    deployment (or cascade's tier) that answered (None: not routed). ``service_time``
    is the seconds the model spent producing it, measured where the work was done (a
    local worker's generation, the time a server reports in its reply); None when it
    did not say, and then the call's round trip stands for it only if the handle's
    round trip is all work (:attr:`fanflow.BaseLLM.round_trip_is_work`).
    """

    text: str
    usage: Usage = field(default_factory=Usage)
    model: str | None = None
    finish_reason: str | None = None
    latency: float | None = None
    cost: float | None = None
    time_to_first_token: float | None = None
    raw: Any = field(default=None, repr=False, compare=False)
    rate_limit: RateLimitState | None = field(default=None, repr=False, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    deployment: Deployment | None = None
    service_time: float | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a call: when it ran, how it ended, and whether it was a hedge.

    ``requeued`` marks a 429/529 that did not use up one of the call's attempts (the
    handle's other calls were succeeding, so the rejection was the handle's own load);
    ``note`` says why the wait after it was what it was, when that needs saying.
    ``service`` is the seconds the model spent on it, where that is known (the reply's
    ``service_time``, or the round trip of a handle whose round trip is all work); a
    queue in front of the model (a worker pool's, a server's) is not in it.
    """

    number: int
    start: float
    end: float
    status: Status
    error: BaseException | None = None
    hedge: bool = False
    wait_before: float = 0.0
    requeued: bool = False
    note: str | None = None
    service: float | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


class _AttemptLike(Protocol):
    """What :func:`work_of` reads of an attempt (an :class:`Attempt`, or the report's
    row of one)."""

    @property
    def status(self) -> str: ...
    @property
    def hedge(self) -> bool: ...
    @property
    def requeued(self) -> bool: ...
    @property
    def service(self) -> float | None: ...


def elapsed(start: float | None, end: float | None) -> float | None:
    """Seconds from ``start`` to ``end`` (None when either is unknown)."""
    if start is None or end is None:
        return None
    return end - start


def work_of(attempts: Iterable[_AttemptLike]) -> float | None:
    """The model's time on a call's attempts: what they would take one after another.

    An attempt cut off (a hedge that lost, a cancelled call), a hedge that failed and a
    requeued 429/529 (the handle's own load) would not happen one after another: not
    work. A failed attempt counts its ``service`` when known, else nothing (so the
    total may fall short, never overshoot). None when the answer's time is not known
    (decision 0170).
    """
    total = 0.0
    for a in attempts:
        if a.status == Status.CANCELLED or a.requeued:
            continue
        answered = a.status == Status.SUCCEEDED
        if a.hedge and not answered:
            continue
        if a.service is not None:
            total += a.service
        elif answered:
            return None
    return total


@dataclass(frozen=True, slots=True)
class CallRecord(Generic[T]):
    """Everything that happened to one call (or one item of a batch).

    ``value`` is the result on success (a :class:`Response` for raw calls, the parsed
    output for patterns); ``error`` the exception otherwise. Times are event-loop
    times (``loop.time()``), so they are exact in virtual-time tests. ``cache_saved``
    is what the provider's prompt cache saved on this call, in dollars (None: no price);
    ``cost_estimated`` says a cache price was unknown and ``cost`` is an upper bound.
    times (``loop.time()``), so they are exact in virtual-time tests.

    ``routes`` holds, in order, the calls a router made for this item on deployments
    that could not answer, or a cascade's tiers whose answers were not accepted; this
    record's attempts and cost include theirs. ``cascade_saved`` is what a cascade
    saved on this item against asking only its last tier, in dollars (negative: what
    the tiers it rejected cost; None: not a cascade, or a price is unknown).
    """

    status: Status
    request: Request | None = None
    value: T | None = None
    error: BaseException | None = None
    attempts: tuple[Attempt, ...] = ()
    start: float | None = None
    end: float | None = None
    usage: Usage = field(default_factory=Usage)
    cost: float | None = None
    label: str | None = None
    index: int | None = None
    response: Response | None = field(default=None, repr=False)
    cached: bool = False
    cache_saved: float | None = None
    cost_estimated: bool = False
    routes: tuple[CallRecord[Any], ...] = field(default=(), repr=False)
    cascade_saved: float | None = None

    def _fields(self) -> Iterator[tuple[str, Any, str]]:
        """What a person wants to see: ``(name, value, text)``; loop timestamps left out."""
        if self.index is not None:
            yield "index", self.index, str(self.index)
        if self.label is not None:
            yield "label", self.label, repr(self.label)
        yield "status", self.status, self.status.value
        if self.error is not None:
            yield "error", self.error, short(self.error)
        elif self.value is not None:
            yield "value", self.value, short(self.value)
        yield "attempts", len(self.attempts), str(len(self.attempts))
        latency = self.latency
        if latency is not None:
            yield "latency", round(latency, 3), seconds(latency)
        if self.usage.total_tokens:
            u = self.usage
            yield "tokens", (u.input_tokens, u.output_tokens), f"{u.input_tokens}+{u.output_tokens}"
        if self.cost is not None:
            mark = "~" if self.cost_estimated else ""
            yield "cost", float(money(self.cost)), mark + money(self.cost)
        if self.usage.cached_input_tokens:
            yield (
                "cached_input",
                self.usage.cached_input_tokens,
                str(self.usage.cached_input_tokens),
            )
        if self.cached:
            yield "cached", True, "True"

    def __repr__(self) -> str:
        return render("CallRecord", ((name, text) for name, _, text in self._fields()))

    def __rich_repr__(self) -> Iterator[tuple[str, Any]]:
        for name, value, _ in self._fields():
            yield name, value

    @property
    def key(self) -> str | None:
        return self.request.key if self.request is not None else None

    @property
    def batch_id(self) -> str | None:
        """The provider batch that answered this call, or that it was last sent in."""
        info = batch_info(self.response.extra) if self.response is not None else None
        if info is None and isinstance(self.error, ProviderError):
            info = batch_info(self.error.extra)
        return info.batch_id if info is not None else None

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED

    @property
    def deployment(self) -> Deployment | None:
        """The router's deployment (or cascade's tier) that answered (None: not routed)."""
        return self.response.deployment if self.response is not None else None

    @property
    def retries(self) -> int:
        """Attempts beyond the first that were not hedges."""
        attempts = self.attempts
        if len(attempts) == 1:  # most calls
            return 0
        return max(0, sum(1 for a in attempts if not a.hedge) - 1)

    @property
    def latency(self) -> float | None:
        """Seconds from the call's start to its end: queueing and backoff included."""
        return elapsed(self.start, self.end)

    @property
    def busy_time(self) -> float | None:
        """Seconds the model spent on the call: what it would take one after another.

        Waiting for a concurrency slot, a rate limit, a backoff or in a queue in front of
        the model is not work, nor are hedges that lost and requeued 429s
        (:func:`work_of`). None when the model's time on the answer is not known (a
        server that does not report it). A cache hit and a skipped call (never sent) did
        no work (0); a record without attempts (a plain awaitable in ``gather``) counts
        its latency.
        """
        if self.attempts:
            return work_of(self.attempts)
        if self.cached or self.status is Status.SKIPPED:
            return 0.0
        return self.latency or 0.0


@dataclass(frozen=True, slots=True)
class Summary:
    """Totals over a map's items.

    ``batched`` counts items answered by a provider batch, ``realtime`` items answered
    by real-time calls (cache hits are neither); ``saved`` is what the batch price saved
    against all-real-time, in dollars (None when nothing was batched or a price is
    unknown). ``cache_saved`` is what the provider's prompt cache saved against the same
    tokens uncached (None: no call read or wrote the cache, or no price; negative when
    cache writes cost more than reads saved); ``cost_estimated``: a cache price was
    unknown and ``cost`` is an upper bound. ``answered_by`` counts the items each
    deployment of a router (or tier of a cascade) answered, by name; ``cascade_saved``
    is what a cascade saved against sending every item to its last tier (None: no
    cascade, or a price is unknown).
    """

    items: int
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int
    skipped: int
    calls: int
    retries: int
    usage: Usage
    cost: float | None
    makespan: float
    busy_time: float | None
    batched: int = 0
    realtime: int = 0
    saved: float | None = None
    cache_saved: float | None = None
    cost_estimated: bool = False
    answered_by: tuple[tuple[str, int], ...] = ()
    cascade_saved: float | None = None

    @property
    def speedup(self) -> float | None:
        """How much faster the batch ran than the same calls one after another on the
        same model: ``busy_time`` over makespan. None (n/a) when the model's time on
        some answer is not known, or no work was done."""
        return speedup_of(self.busy_time, self.makespan)

    def _fields(self) -> Iterator[tuple[str, Any, str]]:
        for name in ("items", "succeeded", "failed", "timed_out", "cancelled", "skipped"):
            n = getattr(self, name)
            if n or name in ("items", "succeeded", "failed"):
                yield name, n, str(n)
        yield "calls", self.calls, str(self.calls)
        yield "retries", self.retries, str(self.retries)
        u = self.usage
        yield "tokens", (u.input_tokens, u.output_tokens), f"{u.input_tokens}+{u.output_tokens}"
        if u.cached_input_tokens or u.cache_write_input_tokens:
            yield "cached_input", u.cached_input_tokens, f"{u.cached_input_tokens}"
            yield "cache_write", u.cache_write_input_tokens, f"{u.cache_write_input_tokens}"
        if u.cache_write_1h_input_tokens:
            hour = u.cache_write_1h_input_tokens
            yield "cache_write_1h", hour, f"{hour}"
        cost = None if self.cost is None else float(money(self.cost))
        mark = "~" if self.cost_estimated else ""
        yield "cost", cost, "None" if self.cost is None else mark + money(self.cost)
        if self.cache_saved is not None:
            yield "cache_saved", float(money(self.cache_saved)), money(self.cache_saved)
        yield "makespan", round(self.makespan, 3), seconds(self.makespan)
        busy = self.busy_time
        if busy is not None:
            yield "busy_time", round(busy, 3), seconds(busy)
        if self.answered_by:
            yield "answered_by", dict(self.answered_by), repr(dict(self.answered_by))
        if self.cascade_saved is not None:
            yield "cascade_saved", float(money(self.cascade_saved)), money(self.cascade_saved)

    def __repr__(self) -> str:
        return render("results.Summary", ((name, text) for name, _, text in self._fields()))

    def __rich_repr__(self) -> Iterator[tuple[str, Any]]:
        for name, value, _ in self._fields():
            yield name, value


class MapResult(Generic[T]):
    """Outputs of a batch in input order, with one record per item.

    ``outputs[i]`` is item *i*'s value, or ``None`` if it did not succeed.
    ``status[i]`` is its terminal status and ``errors`` maps failed indices to errors.
    """

    __slots__ = ("_summary", "makespan", "records")

    def __init__(self, records: Sequence[CallRecord[T]], *, makespan: float = 0.0) -> None:
        self.records: tuple[CallRecord[T], ...] = tuple(records)
        self.makespan = makespan
        self._summary: Summary | None = None

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"fanflow.MapResult(items={s.items}, succeeded={s.succeeded}, "
            f"failed={s.items - s.succeeded}, makespan={s.makespan:.3f})"
        )

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[T | None]:
        return iter(self.outputs)

    def __getitem__(self, index: int) -> T | None:
        return self.records[index].value

    @property
    def outputs(self) -> list[T | None]:
        return [r.value for r in self.records]

    @property
    def status(self) -> dict[int, Status]:
        return {i: r.status for i, r in enumerate(self.records)}

    @property
    def errors(self) -> dict[int, BaseException]:
        return {i: r.error for i, r in enumerate(self.records) if r.error is not None}

    @property
    def ok(self) -> bool:
        """True when every item succeeded."""
        return all(r.status is Status.SUCCEEDED for r in self.records)

    def raise_for_errors(self) -> None:
        """Raise the first item's error, if any item failed (opt-in raising)."""
        from ._exceptions import BatchError

        errors = self.errors
        if errors:
            raise BatchError(errors, len(self.records))

    @property
    def summary(self) -> Summary:
        if self._summary is None:
            self._summary = summarize(self.records, makespan=self.makespan)
        return self._summary


def add_work(total: float | None, work: float | None) -> float | None:
    """A running total of work: unknown once any part is."""
    return None if total is None or work is None else total + work


def speedup_of(busy_time: float | None, makespan: float) -> float | None:
    """Work over makespan; None when the work is unknown or none was done."""
    return busy_time / makespan if busy_time and makespan > 0 else None


def summarize(records: Sequence[CallRecord[Any]], *, makespan: float) -> Summary:
    """Add up a sequence of records."""
    counts = dict.fromkeys(Status, 0)
    tokens = [0, 0, 0, 0, 0]  # Usage's counts, added up in place (no Usage per record)
    estimated_usage = False
    cost: float | None = 0.0
    calls = retries = batched = realtime = 0
    busy: float | None = 0.0
    saved: float | None = None
    cache_saved: float | None = None
    estimated = False
    for r in records:
        if r.cache_saved is not None and not r.cached:
            cache_saved = (cache_saved or 0.0) + r.cache_saved
        estimated = estimated or (r.cost_estimated and not r.cached)
    answered_by: dict[str, int] = {}
    cascade_saved: float | None = None
    for r in records:
        deployment = r.deployment
        if deployment is not None and r.ok:
            answered_by[deployment.name] = answered_by.get(deployment.name, 0) + 1
        if r.cascade_saved is not None:
            cascade_saved = (cascade_saved or 0.0) + r.cascade_saved
        extra = r.response.extra if r.response is not None else None
        batch = batch_info(extra) if extra else None
        if batch is not None:
            batched += 1
            if batch.saved is not None:
                saved = (saved or 0.0) + batch.saved
        elif r.attempts and not r.cached:
            realtime += 1
        counts[r.status] += 1
        u = r.usage
        tokens[0] += u.input_tokens
        tokens[1] += u.output_tokens
        tokens[2] += u.cached_input_tokens
        tokens[3] += u.cache_write_input_tokens
        tokens[4] += u.cache_write_1h_input_tokens
        estimated_usage = estimated_usage or u.estimated
        if r.cost is None:
            if r.attempts and not r.cached:
                cost = None
        elif cost is not None:
            cost += r.cost
        calls += len(r.attempts)
        retries += r.retries
        busy = add_work(busy, r.busy_time)
    return Summary(
        items=len(records),
        succeeded=counts[Status.SUCCEEDED],
        failed=counts[Status.FAILED],
        timed_out=counts[Status.TIMED_OUT],
        cancelled=counts[Status.CANCELLED],
        skipped=counts[Status.SKIPPED],
        calls=calls,
        retries=retries,
        usage=Usage(
            tokens[0],
            tokens[1],
            estimated_usage,
            cached_input_tokens=tokens[2],
            cache_write_input_tokens=tokens[3],
            cache_write_1h_input_tokens=tokens[4],
        ),
        cost=cost,
        makespan=makespan,
        busy_time=busy,
        batched=batched,
        realtime=realtime,
        saved=saved,
        cache_saved=cache_saved,
        cost_estimated=estimated,
        answered_by=tuple(sorted(answered_by.items())),
        cascade_saved=cascade_saved,
    )
