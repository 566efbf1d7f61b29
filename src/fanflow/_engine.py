"""The engine: one call from admission to its terminal status.

For each call: fill in the handle's defaults, then for each attempt wait for admission
(the pattern's gate, then the handle's lane), send it under the per-attempt timeout,
and after a failure do what :func:`fanflow._decide.decide` says: wait and try again
(a requeued 429/529 of the handle's own load uses up no attempt), or stop. With
``hedge_after``, a duplicate starts if the attempt has not answered in that time; with
the hedging policy (HTTP handles, by default), once it is slower than a high quantile
of the handle's recent latencies, within a cap of extra calls (:class:`fanflow._hedge.Race`
for both). The first success wins and the other is cancelled. An overall ``deadline``
bounds everything, admission waits and backoffs included.

All waiting goes through the event loop (``asyncio.sleep``, ``asyncio.timeout``), so
tests run it in virtual time. ``asyncio.CancelledError`` always propagates: cancelling
a pattern cancels its calls' tasks, and never turns into a retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._batchinfo import batch_info
from ._breaker import Breaker
from ._budget import Budget, as_budget
from ._checks import check_concurrency, check_seconds
from ._decide import Seen, Verdict, decide
from ._events import (
    AMBIENT_HOOKS,
    INSTALLED,
    AttemptFailed,
    AttemptStarted,
    CallEnded,
    CallStarted,
    Hook,
    emit,
)
from ._exceptions import (
    BudgetExceeded,
    CallTimeout,
    CircuitOpen,
    ParseError,
    RateLimited,
    Skipped,
)
from ._hedge import Hedger, HedgeWon, Race
from ._limits import Gate, Lane, Permit
from ._llm import LLM, BaseLLM, lane_of
from ._log import log_attempt_failed, log_attempt_sent, log_succeeded
from ._pricing import Cost, Price, price_of, priced
from ._repr import render
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._tokens import request_tokens
from ._types import Attempt, CallRecord, Request, Response, Status, Usage

if TYPE_CHECKING:  # type only: _router imports this module
    from ._router import Routed

__all__ = ["NO_RUN", "TIMING", "CallOptions", "Run", "execute", "status_of"]

T = TypeVar("T")


#: The options that time a call (an enclosing run's apply where a call sets none).
TIMING: tuple[str, ...] = ("timeout", "retry", "hedge_after")


@dataclass(frozen=True, slots=True, kw_only=True)
class CallOptions:
    """The engine's call options, checked once: what every call of a pattern shares.

    The patterns' keyword options (``fanflow.Options``) become one of these in
    ``patterns/_options.resolve``; a backend carries it unchanged (``MapSpec.options``).
    What depends on when a run starts (its gate, its deadline, a new budget cap) is
    added by :meth:`start`, which makes the :class:`Run` the engine reads.

    Args:
        concurrency: the most of the run's calls in flight (None: the handle's limit).
        timeout: seconds per attempt (None: the handle's; the handle's None: no limit).
        deadline: seconds from the run's start by which every call must end.
        retry: the retry policy (None: the handle's, else the default policy).
        hedge_after: seconds after which a duplicate attempt starts (None: no hedging).
        hooks: callables receiving each event.
        budget: the spending cap: a :class:`Budget` (shared as given) or dollars (a
            new cap for each run).
        prices: model prices beyond the built-in table, for costs and budgets.
    """

    concurrency: int | None = None
    timeout: float | None = None
    deadline: float | None = None
    retry: RetryPolicy | None = None
    hedge_after: float | None = None
    hooks: tuple[Hook, ...] = ()
    budget: float | Budget | None = None
    prices: Mapping[str, Price] | None = None

    def __post_init__(self) -> None:
        check_concurrency(self.concurrency)
        for name in ("timeout", "deadline", "hedge_after"):
            check_seconds(name, getattr(self, name))
        as_budget(self.budget)  # a budget that is neither dollars nor a Budget fails here

    def __repr__(self) -> str:
        given = (
            (f.name, repr(value))
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) != f.default
        )
        return render("backends.CallOptions", given)

    def start(
        self,
        *,
        drained: Callable[[], bool] | None = None,
        deadline: float | None = None,
        budget: Budget | None = None,
    ) -> Run:
        """The run these options start now: a gate for ``concurrency``, the deadline as
        a loop time, the budget's cap (a number: a new one), the ambient hooks.

        ``drained`` tells a batch's calls whether it has handed out its last item
        (:meth:`Run.drained`); ``deadline`` (seconds from now) and ``budget`` replace
        the options' own (a Ray worker's: the driver's deadline and budget)."""
        cap = budget if budget is not None else as_budget(self.budget)
        prices = self.prices
        if cap is not None:
            # Records are priced as the budget charges them (its prices, then the call's).
            prices = cap.with_prices(prices).prices
        seconds = deadline if deadline is not None else self.deadline
        return Run(
            **{name: getattr(self, name) for name in TIMING},
            gate=Gate(self.concurrency) if self.concurrency is not None else None,
            deadline=None if seconds is None else asyncio.get_running_loop().time() + seconds,
            budget=cap,
            prices=dict(prices) if prices else None,
            hooks=(*self.hooks, *AMBIENT_HOOKS.get(), *INSTALLED),
            drained=drained,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One run of a pattern's calls, as the engine reads it: the timing options of its
    :class:`CallOptions` and what was added when the run started
    (:meth:`CallOptions.start`). Nothing in it changes after it is made.

    Args:
        timeout: seconds per attempt (None: the handle's; the handle's None: no limit).
        retry: the retry policy (None: the handle's, else the default policy).
        hedge_after: seconds after which a duplicate attempt starts (None: no hedging).
        gate: the run's own concurrency gate (None: only the handle's limit).
        deadline: absolute event-loop time by which every call must end.
        budget: the spending cap the calls draw on (None: no cap).
        prices: model prices beyond the built-in table, for costs and budgets.
        hooks: callables receiving each event (the ambient ones included).
        drained: whether the map that runs these calls has handed out its last item
            (asked by the engine, answered by the map's item source; None: not a map).
            From then on a 5xx is retried at once (:func:`fanflow._decide.decide`,
            decision 0157).
    """

    timeout: float | None = None
    retry: RetryPolicy | None = None
    hedge_after: float | None = None
    gate: Gate | None = None
    deadline: float | None = None
    budget: Budget | None = None
    prices: Mapping[str, Price] | None = None
    hooks: tuple[Hook, ...] = ()
    drained: Callable[[], bool] | None = None

    def timing(self) -> CallOptions:
        """The run's timing options (to start a run like it elsewhere: a Ray worker)."""
        return CallOptions(**{name: getattr(self, name) for name in TIMING})

    def within(self, outer: Run | None, given: frozenset[str]) -> Run:
        """This run inside ``outer`` (a skill in a pool, a call in a gather): the timing
        options, the deadline and the gate of ``outer`` apply where this one's options
        did not set them (``given``: the option names they did); the sooner deadline
        wins. Budget, prices and hooks stay this run's."""
        if outer is None:
            return self
        taken = {name: getattr(outer, name) for name in TIMING if name not in given}
        deadline = self.deadline if "deadline" in given else None
        if outer.deadline is not None:
            deadline = outer.deadline if deadline is None else min(deadline, outer.deadline)
        return dataclasses.replace(
            self,
            **taken,
            deadline=deadline,
            gate=self.gate if "concurrency" in given else outer.gate,
        )


#: The run of a call made with no options (nothing to wait for but the handle's lane).
NO_RUN = Run()


def status_of(error: BaseException) -> Status:
    """The terminal status that an error stands for."""
    if isinstance(error, CallTimeout):
        return Status.TIMED_OUT
    if isinstance(error, asyncio.CancelledError):
        return Status.CANCELLED
    if isinstance(error, BudgetExceeded | Skipped):
        return Status.SKIPPED
    return Status.FAILED


class _Call(Generic[T]):
    """The state of one call while it runs (not public: ``execute`` returns a record)."""

    __slots__ = (
        "attempts",
        "breaker",
        "deadline",
        "handle",
        "hooks",
        "index",
        "label",
        "lane",
        "llm",
        "loop",
        "number",
        "opts",
        "race",
        "request",
        "requeues",
        "timeout",
        "tokens",
    )

    def __init__(
        self,
        llm: LLM,
        handle: BaseLLM | None,
        request: Request,
        opts: Run,
        index: int | None,
        label: str | None,
    ) -> None:
        """``handle``: ``llm`` if it is a fanflow handle, else None."""
        self.loop = asyncio.get_running_loop()
        self.llm = llm
        self.request = request
        self.opts = opts
        self.index = index
        self.label = label
        self.hooks = opts.hooks
        self.deadline = opts.deadline
        self.handle = handle
        self.breaker = self.handle.breaker if self.handle is not None else None
        self.lane: Lane = (
            self.handle.lane(request.model) if self.handle is not None else lane_of(llm)
        )
        self.timeout = opts.timeout
        if self.timeout is None and self.handle is not None:
            self.timeout = self.handle.timeout
        self.attempts: list[Attempt] = []
        self.number = 0
        self.requeues = 0
        self.tokens: tuple[int, int] | None = None
        self.race: Race | None = None  # the attempt's race against a duplicate, if any

    # -- admission ----------------------------------------------------------------

    async def _admit(self) -> tuple[Permit | None, float | None]:
        """Wait for admission; return the lane's permit and the budget reserved."""
        lane = self.lane
        budget = self.opts.budget
        tokens = None
        reserved = None
        if lane.needs_tokens or budget is not None:
            tokens = self._estimate()
            if lane.needs_tokens:
                lane.check(*tokens, self._who())
            if budget is not None:
                batch = self.handle is not None and self.handle.batch_priced
                amount = budget.amount(self.request.model, *tokens, batch=batch)
                reserved = await budget.reserve(amount, self._who(), tokens[1])
        gate = self.opts.gate
        try:
            if gate is not None:
                await gate.acquire()
            try:
                permit = await lane.acquire(tokens if lane.needs_tokens else None)
            except BaseException:
                if gate is not None:
                    gate.release()
                raise
        except BaseException:
            if budget is not None and reserved is not None:
                budget.settle(reserved, 0.0)  # never sent: nothing spent
            raise
        return permit, reserved

    def _estimate(self) -> tuple[int, int]:
        tokens = self.tokens
        if tokens is None:
            tokens = self.tokens = request_tokens(self.request)
        return tokens

    def _leave(
        self,
        permit: Permit | None,
        reserved: float | None,
        start: float,
        response: Response | None,
        error: BaseException | None,
        end: float | None,
    ) -> None:
        self.lane.finish(permit, start, response, error, end)
        if reserved is not None:
            budget = self.opts.budget
            assert budget is not None
            _charge(budget, self.request, self._estimate, reserved, response, error)
        gate = self.opts.gate
        if gate is not None:
            gate.release()

    # -- one attempt --------------------------------------------------------------

    async def attempt(self, *, hedge: bool, wait_before: float) -> Response:
        """One attempt, the engine's hot path. Every attempt leaves one
        :class:`Attempt` in ``self.attempts`` and gives its admission back, whatever
        happens."""
        loop = self.loop
        self.number += 1
        number = self.number
        opts = self.opts
        # 1. Admission: with no deadline, pattern gate or budget, a free slot in a lane
        # that meters nothing is taken at once; else wait for the pattern's gate, the
        # lane (its slot and rate buckets) and the budget, until the deadline.
        if (
            self.deadline is None
            and opts.gate is None
            and opts.budget is None
            and self.lane.try_acquire()
        ):
            permit, reserved = None, None
        elif self.deadline is None:
            permit, reserved = await self._admit()
        else:
            permit, reserved = await self._admit_by_deadline(number, hedge, wait_before)
        start = loop.time()
        # 2. The breaker: a cold one holds the first wave, a tripped one ends the call.
        breaker = self.breaker
        if breaker is not None and breaker.active:
            start = await self._past_breaker(breaker, permit, reserved, start)
        log_attempt_sent(self._who, number, self.request, hedge=hedge)
        if self.hooks:
            emit(
                self.hooks,
                AttemptStarted(start, self.request, self.index, self.label, number, hedge),
            )
        # 3. The send: bare when nothing bounds it; else under the attempt's timeout (or
        # the deadline), watched for a duplicate (:class:`Race`) unless it is one.
        response: Response | None = None
        failure: BaseException | None = None
        end: float | None = None  # when the answer or the error came (None: cancelled)
        try:
            race = self.race
            if self.timeout is None and self.deadline is None and (race is None or hedge):
                response = await self.llm.complete(self.request)
            else:  # inline, not a coroutine of its own: one frame fewer per call
                limit = self._limit(start)
                cm = asyncio.timeout_at(limit)
                watcher = None if hedge else race
                if watcher is not None:
                    watcher.watch(cm, start)
                try:
                    async with cm:
                        response = await self.llm.complete(self.request)
                except TimeoutError:
                    if not cm.expired():
                        raise  # the model itself raised TimeoutError: not ours
                    if watcher is not None and watcher.beaten(cm):
                        raise HedgeWon from None
                    raise _timed_out(self, limit == self.deadline) from None
                finally:
                    if watcher is not None:
                        watcher.unwatch()
            end = loop.time()
        except (asyncio.CancelledError, HedgeWon):
            self.attempts.append(
                Attempt(number, start, loop.time(), Status.CANCELLED, None, hedge, wait_before)
            )
            raise
        except BaseException as exc:
            # 4a. A failure: recorded, and counted by the breaker; run() decides what next.
            failure = exc
            end = loop.time()
            self._attempt_ended(number, start, end, hedge, wait_before, None, exc)
            if breaker is not None:
                breaker.failed(self.request, exc, number, end, self)
            raise
        finally:
            # 5. The admission goes back: the lane learns from the outcome and settles
            # its reservation, the budget is charged, the pattern's gate is released.
            self._leave(permit, reserved, start, response, failure, end)
        # 4b. A success: recorded; it closes what the breaker had counted.
        self._attempt_ended(number, start, end, hedge, wait_before, response, None)
        if breaker is not None and breaker.active:
            breaker.succeeded(self.request)
        return response

    def _attempt_ended(
        self,
        number: int,
        start: float,
        end: float,
        hedge: bool,
        wait_before: float,
        response: Response | None,
        error: BaseException | None,
    ) -> None:
        """Record an attempt that got an answer or an error, with the model's time on
        it (``Attempt.service``): what the reply says, or the round trip where the
        handle's round trip is all work; else unknown."""
        service = None if response is None else response.service_time
        if service is None and getattr(self.llm, "round_trip_is_work", True):
            service = end - start
        if error is None:
            status = Status.SUCCEEDED
            log_succeeded(self._who, number, end - start)
        else:
            status = status_of(error)
        self.attempts.append(
            Attempt(number, start, end, status, error, hedge, wait_before, service=service)
        )

    async def _admit_by_deadline(
        self, number: int, hedge: bool, wait_before: float
    ) -> tuple[Permit | None, float | None]:
        """Wait for admission, until the call's deadline (a timed-out attempt if not)."""
        deadline = self.deadline
        if deadline is None:
            return await self._admit()
        try:
            async with asyncio.timeout_at(deadline):
                return await self._admit()
        except TimeoutError:
            now = self.loop.time()
            error = _late_admission(self._who(), self.lane.metered or self.opts.budget is not None)
            self.attempts.append(
                Attempt(number, now, now, Status.TIMED_OUT, error, hedge, wait_before)
            )
            raise error from None

    async def _past_breaker(
        self, breaker: Breaker, permit: Permit | None, reserved: float | None, start: float
    ) -> float:
        """Let a cold or tripped breaker hold or end the admitted call; the send time."""
        try:
            stop = await breaker.admit(self.request, self, admitted=True)
        except BaseException:
            self._unsent(permit, reserved, start)
            raise
        if stop is not None:  # it tripped while this call waited: never sent
            self._unsent(permit, reserved, start)
            raise stop
        return self.loop.time()

    def _limit(self, start: float) -> float | None:
        """When an attempt sent at ``start`` times out: its timeout or the deadline."""
        deadline = self.deadline
        limit = None if self.timeout is None else start + self.timeout
        if deadline is not None and (limit is None or deadline < limit):
            limit = deadline
        return limit

    def _unsent(self, permit: Permit | None, reserved: float | None, admitted: float) -> None:
        """Give back an admission (made at ``admitted``) that was not used: nothing
        sent, nothing spent."""
        self.lane.finish(permit, admitted)
        budget = self.opts.budget
        if budget is not None and reserved is not None:
            budget.settle(reserved, 0.0)
        gate = self.opts.gate
        if gate is not None:
            gate.release()

    def _who(self) -> str:
        index, label = self.index, self.label
        if index is None:
            return "the call" if label is None else f"the {label!r} call"
        return f"item {index}" if label is None else f"item {index} ({label})"

    # -- the whole call -------------------------------------------------------------

    async def run(self, parse: Callable[[Response], T] | None) -> CallRecord[T]:
        """The call's attempts until one succeeds or the retry policy, the deadline or
        the breaker ends it; its record, emitted as ``CallEnded``."""
        loop = self.loop
        hedger = _hedger(self)
        start = loop.time()
        if self.hooks:
            emit(self.hooks, CallStarted(start, self.request, self.index, self.label, self.llm))
        wait_before = 0.0
        error: BaseException
        called = self.lane.successes  # the handle's successes when this call began
        while True:
            if self.deadline is not None and loop.time() >= self.deadline:
                error = CallTimeout(
                    f"{self._who()} was not started before the deadline passed; "
                    "raise deadline= or the concurrency"
                )
                break
            breaker = self.breaker
            if breaker is not None and breaker.active:
                stop = await breaker.admit(self.request, self)
                if stop is not None:  # a call that was tried keeps its own last error
                    if not self.attempts:
                        error = stop
                    break
            seen = self.lane.successes
            try:
                delay = self.opts.hedge_after
                if hedger is not None:
                    hedger.calls += 1
                    delay = hedger.delay()
                if delay is None:
                    response = await self.attempt(hedge=False, wait_before=wait_before)
                else:
                    response = await Race(self, delay, hedger, loop).run(wait_before)
            except asyncio.CancelledError:
                raise
            except CircuitOpen as exc:  # stopped once admitted: this attempt was not made
                if not self.attempts:
                    error = exc
                break
            except Exception as exc:
                error = exc
                wait = _verdict(self, exc, seen, called).wait
                log_attempt_failed(self._who, self.number, exc, wait)
                if self.hooks:
                    emit(
                        self.hooks,
                        AttemptFailed(
                            loop.time(),
                            self.request,
                            self.index,
                            self.label,
                            self.number,
                            exc,
                            wait,
                        ),
                    )
                if wait is None:
                    break
                wait_before = wait
                await asyncio.sleep(wait)
                continue
            return _succeeded(self, start, response, parse)
        return _ended(self, error, start)


def _in_order(attempts: list[Attempt]) -> tuple[Attempt, ...]:
    # Attempts are appended as they end; a record lists them as they were started.
    if len(attempts) == 1:
        return (attempts[0],)
    return tuple(sorted(attempts, key=lambda a: a.number))


def _verdict(call: _Call[Any], exc: Exception, sent_at: int, called: int) -> Verdict:
    """Decide what follows ``exc`` (:func:`fanflow._decide.decide`) and apply what
    the verdict says besides the wait: the breaker hears of a refusal, the attempt
    is marked requeued and annotated. ``sent_at`` and ``called``: the handle's
    successes when this attempt and this call began."""
    lane = call.lane
    drained = call.opts.drained
    gate = call.opts.gate
    deadline = call.deadline
    seen = Seen(
        # Hedges and requeues do not count against the retry budget.
        tries=sum(1 for a in call.attempts if not a.hedge and not a.requeued),
        requeues=call.requeues,
        succeeded_since_sent=lane.successes > sent_at,
        accepted_in_flight=lane.in_flight > 0 and lane.accepted_in_flight,
        alone_unanswered=lane.in_flight == 0 and not lane.answered,
        succeeded_since_call=lane.successes > called,
        draining=drained is not None and drained(),
        idle=lane.gate.idle() and (gate is None or gate.idle()),
        time_left=None if deadline is None else deadline - call.loop.time(),
    )
    verdict = decide(exc, seen, _policy(call))
    if verdict.refused and call.breaker is not None:
        assert isinstance(exc, RateLimited)
        call.breaker.refused(exc, call.loop.time())
    if verdict.requeued:
        call.requeues += 1
    if verdict.requeued or verdict.note is not None:
        _annotate(call.attempts, requeued=verdict.requeued or None, note=verdict.note)
    return verdict


def _policy(call: _Call[Any]) -> RetryPolicy:
    """The retry policy: the pattern's, else the handle's, else the default."""
    policy = call.opts.retry
    if policy is None:
        handle = call.handle
        policy = handle.retry if handle is not None and handle.retry else DEFAULT_RETRY
    return policy


def _hedger(call: _Call[Any]) -> Hedger | None:
    """The hedger of the handle's hedging policy (None: no hedging, or
    ``hedge_after`` instead)."""
    handle = call.handle
    if handle is None or call.opts.hedge_after is not None:
        return None
    policy = call.opts.retry or handle.retry
    hedge = policy.hedge if policy is not None and policy.hedge is not None else handle.hedges
    return call.lane.hedger if hedge else None


def parsed(
    response: Response, parse: Callable[[Response], T] | None, problem: Callable[[Exception], str]
) -> tuple[Status, Any, ParseError | None]:
    """``parse(response)`` (without ``parse``: the response) and its status; when
    ``parse`` raises, no value and a ParseError saying ``problem(exc)``."""
    if parse is None:
        return Status.SUCCEEDED, response, None
    try:
        return Status.SUCCEEDED, parse(response), None
    except Exception as exc:
        error = ParseError(problem(exc))
        error.__cause__ = exc
        return Status.FAILED, None, error


def _succeeded(
    call: _Call[T], start: float, response: Response, parse: Callable[[Response], T] | None
) -> CallRecord[T]:
    """The record of a call that got an answer (failed if ``parse`` raises), emitted."""
    end = call.loop.time()
    status, value, error = parsed(
        response,
        parse,
        lambda exc: (
            f"{call._who()}: the model answered but its reply could not be used: "
            f"{type(exc).__name__}: {exc}"
        ),
    )
    usage = response.usage if response.usage is not None else Usage()
    cost = _cost_of(response, call.request.model, call.opts.prices)
    record: CallRecord[T] = CallRecord(
        status=status,
        request=call.request,
        value=value,
        error=error,
        attempts=_in_order(call.attempts),
        start=start,
        end=end,
        usage=usage,
        cost=None if cost is None else cost.dollars,
        label=call.label,
        index=call.index,
        response=response,
        cache_saved=cost.cache_saved if cost is not None and _uses_cache(usage) else None,
        cost_estimated=cost is not None and cost.estimated,
    )
    if call.hooks:
        emit(call.hooks, CallEnded(end, record))
    return record


def _ended(call: _Call[T], error: BaseException, start: float) -> CallRecord[T]:
    """The record of a call that ended without a success, emitted."""
    record: CallRecord[T] = CallRecord(
        status=status_of(error),
        request=call.request,
        error=error,
        attempts=_in_order(call.attempts),
        start=start,
        end=call.loop.time(),
        label=call.label,
        index=call.index,
    )
    if call.hooks:
        emit(call.hooks, CallEnded(record.end or start, record))
    return record


def _timed_out(call: _Call[Any], by_deadline: bool) -> CallTimeout:
    """The error of an attempt cut off by its timeout or by the call's deadline."""
    if by_deadline:
        return CallTimeout(
            f"{call._who()} did not finish before the deadline; raise deadline= "
            "or lower the work per call",
        )
    return CallTimeout(
        f"{call._who()}: attempt {call.number} got no answer within "
        f"{call.timeout:g} s; raise timeout= if the model is just slow",
        timeout=call.timeout,
    )


def _charge(
    budget: Budget,
    request: Request,
    estimate: Callable[[], tuple[int, int]],
    reserved: float,
    response: Response | None,
    error: BaseException | None,
) -> None:
    """Settle a budget reservation for an attempt that was sent: what the reply says it
    used, the prompt alone for an error the server answered, else the reservation."""
    usage = response.usage if response is not None else None
    if usage is not None and usage.total_tokens > 0:
        model = response.model if response is not None and response.model else None
        try:
            batch = response is not None and batch_info(response.extra) is not None
            actual = budget.amount(
                model or request.model,
                usage.input_tokens,
                usage.output_tokens,
                batch=batch,
                cached=usage.cached_input_tokens,
                written=usage.cache_write_input_tokens,
                written_1h=usage.cache_write_1h_input_tokens,
            )
        except BudgetExceeded:  # the reply names a model we have no price for
            actual = reserved
    elif response is None and error is not None and not isinstance(error, CallTimeout):
        # The server answered with an error: it read the prompt, not a reply.
        input_tokens, _ = estimate()
        actual = budget.amount(request.model, input_tokens, 0)
    else:
        actual = reserved  # cut off (timeout, cancelled) or no usage reported
    budget.settle(reserved, actual)


def _cost_of(
    response: Response, model: str | None, prices: Mapping[str, Price] | None
) -> Cost | None:
    """The response's usage at its model's price (None: unknown); a response that
    carries its own cost (a batch line) keeps it."""
    usage = response.usage
    if usage is None or usage.total_tokens <= 0:
        return None if response.cost is None else Cost(response.cost)
    price = price_of(response.model or model, prices)
    if price is None:
        return None if response.cost is None else Cost(response.cost)
    cost = priced(usage, price, batch=batch_info(response.extra) is not None)
    if response.cost is not None:
        return Cost(response.cost, cost.cache_saved, cost.estimated)
    return cost


def _annotate(
    attempts: list[Attempt], *, requeued: bool | None = None, note: str | None = None
) -> None:
    """Mark the attempt that just failed (the latest one that was not a hedge)."""
    for i in range(len(attempts) - 1, -1, -1):
        a = attempts[i]
        if not a.hedge:
            changes: dict[str, Any] = {}
            if requeued is not None:
                changes["requeued"] = requeued
            if note is not None:
                changes["note"] = note
            attempts[i] = dataclasses.replace(a, **changes)
            return


def _late_admission(who: str, metered: bool) -> CallTimeout:
    """The error of a call still waiting for admission at its deadline."""
    if metered:
        return CallTimeout(
            f"{who} was still waiting for admission (a concurrency slot, its turn under "
            "the rate limits, or budget) when the deadline passed; raise the deadline, or "
            "expect the limits to take longer",
        )
    return CallTimeout(
        f"{who} was still waiting for a concurrency slot when the deadline passed; "
        "raise the deadline or the concurrency",
    )


def execute(
    llm: LLM,
    request: Request,
    opts: Run = NO_RUN,
    *,
    index: int | None = None,
    label: str | None = None,
    parse: Callable[[Response], T] | None = None,
) -> Coroutine[Any, Any, CallRecord[T]]:
    """Run one call to its terminal status and return its record (await the result).

    Failures are data: the record holds the error. Only cancellation propagates.

    Args:
        llm: the model.
        request: the request (the handle's defaults are filled in first).
        opts: the pattern run's options (:meth:`CallOptions.start`).
        index: the item index, for records, events and messages.
        label: a free-form label (worker, step) for records and events.
        parse: turns the response into the record's value; if it raises, the call
            ends as failed with the reason (the model's answer stays in ``response``).
    """
    handle = llm if isinstance(llm, BaseLLM) else None
    if handle is not None:
        if handle.routed:  # a router or cascade: it runs the call on its own handles
            return cast("Routed", llm).route(request, opts, index=index, label=label, parse=parse)
        request = handle.prepare(request)
    # Not _Call[T](...): calling a subscripted generic goes through typing's slow path.
    # Return run()'s coroutine rather than awaiting it here: one frame fewer per call
    # in flight.
    call: _Call[T] = _Call(llm, handle, request, opts, index, label)
    return call.run(parse)


def _uses_cache(usage: Usage) -> bool:
    return bool(usage.cached_input_tokens or usage.cache_write_input_tokens)
