"""Fail fast: a handle's breaker stops sending when every further call must fail the same way.

A wrong API key, a model that does not exist, a spent quota or a server that is not
listening make every call of a batch fail, one request at a time. The breaker watches
the attempts of one handle (the engine reports each outcome) and, once the failures say
the cause is not going away, *trips*: calls not yet sent end ``skipped`` with
:class:`fanflow.errors.CircuitOpen`, whose message names the cause and what to fix, instead of
each sending its own doomed request. What it watches (``docs/decisions/0091``):

=====================================  ==============  =================================
failure                                scope           trips after
=====================================  ==============  =================================
401 ``AuthenticationError``            the handle      3 in a row
``QuotaExceeded`` (429 "quota")        the handle      3 in a row
403 ``PermissionDenied``               the model       3 in a row for that model
404 ``NotFound``                       the model       3 in a row for that model
could not connect (refused, DNS)       the handle      3 in a row, one of them a call's
                                                       3rd attempt (it retried first)
429 to a call alone in flight, before  the handle      3 (the engine reports them:
any call of the handle succeeded                       ``refused``; decision 0165);
                                                       calls then wait for probes up
                                                       to :data:`REFUSED_HOLD` s
=====================================  ==============  =================================

"In a row" means with no successful attempt in between: a success clears the counts of
the handle and of its model, and closes what they had tripped. Other errors (429s the
engine does not report, 5xx, timeouts, resets, 400) neither count nor clear. Calls
already sent when it trips finish as they will; a call is stopped before each attempt
and again once admitted, so a wrong key costs about the concurrency plus three calls.

A new HTTP handle starts *cold* (:mod:`fanflow._cold`, decision 0175): its first
:data:`COLD_CALLS` calls go, and the wave doubles every few round trips without an
answer that may trip it; an answer that does not trip it ends the cold start, and so
does a trip (a success does not: the wave goes on doubling).

A tripped breaker does not poison the handle: :data:`PROBE_AFTER` seconds after the trip
(or the last probe), the next call goes as a probe while the others wait for it. After
a trip on refusals from the start, the calls are not skipped at once: for
:data:`REFUSED_HOLD` seconds they wait, while probes go after :data:`REFUSED_PROBE`
seconds and then twice as long each time (another client filling the server looks the
same as a limit of 0 until one of its slots frees: decision 0310). A
success (or another kind of failure: the server was reached) closes the breaker; the
same failure keeps it open for another :data:`PROBE_AFTER`. :meth:`Breaker.reset`
closes it at once; a new handle, or a copy in another process, starts closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from ._cold import COLD_CALLS, ColdStart
from ._exceptions import (
    RETRYABLE,
    AuthenticationError,
    CallTimeout,
    CircuitOpen,
    NotFound,
    Overloaded,
    PermissionDenied,
    ProtocolError,
    ProviderConnectionError,
    ProviderTimeout,
    QuotaExceeded,
    RateLimited,
    ServerError,
)
from ._log import log
from ._types import Request

__all__ = [
    "COLD_CALLS",
    "PROBE_AFTER",
    "REFUSED_HOLD",
    "TRIP_AFTER",
    "Breaker",
    "fatal_scope",
    "is_failing",
]

#: Failures of the same kind in a row (no success between) that trip the breaker.
TRIP_AFTER = 3
#: A connection failure trips only once some call has failed this many attempts to
#: connect: a server that is restarting gets the retries' backoff to come back.
CONNECT_ATTEMPTS = 3
#: Seconds after a trip (or a failed probe) before one call is let through as a probe.
PROBE_AFTER = 10.0
#: After a trip on refusals from the start, calls wait this long for a probe to be
#: answered before they are skipped: another client filling the server looks the same
#: as a limit of 0 until one of its slots frees (decision 0310).
REFUSED_HOLD = 10.0
#: The first probe of such a trip goes this long after it; each refused one doubles it.
REFUSED_PROBE = 1.0

_EPSILON = 1e-6

Scope = tuple[str, str | None]
_HANDLE: Scope = ("handle", None)

_FIX = {
    "key": "the API key was not accepted (HTTP 401): check the API key (api_key=, or "
    "the provider's environment variable such as OPENAI_API_KEY)",
    "quota": "the account's quota or spend limit is used up: waiting will not help; "
    "check the plan and billing",
    "forbidden": "this key may not use model {model} (HTTP 403): use a model or a key "
    "that has access",
    "missing": "model {model} or its endpoint does not exist (HTTP 404): check the model "
    "name and base_url",
    "unreachable": "the server could not be reached (every attempt failed to connect): "
    "check that it is up and that base_url is right",
    "refused": "every request was refused with 429 since the start, even with no other "
    "call in flight: the limit may be 0 for this key or model (or other clients use it "
    "all); check the key's rate limits for the model, or use another key or model",
    "failing": "the server answered every recent attempt with a 5xx error or not in "
    "time, so a router took it out of rotation; it is probed again later",
}


def is_failing(error: BaseException) -> bool:
    """Whether ``error`` says the server is failing (a 5xx other than an overload, no
    answer in time, a broken reply or connection): what :meth:`Breaker.trip` is for."""
    if isinstance(error, Overloaded):
        return False
    return isinstance(
        error, ServerError | ProviderTimeout | CallTimeout | ProtocolError | ProviderConnectionError
    )


def fatal_scope(error: BaseException, request: Request) -> tuple[str, Scope] | None:
    """The kind and scope of a failure that repeats for every call, or None."""
    if isinstance(error, AuthenticationError):
        return "key", ("handle", None)
    if isinstance(error, QuotaExceeded):
        return "quota", ("handle", None)
    if isinstance(error, PermissionDenied):
        return "forbidden", ("model", request.model)
    if isinstance(error, NotFound):
        return "missing", ("model", request.model)
    if isinstance(error, ProviderConnectionError) and error.unreachable:
        return "unreachable", ("handle", None)
    if isinstance(error, ConnectionRefusedError):  # from a user's own callable
        return "unreachable", ("handle", None)
    return None


@dataclass(slots=True)
class _Trip:
    kind: str
    error: CircuitOpen
    probe_at: float  # when the next probe may go (or a probe in flight is given up)
    prober: object = None  # the call sent as a probe, until its outcome is known
    settled: asyncio.Event | None = None  # set when the probe's outcome is known
    hold_until: float = 0.0  # until then calls wait for a probe instead of being skipped
    every: float = PROBE_AFTER  # seconds from a failed probe to the next

    def settle(self) -> None:
        if self.settled is not None:
            self.settled.set()
            self.settled = None
        self.prober = None

    def probe_failed(self, now: float) -> None:
        self.settle()
        self.probe_at = now + self.every
        self.every = min(2 * self.every, PROBE_AFTER)


class Breaker:
    """The fail-fast state of one handle (``llm.breaker``); see the module docstring.

    The engine awaits :meth:`admit` before each attempt (and again once the attempt is
    admitted), and calls :meth:`failed` / :meth:`succeeded` after it; ``call`` is any
    object that stands for one call (the engine's own), so a probe is let through.
    """

    __slots__ = (
        "_cold",
        "_cold_limit",
        "_open",
        "_streaks",
        "active",
        "trips",
    )

    def __init__(self, *, cold_start: int | None = None) -> None:
        """Args:
        cold_start: the first wave of a new handle (see the module docstring);
            None: no cold start.
        """
        self._streaks: dict[Scope, int] = {}
        self._open: dict[Scope, _Trip] = {}
        self._cold_limit = cold_start
        self._cold: ColdStart | None = None
        if cold_start is not None:
            self._cold = ColdStart(cold_start, lambda: bool(self._streaks))
        #: True while anything is counted or open (or it is cold): the engine reads
        #: only this flag on its fast path.
        self.active = self._cold is not None
        #: How many times it has tripped (failed probes included).
        self.trips = 0

    def __repr__(self) -> str:
        state = ", ".join(t.kind for t in self._open.values()) or "closed"
        return f"fanflow.Breaker({state})"

    @property
    def tripped(self) -> CircuitOpen | None:
        """The error calls are skipped with while it is open (None: closed)."""
        for trip in self._open.values():
            return trip.error
        return None

    def reset(self) -> None:
        """Close it and forget every count (say, after fixing the key or the server)."""
        for trip in self._open.values():
            trip.settle()
        self._streaks.clear()
        self._open.clear()
        self._warm_up()
        self.active = False

    def _warm_up(self) -> None:
        """The first answers are in: every call may go (the cold start is over)."""
        cold = self._cold
        if cold is not None:
            self._cold = None
            cold.end()
            self.active = bool(self._open or self._streaks)

    def connected(self, seconds: float) -> bool:
        """A connection of the handle was handed out after ``seconds`` (the HTTP handles
        report them while it is cold): the cold start's wave grows at a pace of its round
        trips. False once the cold start is over (no more reports needed)."""
        cold = self._cold
        return cold is not None and cold.connected(seconds)

    def _blocking(self, request: Request, call: object) -> _Trip | None:
        for scope in (("handle", None), ("model", request.model)):
            trip = self._open.get(scope)
            if trip is not None and (trip.prober is None or trip.prober is not call):
                return trip
        return None

    async def admit(
        self, request: Request, call: object, *, admitted: bool = False
    ) -> CircuitOpen | None:
        """Wait while a probe is out (or, before admission, while the handle is cold);
        then the error to skip ``request`` with, or None to send it (before admission:
        to be admitted and asked again)."""
        cold = self._cold
        if cold is not None and cold.over:  # it ended by itself (a wave that large)
            self._warm_up()
        elif cold is not None:
            if admitted:
                cold.sent(call, asyncio.get_running_loop().time())
            else:
                await cold.wait(call)
        loop = asyncio.get_running_loop()
        while (trip := self._blocking(request, call)) is not None:
            now = loop.time()
            # A probe is due (or the last one never reported). A virtual clock steps in
            # microseconds: a time that close counts as reached.
            if now >= trip.probe_at - _EPSILON:
                if not admitted:
                    return None  # the probe is the first call admitted (it holds a slot)
                trip.settle()
                trip.prober = call
                trip.settled = asyncio.Event()
                trip.probe_at = now + PROBE_AFTER
                continue
            if trip.prober is None and now < trip.hold_until - _EPSILON:
                await asyncio.sleep(min(trip.probe_at, trip.hold_until) - now)
                continue  # a probe is due, or the hold is over
            if trip.prober is None:
                error = CircuitOpen(trip.error.message, kind=trip.kind)
                error.__cause__ = trip.error.__cause__
                return error
            settled = trip.settled
            assert settled is not None
            if getattr(settled, "_loop", None) not in (None, loop):
                trip.settle()  # the probe ran on a loop that is gone: it will not report
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(trip.probe_at):
                    await settled.wait()  # the probe's outcome decides for this call too
        return None

    def failed(
        self, request: Request, error: BaseException, attempt: int, now: float, call: object
    ) -> None:
        """An attempt of ``call`` failed with ``error`` (``attempt`` counts from 1)."""
        fatal = fatal_scope(error, request)
        opened = self._open.get(_HANDLE)
        if fatal is None and isinstance(error, RateLimited) and opened and opened.kind == "refused":
            fatal = "refused", _HANDLE  # a probe (or a call out when it tripped) refused again
        if fatal is None:
            self._warm_up()  # an answer that does not trip it: the rest may go
            # A probe that failed some other way reached the server: that cause is gone.
            for scope, opened in list(self._open.items()):
                if opened.prober is not None and opened.prober is call:
                    opened.settle()
                    if opened.kind == "failing" and is_failing(error):  # still failing
                        opened.probe_at = now + PROBE_AFTER
                        self.trips += 1
                        continue
                    del self._open[scope]
                    self._streaks.pop(scope, None)
            self.active = bool(self._open or self._streaks)
            return
        kind, scope = fatal
        self._count(kind, scope, error, attempt, now, call)

    def refused(self, error: RateLimited, now: float) -> None:
        """A 429 came back to a call alone in flight before any call of the handle had
        succeeded, and it is not the handle's own load (the engine judges: decision
        0165): three of them trip it, as a limit of 0 for this key or model would."""
        self._count("refused", _HANDLE, error, CONNECT_ATTEMPTS, now, None)

    def _count(
        self,
        kind: str,
        scope: Scope,
        error: BaseException,
        attempt: int,
        now: float,
        call: object,
    ) -> None:
        """One more failure of ``kind`` in ``scope``, in a row: trip at the limit."""
        self.active = True
        count = self._streaks[scope] = self._streaks.get(scope, 0) + 1
        trip = self._open.get(scope)
        if trip is not None:
            if trip.prober is not None and trip.prober is call:  # failed the same way
                trip.probe_failed(now)
                self.trips += 1
            return
        if count < TRIP_AFTER or (kind == "unreachable" and attempt < CONNECT_ATTEMPTS):
            return
        stop = _stop(kind, scope, error, count)
        if kind == "refused":  # calls wait for probes a while before they are skipped
            trip = _Trip(kind, stop, now + REFUSED_PROBE, hold_until=now + REFUSED_HOLD)
            trip.every = 2 * REFUSED_PROBE
            log.warning(
                "fanflow: every request was refused with 429 since the start; the calls "
                "wait up to %g s for the server to answer a probe, then are skipped",
                REFUSED_HOLD,
            )
        else:
            trip = _Trip(kind, stop, now + PROBE_AFTER)
        self._open[scope] = trip
        self.trips += 1
        self._warm_up()  # the calls held back go on: to be skipped, or to wait for a probe

    def trip(self, cause: BaseException, now: float, *, count: int) -> None:
        """Open it from outside (kind ``"failing"``): a router saw ``count`` attempts in
        a row fail as :func:`is_failing` says (``cause``: the last). Calls not yet sent
        are skipped until a probe, due :data:`PROBE_AFTER` seconds later, answers."""
        scope: Scope = ("handle", None)
        if scope in self._open:
            return
        self.active = True
        self._open[scope] = _Trip(
            "failing", _stop("failing", scope, cause, count), now + PROBE_AFTER
        )
        self.trips += 1
        self._warm_up()

    def succeeded(self, request: Request) -> None:
        """An attempt at ``request`` succeeded: the key, the endpoint and its model work
        (a cold start's wave goes on growing: the server's capacity is not known yet)."""
        cold = self._cold
        if cold is not None:
            cold.succeeded()
        for scope in (("handle", None), ("model", request.model)):
            trip = self._open.pop(scope, None)
            if trip is not None:
                trip.settle()
            self._streaks.pop(scope, None)
        self.active = bool(self._open or self._streaks or self._cold)

    def __getstate__(self) -> dict[str, Any]:
        # A copy in another process starts closed (and cold, if this one was made so).
        return {"cold_start": self._cold_limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        Breaker.__init__(self, cold_start=state.get("cold_start"))


def _stop(kind: str, scope: Scope, cause: BaseException, count: int) -> CircuitOpen:
    model = scope[1] if scope[0] == "model" else None
    fix = _FIX[kind].format(model=repr(model))
    # The cause's own advice may say it is retryable: no longer true, so cut it.
    last = str(cause).split(f"; {RETRYABLE}")[0]
    error = CircuitOpen(
        f"not sent: {fix}. fanflow stopped sending after {count} attempts in a row failed "
        f"this way; fix it and run again (with a job, finished items are kept). "
        f"Last error: {type(cause).__name__}: {last}",
        kind=kind,
    )
    error.__cause__ = cause
    return error
