"""A new handle's first wave: small while a refusal could still come back (decision 0175).

A refusal (a wrong key's 401, a 429 from a concurrency cap or an empty bucket) comes
back about one round trip after the request; an answer only after the whole
generation. So a cold handle sends its first :data:`COLD_CALLS` calls at once and then
doubles the wave every *step*: three times the time its first connection took to open
(at least :data:`COLD_STEP`), i.e. longer than a refusal of the calls already sent
takes to return (on a loop busy starting the map, or on a loaded machine, refusals are
slow to be read too). A doubling goes in :data:`COLD_SPLIT` parts, a part of a step
apart (counted from the last call sent), so a refusal stops the wave a part of a
doubling past the server's capacity, not a whole doubling (decision 0313).

- Answers that may trip the breaker (401, 403, 404, a spent quota, nothing listening)
  stop the doubling until it trips (the held calls are then skipped) or a call
  succeeds.
- A 429, or any other answer that is neither a success nor one of those, ends it: the
  adaptive limit has been lowered by then (:mod:`fanflow._limits`) and governs.
- A success does not end it: the key is right, but the server's capacity is still
  unknown, so the wave goes on doubling until a 429 or until it is :data:`_ENOUGH`.
  A success makes the doublings a late timer owes (on a loaded machine the timers run
  late), and no more.

With a right key a large server has the whole wave in flight after ``log2(C / 16)``
steps; a wrong key or a small server meets the first wave and a step's worth more (what
that costs when refusals are slow: decision 0175).

After :data:`COLD_WAIT` (the answers are just slow, or the machine too loaded for its
steps) it ends once no call is held back; until then the wave grows a part at each tick
of the shortest step (:data:`COLD_STEP` / :data:`COLD_SPLIT`), not all at once. While
only answers that may trip come back it waits at most :data:`COLD_EXTENSIONS` more
such periods.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable

__all__ = ["COLD_CALLS", "COLD_SPLIT", "COLD_STEP", "ColdStart"]

#: A new HTTP handle sends this many calls first.
COLD_CALLS = 16
#: The shortest time between two doublings of the first wave, in seconds.
COLD_STEP = 0.01
#: A step is this many times the first connection's opening time (its round trips),
#: when that is longer than COLD_STEP.
COLD_FACTOR = 3.0
#: A doubling of the wave goes in this many parts, a part of a step apart.
COLD_SPLIT = 4
#: With no connection opened in this long, the cold start ends; with calls held back,
#: the wave grows at the shortest step from then on.
COLD_WAIT = 1.0
#: How many times COLD_WAIT is extended while only such answers come back.
COLD_EXTENSIONS = 3
# Timers may fire a hair early, and a virtual clock steps in microseconds.
_EPSILON = 1e-6
#: A wave this large is no wave: the cold start ends (its timer stops).
_ENOUGH = 1 << 16


class ColdStart:
    """The first wave of one handle (held by its :class:`fanflow.Breaker`).

    Args:
        first: the calls sent before the first step.
        held: whether answers that may trip the breaker came back (then the wave stops
            growing).
    """

    __slots__ = (
        "_connecting",
        "_due",
        "_extended",
        "_first",
        "_fresh",
        "_grown",
        "_held",
        "_late",
        "_let",
        "_loop",
        "_sent",
        "_started",
        "_step",
        "_timer",
        "_waiters",
        "_window",
        "over",
    )

    def __init__(self, first: int, held: Callable[[], bool]) -> None:
        self._first = first
        self._window = first
        self._grown = 0  # parts of doublings made: the wave is first * 2 ** (grown / SPLIT)
        self._held = held
        self._let: set[int] = set()  # ids of the calls let through (their retries too)
        self._fresh: set[int] = set()  # those of them not sent yet
        self._connecting = 0  # those sent and waiting for a connection
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = 0.0
        self._sent = 0.0  # when the last call let through was sent
        self._due = 0.0  # when the timer was set to fire
        self._step: float | None = None  # seconds between doublings, once measured
        self._timer: asyncio.TimerHandle | None = None
        self._extended = 0
        self._late = False  # the last tick was put off because the loop ran late
        self.over = False

    async def wait(self, call: object) -> None:
        """Return when ``call`` may be sent (at once if the wave has room)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._restart(loop)
        ident = id(call)
        if ident in self._let:
            return
        if not self._waiters and len(self._let) < self._window:
            self._let.add(ident)
            self._fresh.add(ident)
            return
        fut = loop.create_future()
        entry = (fut, ident)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            raise

    def sent(self, call: object, now: float) -> None:
        """``call``, let through, is being sent now: if the wave let it through since it
        last grew (not a retry, nor a new call that took a finished one's id), the next
        part counts from here."""
        if id(call) in self._fresh:
            self._fresh.discard(id(call))
            self._sent = now
            self._connecting += 1

    def connected(self, seconds: float) -> bool:
        """A call's connection was handed out after ``seconds``: its request goes out
        now, so the next step counts from here; the first one starts the steps. False
        once the cold start is over."""
        loop = self._loop
        if self.over or loop is None:
            return False
        if self._connecting:  # (one of those calls' connection; not a retry's)
            self._connecting -= 1
            self._sent = max(self._sent, loop.time())
        if self._step is None:
            self._step = max(COLD_STEP, COLD_FACTOR * seconds)
            self._arm(self._started + self._part())
        return True

    def succeeded(self) -> None:
        """A call succeeded: the doublings a late timer owes are made now (a loaded
        machine's timers must not hold the wave back longer than an answer takes), and
        no more (an answer says nothing of the refusals still on their way: decision
        0300)."""
        loop = self._loop
        if self.over or loop is None:
            return
        # The parts overdue since the last call went out (a late timer's): never ahead
        # of a timer that is on time.
        now = loop.time()
        if now >= self._started + COLD_WAIT:
            return  # the timer's ticks of the shortest step make the wave
        parts = int((now - self._sent) / self._part())
        if parts >= _ENOUGH.bit_length() * COLD_SPLIT:
            self.end()
        elif parts > 0 and self._grow(parts, now):
            self._arm(now + self._part())

    def end(self) -> None:
        """The first answers are in: every call may go."""
        self.over = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, deque()
        for fut, _ in waiters:
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_result(None)

    def _restart(self, loop: asyncio.AbstractEventLoop) -> None:
        """The first call on ``loop`` (a handle's first, or its first since the loop it
        was cold on ended: that loop's calls and timers are gone with it)."""
        if self._timer is not None:
            self._timer.cancel()
        self._loop = loop
        self._let.clear()
        self._fresh.clear()
        self._connecting = 0
        self._waiters.clear()
        self._started = self._sent = loop.time()
        self._extended = 0
        self._timer = None
        self._arm(self._started + (self._part() if self._step is not None else COLD_WAIT))

    def _arm(self, when: float) -> None:
        loop = self._loop
        assert loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._due = when
        self._timer = loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if self._held():  # refusals that may trip it came back: wait for the trip
            self._extended += 1
            if self._extended > COLD_EXTENSIONS:
                self.end()
            else:
                self._arm(now + COLD_WAIT)
            return
        step = self._step
        hurry = now >= self._started + COLD_WAIT
        if step is None or (hurry and not self._waiters):
            self.end()  # no connection opened in COLD_WAIT, or no call held back
            return
        if hurry:
            # Held long enough (the answers are slow, or the machine too loaded for its
            # steps): the wave grows a part at each tick of the shortest step, whatever
            # went out and with no catch-up, so a refusal still stops it a part or two
            # past the server's capacity (releasing every call would meet it with all).
            if self._grow(1, now):
                self._arm(now + COLD_STEP / COLD_SPLIT)
            return
        part = self._part()
        late = now - self._due > step  # refusals may be queued behind what delayed it
        if late and not self._late:
            # (late once in a row at most: a loaded machine is late at every tick)
            self._late = True
            self._arm(now + part)
            return
        # A call it let through went out less than a part ago: wait a part from then.
        if self._sent + part > now + _EPSILON:
            self._late = False
            self._arm(self._sent + part)
            return
        self._late = False
        if self._grow(1, now):
            self._arm(now + part)

    def _part(self) -> float:
        """The time between two parts of a doubling."""
        return (self._step or COLD_STEP) / COLD_SPLIT

    def _grow(self, parts: int, now: float) -> bool:
        """Let the wave grow by ``parts`` parts of a doubling now; False if that ended
        the cold start."""
        self._grown += parts
        window = math.ceil(self._first * 2 ** (self._grown / COLD_SPLIT))
        self._window = window
        if window >= _ENOUGH:
            self.end()
            return False
        self._sent = now  # the calls let through go now: the next step counts from here
        while self._waiters and len(self._let) < window:
            fut, ident = self._waiters.popleft()
            if not fut.done():
                self._let.add(ident)
                self._fresh.add(ident)
                fut.set_result(None)
        return True
