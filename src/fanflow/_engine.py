"""The engine: one call from admission to its terminal status.

For each call: fill in the handle's defaults, then for each attempt wait for admission
(the pattern's gate, then the handle's lane), send it under the per-attempt timeout,
and on a retryable error wait a backoff (never less than the server's Retry-After)
before the next. A 429/529 answered while the handle's other calls were succeeding, or
while a call the server accepted before it was still in flight, was caused by the
handle's own load: it waits exactly the Retry-After and does not use up an attempt
(decisions 0132, 0165). With ``hedge_after``, a second attempt starts if the first has
not answered in that time; with the hedging policy (HTTP handles, by default), once it
is slower than a high quantile of the handle's recent latencies, within a cap of extra
calls (decision 0133). The first success wins and the other is cancelled. An overall
``deadline`` bounds everything, admission waits and backoffs included.

All waiting goes through the event loop (``asyncio.sleep``, ``asyncio.timeout``), so
tests run it in virtual time. ``asyncio.CancelledError`` always propagates: cancelling
a pattern cancels its calls' tasks, and never turns into a retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from ._batchinfo import batch_info
from ._breaker import Breaker
from ._budget import Budget, as_budget
from ._checks import check_concurrency, check_seconds
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
    Overloaded,
    ParseError,
    ProviderError,
    RateLimited,
    ServerError,
    Skipped,
    is_retryable,
)
from ._hedge import Hedger
from ._limits import Gate, Lane, Permit
from ._llm import LLM, BaseLLM, lane_of
from ._log import log_attempt_failed, log_attempt_sent, log_succeeded
from ._pricing import Cost, Price, price_of, priced
from ._repr import render
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._tokens import request_tokens
from ._types import Attempt, CallRecord, Request, Response, Status, Usage

__all__ = ["NO_RUN", "TIMING", "CallOptions", "Run", "execute", "status_of"]

T = TypeVar("T")

# The most 429/529s one call may have requeued without using up an attempt (the
# deadline bounds them too).
MAX_REQUEUES = 100

# A 5xx in a batch's tail is retried at once (decision 0151); False only for A/B
# measurements (benchmarks/limits_servers.py).
TAIL_RETRY = True
# The note on an attempt whose 5xx was retried at once in a batch's tail.
TAIL_RETRY_NOTE = (
    "retried at once (no backoff): a 5xx in the batch's tail (every item started, or "
    "free slots), the handle's other calls succeeding"
)


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
            From then on a 5xx is retried at once (:meth:`_Call._tail_retry`, decision
            0157).
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


class _HedgeWon(Exception):
    """Raised in an attempt that lost the race to its duplicate (never leaves _Call)."""


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
        "cm",
        "deadline",
        "handle",
        "hedge_delay",
        "hedge_task",
        "hooks",
        "index",
        "label",
        "lane",
        "llm",
        "loop",
        "number",
        "opts",
        "request",
        "requeues",
        "timeout",
        "tokens",
        "won",
    )

    def __init__(
        self,
        llm: LLM,
        request: Request,
        opts: Run,
        index: int | None,
        label: str | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.llm = llm
        self.request = request
        self.opts = opts
        self.index = index
        self.label = label
        self.hooks = opts.hooks
        self.deadline = opts.deadline
        self.handle = llm if isinstance(llm, BaseLLM) else None
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
        # The hedging policy's state for the current attempt (see spawn_hedge).
        self.hedge_delay: float | None = None
        self.cm: asyncio.Timeout | None = None
        self.hedge_task: asyncio.Task[Response | None] | None = None
        self.won: Response | None = None

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
    ) -> None:
        self.lane.finish(permit, start, response, error)
        if reserved is not None:
            self._charge(reserved, response, error)
        gate = self.opts.gate
        if gate is not None:
            gate.release()

    def _charge(
        self, reserved: float, response: Response | None, error: BaseException | None
    ) -> None:
        """Settle a budget reservation: every attempt that was sent counts."""
        budget = self.opts.budget
        assert budget is not None
        usage = response.usage if response is not None else None
        if usage is not None and usage.total_tokens > 0:
            model = response.model if response is not None and response.model else None
            try:
                batch = response is not None and batch_info(response.extra) is not None
                actual = budget.amount(
                    model or self.request.model,
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
            input_tokens, _ = self._estimate()
            actual = budget.amount(self.request.model, input_tokens, 0)
        else:
            actual = reserved  # cut off (timeout, cancelled) or no usage reported
        budget.settle(reserved, actual)

    # -- one attempt --------------------------------------------------------------

    async def attempt(
        self, *, hedge: bool, wait_before: float, sent: asyncio.Event | None = None
    ) -> Response:
        """One attempt, the engine's hot path: admission, the breaker, the send.

        Admission is the pattern's gate, the handle's lane and the budget (nothing to
        wait for on the fast path); the breaker may end a call admitted while it
        tripped; the send runs under the attempt's timeout or the deadline, watched by
        the hedger. Every attempt leaves one :class:`Attempt` in ``self.attempts`` and
        gives its admission back (``_leave``), whatever happens.
        """
        loop = self.loop
        self.number += 1
        number = self.number
        opts = self.opts
        if (
            self.deadline is None
            and opts.gate is None
            and opts.budget is None
            and self.lane.try_acquire()
        ):
            permit, reserved = None, None  # the fast path: nothing to wait for
        else:
            permit, reserved = await self._admit_by_deadline(number, hedge, wait_before)
        start = loop.time()
        breaker = self.breaker
        if breaker is not None and breaker.active:
            start = await self._past_breaker(breaker, permit, reserved, start)
        if sent is not None:
            sent.set()
        log_attempt_sent(self._who, number, self.request, hedge=hedge)
        if self.hooks:
            emit(
                self.hooks,
                AttemptStarted(start, self.request, self.index, self.label, number, hedge),
            )
        response: Response | None = None
        failure: BaseException | None = None
        try:
            limit = self._limit(start)
            delay = self.hedge_delay
            if limit is None and (delay is None or hedge):
                response = await self.llm.complete(self.request)
            else:
                cm = asyncio.timeout_at(limit)
                watched = delay is not None and not hedge
                if watched:
                    self._watch(cm, start + (delay or 0.0))
                try:
                    async with cm:
                        response = await self.llm.complete(self.request)
                except TimeoutError:
                    if not cm.expired():
                        raise  # the model itself raised TimeoutError: not ours
                    raise self._expired(cm, limit) from None
                finally:
                    if watched:
                        self.lane.hedger.unwatch(self)
                        self.cm = None
        except (asyncio.CancelledError, _HedgeWon):
            self.attempts.append(
                Attempt(number, start, loop.time(), Status.CANCELLED, None, hedge, wait_before)
            )
            raise
        except BaseException as exc:
            failure = exc
            end = loop.time()
            service = self._service(end - start, None)
            self.attempts.append(
                Attempt(
                    number, start, end, status_of(exc), exc, hedge, wait_before, service=service
                )
            )
            if breaker is not None:
                breaker.failed(self.request, exc, number, end, self)
            raise
        finally:
            self._leave(permit, reserved, start, response, failure)
        end = loop.time()
        service = self._service(end - start, response)
        self.attempts.append(
            Attempt(number, start, end, Status.SUCCEEDED, None, hedge, wait_before, service=service)
        )
        log_succeeded(self._who, number, end - start)
        if breaker is not None and breaker.active:
            breaker.succeeded(self.request)
        return response

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
            if self.lane.metered or self.opts.budget is not None:
                error = CallTimeout(
                    f"{self._who()} was still waiting for admission (a concurrency "
                    "slot, its turn under the rate limits, or budget) when the deadline "
                    "passed; raise the deadline, or expect the limits to take longer",
                )
            else:
                error = CallTimeout(
                    f"{self._who()} was still waiting for a concurrency slot when the "
                    "deadline passed; raise the deadline or the concurrency",
                )
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

    def _watch(self, cm: asyncio.Timeout, due: float) -> None:
        """The hedging policy: a duplicate if this attempt is still running at ``due``;
        if the duplicate wins, it expires this attempt's timeout (asyncio's own
        race-free cancellation)."""
        self.cm = cm
        self.lane.hedger.watch(self, due)

    def _expired(self, cm: asyncio.Timeout, limit: float | None) -> BaseException:
        """What an attempt whose timeout expired raises: the hedge won, or it timed out."""
        if self.won is not None and cm is self.cm:
            return _HedgeWon()
        return self._timeout_error(limit == self.deadline)

    def _service(self, duration: float, response: Response | None) -> float | None:
        """The model's time on an attempt (``Attempt.service``): what the reply says, or
        the round trip where the handle's round trip is all work; else unknown."""
        if response is not None and response.service_time is not None:
            return response.service_time
        return duration if getattr(self.llm, "round_trip_is_work", True) else None

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

    def _timeout_error(self, by_deadline: bool) -> CallTimeout:
        if by_deadline:
            return CallTimeout(
                f"{self._who()} did not finish before the deadline; raise deadline= "
                "or lower the work per call",
            )
        return CallTimeout(
            f"{self._who()}: attempt {self.number} got no answer within "
            f"{self.timeout:g} s; raise timeout= if the model is just slow",
            timeout=self.timeout,
        )

    async def hedged(self, hedge_after: float, wait_before: float) -> Response:
        """Run an attempt; if it has not answered ``hedge_after`` seconds after it was
        sent, start a duplicate. The first success wins; the other is cancelled."""
        # Every task started here is kept and awaited before this returns (structured,
        # as a task group would; a group cannot be used because one attempt's failure
        # must not cancel the other).
        loop = self.loop
        sent = asyncio.Event()
        primary = loop.create_task(self.attempt(hedge=False, wait_before=wait_before, sent=sent))
        tasks: set[asyncio.Task[Response]] = {primary}
        try:
            waiter = loop.create_task(sent.wait())
            try:
                await asyncio.wait({primary, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            if not primary.done():
                await asyncio.wait({primary}, timeout=hedge_after)
            if primary.done():
                return primary.result()
            tasks.add(loop.create_task(self.attempt(hedge=True, wait_before=0.0)))
            last_error: BaseException | None = None
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is None:
                        return task.result()
                    last_error = error
            assert last_error is not None
            raise last_error
        finally:
            for task in tasks:
                task.cancel()
            # Wait for the loser to stop; its outcome is already in the attempts. (gather
            # still propagates a cancellation of this task itself.)
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the whole call -------------------------------------------------------------

    async def run(self, parse: Callable[[Response], T] | None) -> CallRecord[T]:
        """The call's attempts until one succeeds or the retry policy, the deadline or
        the breaker ends it; its record, emitted as ``CallEnded``."""
        loop = self.loop
        policy, hedger = self._policies()
        hedge_after = self.opts.hedge_after
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
                if hedge_after is not None:
                    response = await self.hedged(hedge_after, wait_before)
                elif hedger is not None:
                    hedger.calls += 1
                    self.hedge_delay = hedger.delay()
                    response = await self._policy_attempt(wait_before)
                else:
                    response = await self.attempt(hedge=False, wait_before=wait_before)
            except asyncio.CancelledError:
                raise
            except CircuitOpen as exc:  # stopped once admitted: this attempt was not made
                if not self.attempts:
                    error = exc
                break
            except Exception as exc:
                error = exc
                wait = self._wait_after(exc, policy, seen, called)
                log_attempt_failed(self._who, self.number, exc, wait)
                if self.hooks:
                    emit(self.hooks, self._attempt_failed(exc, wait))
                if wait is None:
                    break
                wait_before = wait
                await asyncio.sleep(wait)
                continue
            return self._finish(start, response, parse)
        return self._failed(error, start)

    def _policies(self) -> tuple[RetryPolicy, Hedger | None]:
        """The retry policy (the pattern's, else the handle's) and the hedger of the
        handle's hedging policy (None: no hedging, or ``hedge_after`` instead)."""
        policy = self.opts.retry
        handle = self.handle
        if policy is None:
            policy = handle.retry if handle is not None and handle.retry else DEFAULT_RETRY
        if self.opts.hedge_after is not None or handle is None:
            return policy, None
        hedge = policy.hedge if policy.hedge is not None else handle.hedges
        return policy, self.lane.hedger if hedge else None

    def _attempt_failed(self, exc: Exception, wait: float | None) -> AttemptFailed:
        return AttemptFailed(
            self.loop.time(), self.request, self.index, self.label, self.number, exc, wait
        )

    def _failed(self, error: BaseException, start: float) -> CallRecord[T]:
        """The record of a call that ended without a success."""
        record: CallRecord[T] = CallRecord(
            status=status_of(error),
            request=self.request,
            error=error,
            attempts=self._ordered_attempts(),
            start=start,
            end=self.loop.time(),
            label=self.label,
            index=self.index,
        )
        if self.hooks:
            emit(self.hooks, CallEnded(record.end or start, record))
        return record

    async def _policy_attempt(self, wait_before: float) -> Response:
        """An attempt under the hedging policy: the first success of it and its
        duplicate (if :meth:`spawn_hedge` started one) wins."""
        self._clear_hedge()
        try:
            response = await self.attempt(hedge=False, wait_before=wait_before)
        except _HedgeWon:
            assert self.won is not None
            return self.won
        except Exception:
            task = self.hedge_task
            if task is None:
                raise
            won = await task  # the duplicate may still succeed
            if won is None:
                raise
            return won
        finally:
            task = self.hedge_task
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return response

    def _clear_hedge(self) -> None:
        self.won = None
        self.hedge_task = None

    def spawn_hedge(self) -> None:
        """The attempt is slower than the handle's hedging delay: start a duplicate,
        if the policy's cap allows one."""
        if self.cm is None or not self.lane.hedger.allow():
            return
        self.hedge_task = self.loop.create_task(self._hedge())

    async def _hedge(self) -> Response | None:
        try:
            response = await self.attempt(hedge=True, wait_before=0.0)
        except Exception:
            return None  # recorded in the attempts; the first attempt goes on
        self.won = response
        cm = self.cm
        if cm is not None and not cm.expired():
            cm.reschedule(self.loop.time())  # stop the first attempt: the duplicate won
        return response

    def _wait_after(
        self, exc: Exception, policy: RetryPolicy, seen: int, called: int
    ) -> float | None:
        """How long to wait before the next attempt after ``exc`` (None: stop now).

        A 429/529 of the handle's own load (:func:`_own_load`; ``seen``: the handle's
        successes when this attempt began) is requeued without using up an attempt (at
        most ``MAX_REQUEUES``); any other uses one up (a 429 may go to the breaker:
        :func:`_report_refusal`).
        A 5xx in a batch's tail may go again at once (``called``: the handle's successes
        when this call began; :meth:`_tail_retry`).
        A Retry-After is waited exactly, never longer, and at most ``policy.max_wait``;
        without a usable one, the backoff. The reason goes into the attempt's ``note``
        when the wait is not simply what the server asked.
        """
        if not is_retryable(exc):
            return None
        overload = isinstance(exc, RateLimited | Overloaded)
        if overload and self.requeues < MAX_REQUEUES and _own_load(self.lane, seen):
            self.requeues += 1
            self._annotate(requeued=True)
        else:
            if self.breaker is not None and isinstance(exc, RateLimited):
                _report_refusal(self.breaker, self.lane, exc, self.loop.time())
            if len(self._tries()) >= policy.attempts:
                return None
        asked = exc.retry_after if isinstance(exc, ProviderError) else None
        note = None
        if overload and asked is not None and asked > 0:
            wait = asked  # the server said when: no more, no less
        elif self._tail_retry(exc, asked, called):
            wait = 0.0
            note = TAIL_RETRY_NOTE
        else:
            wait = policy.backoff(max(1, len(self._tries())), asked)
            if overload:
                note = (
                    f"no usable Retry-After (missing, zero, negative, a past date or "
                    f"unreadable): waited {wait:.3g} s (backoff)"
                )
        if wait > policy.max_wait and asked is not None and asked > policy.max_wait:
            note = (
                f"the server asked to wait {asked:g} s (Retry-After); waited "
                f"{policy.max_wait:g} s, the retry policy's max_wait"
            )
            wait = policy.max_wait
        deadline = self.deadline
        if deadline is not None and self.loop.time() + wait >= deadline:
            self._annotate(note=f"the deadline would pass during the {wait:.3g} s wait: stopped")
            return None
        if note is not None:
            self._annotate(note=note)
        return wait

    def _tail_retry(self, exc: Exception, asked: float | None, called: int) -> bool:
        """Whether a 5xx is retried at once, without backoff (decision 0151).

        Only in a batch's tail: the error is a plain 5xx (not a 429/529 overload) with
        no Retry-After, other calls of the handle succeeded since this call began (the
        server is up: this error is the item's bad luck, not an outage), and either the
        batch has handed out its last item (decision 0157: from then on the load only
        falls, and the retry waits for a slot like any call) or there are free slots
        nobody waits for, both in the pattern's gate and in the handle's lane (so the
        retry only takes load the server was carrying a moment ago). Mid-batch, where
        slots are contended, and against a failing server, the backoff stands.
        """
        if not TAIL_RETRY or type(exc) is not ServerError or asked is not None:
            return False
        lane = self.lane
        if lane.successes <= called:
            return False
        drained = self.opts.drained
        if drained is not None and drained():
            return True
        if not lane.gate.idle():
            return False
        gate = self.opts.gate
        return gate is None or gate.idle()

    def _annotate(self, *, requeued: bool | None = None, note: str | None = None) -> None:
        """Mark the attempt that just failed (the latest one that was not a hedge)."""
        for i in range(len(self.attempts) - 1, -1, -1):
            a = self.attempts[i]
            if not a.hedge:
                changes: dict[str, Any] = {}
                if requeued is not None:
                    changes["requeued"] = requeued
                if note is not None:
                    changes["note"] = note
                self.attempts[i] = dataclasses.replace(a, **changes)
                return

    def _cost(self, response: Response) -> Cost | None:
        """The response's usage at the model's price (None: unknown); a response that
        carries its own cost (a batch line) keeps it."""
        usage = response.usage
        if usage is None or usage.total_tokens <= 0:
            return None if response.cost is None else Cost(response.cost)
        price = price_of(response.model or self.request.model, self.opts.prices)
        if price is None:
            return None if response.cost is None else Cost(response.cost)
        cost = priced(usage, price, batch=batch_info(response.extra) is not None)
        if response.cost is not None:
            return Cost(response.cost, cost.cache_saved, cost.estimated)
        return cost

    def _ordered_attempts(self) -> tuple[Attempt, ...]:
        # Attempts are appended as they end; a record lists them as they were started.
        if len(self.attempts) == 1:
            return (self.attempts[0],)
        return tuple(sorted(self.attempts, key=lambda a: a.number))

    def _tries(self) -> list[Attempt]:
        """Attempts that count against the retry budget (hedges and requeues do not)."""
        return [a for a in self.attempts if not a.hedge and not a.requeued]

    def _finish(
        self, start: float, response: Response, parse: Callable[[Response], T] | None
    ) -> CallRecord[T]:
        end = self.loop.time()
        status = Status.SUCCEEDED
        value: Any = response
        error: BaseException | None = None
        if parse is not None:
            try:
                value = parse(response)
            except Exception as exc:
                status, value = Status.FAILED, None
                error = ParseError(
                    f"{self._who()}: the model answered but its reply could not be used: "
                    f"{type(exc).__name__}: {exc}"
                )
                error.__cause__ = exc
        usage = response.usage if response.usage is not None else Usage()
        cost = self._cost(response)
        record: CallRecord[T] = CallRecord(
            status=status,
            request=self.request,
            value=value,
            error=error,
            attempts=self._ordered_attempts(),
            start=start,
            end=end,
            usage=usage,
            cost=None if cost is None else cost.dollars,
            label=self.label,
            index=self.index,
            response=response,
            cache_saved=cost.cache_saved if cost is not None and _uses_cache(usage) else None,
            cost_estimated=cost is not None and cost.estimated,
        )
        if self.hooks:
            emit(self.hooks, CallEnded(end, record))
        return record


def _own_load(lane: Lane, seen: int) -> bool:
    """Whether the 429/529 that just came back was caused by the handle's own load
    (decision 0165): another call succeeded while it was out (``seen``: the handle's
    successes when it was sent), or a call that was in flight when the server first
    refused (since the last success) is still in flight: a refusal comes back in one
    round trip, so the server took that call and is full. A server refusing everything
    keeps no call, so there each refusal uses up an attempt."""
    return lane.successes > seen or (lane.in_flight > 0 and lane.accepted_in_flight)


def _report_refusal(breaker: Breaker, lane: Lane, exc: RateLimited, now: float) -> None:
    """A 429 not of the handle's own load: the breaker counts it if the call was alone
    in flight and no call of the handle has succeeded (three trip it: the limit may be
    0 for this key or model)."""
    if lane.in_flight == 0 and not lane.answered:
        breaker.refused(exc, now)


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
    if isinstance(llm, BaseLLM):
        if llm.routed:  # a router or cascade: it runs the call on its own handles
            return cast(_Routed, llm).route(request, opts, index=index, label=label, parse=parse)
        request = llm.prepare(request)
    # Not _Call[T](...): calling a subscripted generic goes through typing's slow path.
    # Return run()'s coroutine rather than awaiting it here: one frame fewer per call,
    # which matters when 10,000 calls are in flight (fewer objects for the GC to scan).
    call: _Call[T] = _Call(llm, request, opts, index, label)
    return call.run(parse)


def _uses_cache(usage: Usage) -> bool:
    return bool(usage.cached_input_tokens or usage.cache_write_input_tokens)


class _Routed(Protocol):
    """A handle whose calls run on other handles (``BaseLLM.routed``: fanflow/_router.py)."""

    def route(
        self,
        request: Request,
        opts: Run,
        *,
        index: int | None,
        label: str | None,
        parse: Callable[[Response], T] | None,
    ) -> Coroutine[Any, Any, CallRecord[T]]: ...
