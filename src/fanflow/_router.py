"""Deployments: one handle over several (``fanflow.router``).

A router is a handle like any other (every pattern, the store and the CLI take it), but
it makes no call itself: the engine hands it each call (``BaseLLM.routed``) and it runs
the call on one of its deployments with the engine, so each deployment keeps its own
limits, retry policy, breaker, hedging and prices. Which deployment:

- ``spread``: one with room now (a free slot, rate budget, no pause), weighted; when none
  has room, the one whose queue empties first. N deployments' limits fill together.
- ``fallback``: the first, while it is healthy and its wait is under ``patience``; the
  next ones take what it cannot.

A call that fails on one deployment for a reason another may not share (its breaker is
open, the key or model is refused, its quota is spent, 5xx or timeouts past its retries,
rate limited past its retries, unreachable) goes to the next, with fresh attempts; each
deployment is tried at most once per call, so each item is answered once. A call that
fails for its own reasons (a bad request, a parse error, the deadline, the budget) does
not move. When every deployment fails, the record's error is a
:class:`fanflow.DeploymentsFailed` naming each one's error.

A deployment's breaker takes it out of rotation: its own (401, quota, 403/404,
unreachable), or the router's :data:`FAILING_AFTER` attempts in a row failing with 5xx
or timeouts (``Breaker.trip``). Its calls not yet sent end at once (skipped) and move;
the breaker probes it back later (``fanflow._breaker.PROBE_AFTER``). Where copies of
one router run in several processes (Ray workers), a :class:`HealthBoard` installed in
each (:func:`set_health_board`) tells the others: a deployment out of rotation in one
copy is tried last in all, until its probe is due.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ._breaker import PROBE_AFTER, is_failing
from ._engine import NO_RUN, Run, execute
from ._events import AttemptFailed, AttemptStarted, CallEnded, CallStarted, Event, Hook, emit
from ._exceptions import (
    BadRequest,
    BudgetExceeded,
    CallTimeout,
    CircuitOpen,
    ConfigError,
    ContentFiltered,
    DeploymentsFailed,
    ParseError,
    Skipped,
    TemplateError,
)
from ._limits import Limits
from ._llm import BaseLLM
from ._pricing import Price
from ._tokens import request_tokens
from ._types import Attempt, CallRecord, Deployment, Request, Response, Status, Usage

__all__ = [
    "FAILING_AFTER",
    "HealthBoard",
    "Item",
    "Routed",
    "Router",
    "call_on",
    "merge",
    "router",
    "set_health_board",
]

T = TypeVar("T")

Strategy = Literal["spread", "fallback"]

#: Attempts in a row (no success between) failing with 5xx or timeouts that take a
#: deployment out of rotation (five, not three: decision 0195).
FAILING_AFTER = 5

# A send due within this many seconds counts as "now".
_NOW = 1e-3

# Errors that are the item's own: another deployment would fail it the same way.
_STAYS = (BadRequest, ContentFiltered, ParseError, TemplateError, BudgetExceeded, Skipped)


class HealthBoard(Protocol):
    """Where copies of a router in other processes learn which deployments are out of
    rotation (the Ray backend's broker, ``backends/_health.py``)."""

    def report(self, router: str, name: str, seconds: float, copy: str) -> None:
        """Deployment ``name`` of router ``router`` is out of rotation in its ``copy``
        for ``seconds`` more (sent without waiting)."""

    async def sync(self, router: str) -> None:
        """Hear the latest about ``router`` (a copy's first calls wait for it once)."""

    def down(self, router: str, copy: str) -> Mapping[str, float]:
        """The deployments of ``router`` other copies than ``copy`` have out of
        rotation, with the seconds each stays out (what was last heard: never waits)."""


# Set only in a Ray worker process (as ``_llm._lane_factory`` is), so the routers
# unpickled there share their deployments' health through the broker.
_BOARD: HealthBoard | None = None

# The least seconds between two reports of one deployment from one router.
_REPORT_EVERY = 1.0


def set_health_board(board: HealthBoard | None) -> None:
    """Install ``board`` for every router of this process (None: none)."""
    global _BOARD
    _BOARD = board


def _public(url: str) -> str:
    """``url`` without what may hold a secret (user info, query, fragment)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def describe(llm: BaseLLM, name: str | None) -> Deployment:
    """A deployment's name, model and base URL (never its key) for records."""
    url = getattr(llm, "base_url", None)
    base_url = _public(url) if isinstance(url, str) else None
    if name is None:
        host = base_url.split("://", 1)[-1] if base_url else type(llm).__name__
        name = f"{llm.model}@{host}" if llm.model else host
    return Deployment(name=name, model=llm.model, base_url=base_url)


def describe_all(
    kind: str, llms: Sequence[BaseLLM], names: Sequence[str] | None
) -> list[Deployment]:
    """Each handle's :class:`Deployment`, with ``names`` (one each) or the defaults."""
    if names is not None and len(names) != len(llms):
        raise ConfigError(f"names= has {len(names)} entries for {len(llms)} handles; give one each")
    infos = [describe(llm, names[i] if names else None) for i, llm in enumerate(llms)]
    if len({d.name for d in infos}) != len(infos):
        raise ConfigError(
            f"fanflow.{kind}(): two handles have the same name "
            f"({[d.name for d in infos]}); pass names="
        )
    return infos


def check_handles(kind: str, handles: Sequence[object]) -> tuple[BaseLLM, ...]:
    """The handles of a router or cascade, or a ConfigError saying what is wrong."""
    if not handles:
        raise ConfigError(f"fanflow.{kind}() needs at least one handle, got none")
    seen: set[int] = set()
    for i, llm in enumerate(handles):
        if not isinstance(llm, BaseLLM):
            raise ConfigError(
                f"fanflow.{kind}(): handle {i} is a {type(llm).__name__}, not a fanflow "
                "handle; make it with fanflow.openai(...), fanflow.anthropic(...), "
                "fanflow.local(...) or fanflow.function(...)"
            )
        if id(llm) in seen:
            raise ConfigError(
                f"fanflow.{kind}(): handle {i} ({llm!r}) is given twice; each deployment "
                "is a handle of its own (make a second one for a second key or region)"
            )
        seen.add(id(llm))
    return tuple(handles)  # type: ignore[arg-type]


def moves(record: CallRecord[Any]) -> bool:
    """Whether a failed call may succeed on another deployment."""
    error = record.error
    if record.ok or error is None:
        return False
    if isinstance(error, CircuitOpen):
        return True
    if isinstance(error, _STAYS):
        return False
    # A deadline's timeout stays (it would pass on the next one too); an attempt's moves.
    return not (isinstance(error, CallTimeout) and error.timeout is None)


class _Member:
    """One deployment and what the router knows of it."""

    __slots__ = (
        "away_until",
        "down_until",
        "info",
        "latency",
        "llm",
        "outstanding",
        "prices",
        "reported",
        "sent",
        "streak",
        "weight",
    )

    def __init__(self, llm: BaseLLM, info: Deployment, weight: float, price: Price | None):
        self.llm = llm
        self.info = info
        self.weight = weight
        # The deployment's price for its model, over the pattern's prices= (None: those).
        self.prices = {llm.model: price} if price is not None and llm.model else None
        self.outstanding = 0  # calls the router has on it now (queued or in flight)
        self.sent = 0  # calls the router gave it in all
        self.streak = 0  # attempts in a row that failed with 5xx or timeouts
        self.latency = 1.0  # a moving average of its attempts' seconds
        self.down_until = -math.inf  # loop time before which its open breaker holds
        self.away_until = -math.inf  # loop time before which it is out in another process
        self.reported = -math.inf  # loop time of the last report to the health board

    def healthy(self, now: float) -> bool:
        if now < self.away_until:
            return False
        return self.llm.breaker.tripped is None or now >= self.down_until

    def wait(self, now: float, tokens: tuple[int, int]) -> float:
        """Seconds before one more call of ``tokens`` sent here now would likely go."""
        lane = self.llm.lane()
        queued = max(0, self.outstanding - lane.in_flight)
        wait = max(0.0, lane.ready_at(now, tokens) - now)
        limits = lane.limits
        # The calls queued here go first, each at the rate limits' pace.
        per_call = [
            cost * limits.period / limit
            for cost, limit in ((1, limits.rpm), (sum(tokens), limits.tpm))
            if limit is not None
        ]
        wait += queued * max(per_call, default=0.0)
        gate = lane.gate.statistics()
        if gate.limit is not None and gate.in_flight + gate.waiting >= gate.limit:
            wait = max(wait, (gate.waiting + 1) * self.latency / gate.limit)
        return wait

    def observe(self, event: Event) -> None:
        """A hook on this deployment's calls: count failures in a row, learn latency."""
        if isinstance(event, AttemptFailed):
            if is_failing(event.error):
                self.streak += 1
                breaker = self.llm.breaker
                if self.streak >= FAILING_AFTER and breaker.tripped is None:
                    breaker.trip(event.error, event.time, count=self.streak)
                    self.down_until = event.time + PROBE_AFTER
        elif isinstance(event, CallEnded) and event.record.ok:
            self.streak = 0
            for a in event.record.attempts:
                if a.status is Status.SUCCEEDED:
                    self.latency = 0.8 * self.latency + 0.2 * a.duration


def _attempts_only(hooks: tuple[Hook, ...], request: Request) -> Hook:
    """The pattern's hooks, given only attempt events, as of ``request`` (the call the
    pattern made: the progress display follows it by identity); the router reports the
    call's start and end itself, once, however many deployments it tried."""

    def forward(event: Event) -> None:
        if isinstance(event, AttemptStarted | AttemptFailed):
            emit(hooks, dataclasses.replace(event, request=request))

    return forward


@dataclass(frozen=True, slots=True)
class Item(Generic[T]):
    """One call as the engine handed it to a router or cascade."""

    request: Request
    opts: Run
    index: int | None
    label: str | None
    parse: Callable[[Response], T] | None

    def who(self) -> str:
        return "the call" if self.index is None else f"item {self.index}"


async def call_on(
    llm: BaseLLM,
    info: Deployment,
    item: Item[T],
    *,
    request: Request | None = None,
    observe: Hook | None = None,
    prices: Mapping[str, Price] | None = None,
) -> CallRecord[T]:
    """``item``'s call (or ``request``) on one handle with the engine; its record says
    ``info`` answered. ``observe`` sees its events; ``prices`` go over the pattern's."""
    opts = item.opts
    hooks: tuple[Hook, ...] = () if observe is None else (observe,)
    if opts.hooks:
        hooks += (_attempts_only(opts.hooks, item.request),)
    if prices:
        prices = {**(opts.prices or {}), **prices}
    inner = dataclasses.replace(opts, hooks=hooks, prices=prices or opts.prices)
    record = await execute(
        llm, request or item.request, inner, index=item.index, label=item.label, parse=item.parse
    )
    return tag(record, info)


class Routed(BaseLLM):
    """Base of the router and the cascade: handles that run each call on other
    handles (``BaseLLM.routed``), reporting its start and end once."""

    routed = True

    def __init__(self, handles: Sequence[BaseLLM], infos: Sequence[Deployment]) -> None:
        concurrency = [llm.limits.concurrency for llm in handles]
        total = None if None in concurrency else sum(c or 0 for c in concurrency)
        super().__init__(limits=Limits(concurrency=total))
        self.handles = tuple(handles)
        self.infos = tuple(infos)

    async def route(
        self,
        request: Request,
        opts: Run,
        *,
        index: int | None,
        label: str | None,
        parse: Callable[[Response], T] | None,
    ) -> CallRecord[T]:
        """Run one call on the handles (the engine's ``execute`` hands it here)."""
        start = asyncio.get_running_loop().time()
        if opts.hooks:
            emit(opts.hooks, CallStarted(start, request, index, label))
        final = await self.run(Item(request, opts, index, label, parse), start)
        # The request as the pattern made it (the deployment's model is in
        # ``final.deployment`` and the response): hooks and the caller see one call.
        final = dataclasses.replace(final, request=request)
        if opts.hooks:
            emit(opts.hooks, CallEnded(final.end or start, final))
        return final

    @abstractmethod
    async def run(self, item: Item[T], start: float) -> CallRecord[T]:
        """The item's record, its calls on the handles merged (:func:`merge`)."""

    @abstractmethod
    def with_handles(
        self, handles: Sequence[BaseLLM], prices: Sequence[Price | None] | None = None
    ) -> Routed:
        """The same routing over ``handles`` (one for each of this one's, in order, e.g.
        each wrapped to batch its calls), the records naming the same deployments;
        ``prices``: each one's own price, where it is not this one's."""

    async def complete(self, request: Request) -> Response:
        """One call (with the engine's retries on each handle)."""
        item: Item[Response] = Item(request, NO_RUN, None, None, None)
        record = await self.run(item, asyncio.get_running_loop().time())
        if record.response is None:
            assert record.error is not None
            raise record.error
        return record.response

    async def aclose(self) -> None:
        for llm in self.handles:
            await llm.aclose()


class Router(Routed):
    """One handle over several deployments; made by :func:`router`."""

    def __init__(
        self,
        handles: Sequence[BaseLLM],
        *,
        strategy: Strategy = "spread",
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        prices: Sequence[Price | None] | None = None,
        patience: float = 5.0,
    ) -> None:
        llms = check_handles("router", handles)
        if strategy not in ("spread", "fallback"):
            raise ConfigError(f"strategy must be 'spread' or 'fallback', got {strategy!r}")
        n = len(llms)
        for what, given in (("weights", weights), ("prices", prices)):
            if given is not None and len(given) != n:
                raise ConfigError(
                    f"{what}= has {len(given)} entries for {n} handles; give one each"
                )
        if weights is not None and not all(w > 0 for w in weights):
            raise ConfigError(f"weights must be > 0, got {list(weights)}")
        if patience < 0:
            raise ConfigError(f"patience must be >= 0 seconds, got {patience}")
        infos = describe_all("router", llms, names)
        super().__init__(llms, infos)
        # Whether a deployment counts tokens: then each call's estimate steers the choice.
        self.metered = any(llm.limits.tpm is not None for llm in llms)
        self.strategy = strategy
        self.patience = patience
        self.members = tuple(
            _Member(
                llm,
                infos[i],
                float(weights[i]) if weights else 1.0,
                prices[i] if prices else None,
            )
            for i, llm in enumerate(llms)
        )
        # This copy of the router (each process's unpickled one is another): its own
        # reports to a health board are not read back (its breakers know them).
        self.copy = uuid.uuid4().hex
        self.synced = False  # whether it has heard the health board once
        # The deployment a request should go to first, whatever has room (None: none):
        # batch mode sets it so a resumed item rejoins the batch it is already in.
        self.prefer: Callable[[Request], BaseLLM | None] | None = None

    def __repr__(self) -> str:
        names = ", ".join(repr(m.info.name) for m in self.members)
        return f"fanflow.router({names}, strategy={self.strategy!r})"

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.copy = uuid.uuid4().hex  # a copy of its own, in a process of its own
        self.synced = False

    def own_prices(self) -> list[Price | None]:
        """Each deployment's own price (None: the pattern's)."""
        return [next(iter(m.prices.values())) if m.prices else None for m in self.members]

    def with_handles(
        self, handles: Sequence[BaseLLM], prices: Sequence[Price | None] | None = None
    ) -> Router:
        made = Router(
            handles,
            strategy=self.strategy,
            weights=[m.weight for m in self.members],
            names=[d.name for d in self.infos],
            prices=self.own_prices() if prices is None else prices,
            patience=self.patience,
        )
        made.infos = self.infos
        for member, info in zip(made.members, self.infos, strict=True):
            member.info = info
        return made

    def cache_identity(self) -> dict[str, Any]:
        """Every deployment's identity (a store looks up each one's own key instead:
        :meth:`cache_choices`)."""
        return {
            "protocol": "fanflow.router",
            "deployments": [llm.cache_identity() for llm in self.handles],
        }

    def cache_choices(self, request: Request) -> list[tuple[BaseLLM, Request]]:
        """Each deployment with the request as it would send it: an answer stored under
        any of them may serve the router."""
        return [(llm, llm.prepare(request)) for llm in self.handles]

    def answered_by(self, record: CallRecord[Any]) -> BaseLLM | None:
        """The deployment whose answer ``record`` holds (None: none answered)."""
        info = record.deployment
        return next((m.llm for m in self.members if m.info == info), None)

    # -- choosing ----------------------------------------------------------------

    def order(self, now: float, tokens: tuple[int, int] = (0, 0)) -> list[_Member]:
        """The deployments to try for a call of ``tokens``, best first (unhealthy last)."""
        healthy = [m for m in self.members if m.healthy(now)]
        rest = [m for m in self.members if not m.healthy(now)]
        if self.strategy == "fallback":
            first = next((m for m in healthy if m.wait(now, tokens) <= self.patience), None)
            if first is None and healthy:
                first = min(healthy, key=lambda m: m.wait(now, tokens))
            chosen = [] if first is None else [first]
            return chosen + [m for m in healthy if m is not first] + rest
        waits = {id(m): m.wait(now, tokens) for m in healthy}
        room = [m for m in healthy if waits[id(m)] <= _NOW]
        if room:
            first = min(
                room, key=lambda m: ((m.outstanding + 1) / m.weight, (m.sent + 1) / m.weight)
            )
        elif healthy:
            first = min(healthy, key=lambda m: (waits[id(m)], m.outstanding / m.weight))
        else:
            return rest
        others = sorted((m for m in healthy if m is not first), key=lambda m: waits[id(m)])
        return [first, *others, *rest]

    # -- one call ----------------------------------------------------------------

    async def run(self, item: Item[T], start: float) -> CallRecord[T]:
        loop = asyncio.get_running_loop()
        tried: list[tuple[_Member, CallRecord[T]]] = []
        board = _BOARD
        if board is not None:
            if not self.synced:  # a new copy: what the others know, before its first call
                await board.sync(self.limit_id)
                self.synced = True
            self._learn(board, loop.time())
        tokens = request_tokens(item.request) if self.metered else (0, 0)
        order = self.order(start, tokens)
        first = None if self.prefer is None else self.prefer(item.request)
        if first is not None:
            order.sort(key=lambda m: m.llm is not first)  # stable: the rest keep their order
        for member in order:
            if member.llm.breaker.tripped is not None:
                # Its probe: the other calls go elsewhere until it answers (they would
                # wait for its outcome in the breaker otherwise).
                member.down_until = loop.time() + PROBE_AFTER
            member.outstanding += 1
            member.sent += 1
            try:
                record = await call_on(
                    member.llm, member.info, item, observe=member.observe, prices=member.prices
                )
            finally:
                member.outstanding -= 1
            member.observe(CallEnded(record.end or 0.0, record))
            if board is not None and member.llm.breaker.tripped is not None:
                self._report(board, member, loop.time())
            tried.append((member, record))
            if not moves(record):
                break
            if isinstance(record.error, CircuitOpen):
                member.down_until = max(member.down_until, loop.time() + PROBE_AFTER)
        final = merge([r for _, r in tried], start, loop.time())
        if not final.ok and moves(tried[-1][1]):
            final = _all_failed(final, tried, item.who())
        return final

    def _learn(self, board: HealthBoard, now: float) -> None:
        """Take the deployments other processes have out of rotation out here too."""
        down = board.down(self.limit_id, self.copy)
        if not down:
            return
        for member in self.members:
            seconds = down.get(member.info.name)
            if seconds is not None:
                member.away_until = max(member.away_until, now + seconds)

    def _report(self, board: HealthBoard, member: _Member, now: float) -> None:
        """Tell the other processes ``member`` is out of rotation until its probe."""
        if now - member.reported < _REPORT_EVERY:
            return
        member.reported = now
        seconds = max(member.down_until - now, PROBE_AFTER)
        board.report(self.limit_id, member.info.name, seconds, self.copy)


def tag(record: CallRecord[T], info: Deployment) -> CallRecord[T]:
    """``record`` with its response marked as answered by ``info``."""
    response = record.response
    if response is None:
        return record
    marked = dataclasses.replace(response, deployment=info)
    value: Any = marked if record.value is response else record.value
    return dataclasses.replace(record, response=marked, value=value)


def merge(records: Sequence[CallRecord[T]], start: float, end: float) -> CallRecord[T]:
    """One record for the calls made for one item, the last one's outcome: every
    attempt (numbered in order), tokens and cost, the earlier calls in ``routes``."""
    last = records[-1]
    if len(records) == 1:
        return dataclasses.replace(last, start=start, end=end)
    attempts: list[Attempt] = []
    usage = Usage()
    cost: float | None = None
    for r in records:
        for a in r.attempts:
            attempts.append(dataclasses.replace(a, number=len(attempts) + 1))
        usage = usage + r.usage
        if r.cost is not None:
            cost = (cost or 0.0) + r.cost
    return dataclasses.replace(
        last,
        attempts=tuple(attempts),
        usage=usage,
        cost=cost,
        start=start,
        end=end,
        routes=tuple(records[:-1]),
    )


def _all_failed(
    final: CallRecord[T], tried: Sequence[tuple[_Member, CallRecord[T]]], who: str
) -> CallRecord[T]:
    failures = [(f"{m.info.name!r}", r.error) for m, r in tried if r.error is not None]
    error = DeploymentsFailed(
        f"{who}: every deployment failed ({len(tried)} tried); fix one of them (each "
        "one's error follows) or add another",
        failures,
    )
    sent = any(r.attempts for _, r in tried)
    status = Status.FAILED if sent else Status.SKIPPED
    return dataclasses.replace(final, status=status, error=error)


def router(
    *handles: BaseLLM,
    strategy: Strategy = "spread",
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    prices: Sequence[Price | None] | None = None,
    patience: float = 5.0,
) -> Router:
    """One handle over several deployments of a model (keys, regions, providers).

    Each handle keeps its own limits, retry policy, breaker and prices. A call goes to
    one deployment; if that one cannot answer it (its breaker is open, it refuses the
    key, its quota is spent, it answers 5xx or times out past its retries, it is
    unreachable), the next one gets it, with fresh attempts.

    Args:
        handles: the deployments (each a handle of its own; the same one twice is an
            error). They may be of different models; a parser runs on whichever answers.
        strategy: ``"spread"``: each call goes where there is room now, so the
            deployments' limits fill together; ``"fallback"``: the first takes every
            call while it is healthy, the next ones what it cannot.
        weights: each deployment's share of the calls while several have room
            (``spread``; default: equal).
        names: each deployment's name in records and reports (default: model@host).
        prices: each deployment's price for its model (None: the pattern's ``prices=``
            and the built-in table), when deployments of one model cost differently.
        patience: ``fallback``: the longest wait for the first deployment's limits worth
            taking, in seconds, before the next takes the call.

    Returns:
        A handle: pass it to any pattern, a store or the CLI.
    """
    return Router(
        handles, strategy=strategy, weights=weights, names=names, prices=prices, patience=patience
    )
