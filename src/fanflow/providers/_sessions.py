"""One ``aiohttp.ClientSession`` per event loop for a transport, and its closing.

A session is closed by :meth:`Sessions.aclose`, or with its loop: it is held by an async
generator (its *keeper*), which ``asyncio.run`` closes in ``shutdown_asyncgens``.

Every open keeper is also held by this module (``_OPEN``), not only by its transport. A
handle dropped without ``aclose()`` while its loop runs on therefore never leaves an open
session to the garbage collector, which would finalise it unclosed ("Unclosed connector")
at whatever moment it runs. Its sessions are marked dropped instead, and closed when the
next session opens on their loop, or with the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import weakref
from collections.abc import AsyncGenerator, Callable

import aiohttp

__all__ = ["Sessions"]

# Seconds aclose() waits for sessions on other event loops to close.
_CLOSE_ELSEWHERE = 5.0


@dataclasses.dataclass(slots=True, eq=False)
class _Open:
    loop: asyncio.AbstractEventLoop
    keeper: AsyncGenerator[None, None]
    dropped: bool = False


# Every open session's keeper, by id(session); an entry leaves when its keeper closes.
_OPEN: dict[int, _Open] = {}


def _drop(opened: list[int]) -> None:
    """Mark the sessions of a collected :class:`Sessions` dropped (any thread, any time)."""
    for key in opened:
        entry = _OPEN.get(key)
        if entry is not None:
            entry.dropped = True


async def _close_dropped(loop: asyncio.AbstractEventLoop) -> None:
    """Close the dropped sessions of ``loop``; forget those whose loop closed without them.

    Several calls may run this at once (a new handle's first calls): each entry is taken
    out of ``_OPEN`` before its close is awaited, so only one of them closes it."""
    for key, entry in list(_OPEN.items()):
        if entry.loop.is_closed():
            _OPEN.pop(key, None)
        elif entry.dropped and entry.loop is loop and _OPEN.pop(key, None) is entry:
            with contextlib.suppress(Exception):  # another handle's close: not this call's
                await entry.keeper.aclose()


class Sessions:
    """One ClientSession per event loop, each closed by ``aclose`` or with its loop."""

    __slots__ = ("__weakref__", "_by_loop", "_factory", "_last", "_opened")

    def __init__(self, factory: Callable[[], aiohttp.ClientSession]) -> None:
        self._factory = factory
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, AsyncGenerator[None, None]]
        ] = weakref.WeakKeyDictionary()
        self._last: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None
        self._opened: list[int] = []  # ids of this object's open sessions
        weakref.finalize(self, _drop, self._opened)

    def current(self) -> aiohttp.ClientSession | None:
        """The session of the running loop, if :meth:`get` made it and it is the last used."""
        last = self._last
        if last is not None and last[0] is asyncio.get_running_loop():
            return last[1]
        return None

    async def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        entry = self._by_loop.get(loop)
        if entry is None:
            session = self._factory()
            keeper = _keep(session, weakref.ref(self), loop)
            await anext(keeper)  # registers with the loop: shutdown_asyncgens closes it
            _OPEN[id(session)] = _Open(loop, keeper)
            self._opened.append(id(session))
            entry = self._by_loop[loop] = (session, keeper)
            self._last = (loop, session)
            # After the new session is in place (this may wait: the calls that start
            # meanwhile find it), not before.
            await _close_dropped(loop)
            return session
        self._last = (loop, entry[0])
        return entry[0]

    def _forget(self, loop: asyncio.AbstractEventLoop, session: aiohttp.ClientSession) -> None:
        self._by_loop.pop(loop, None)
        if self._last is not None and self._last[0] is loop:
            self._last = None
        if id(session) in self._opened:
            self._opened.remove(id(session))

    async def aclose(self) -> None:
        """Close this loop's session now; ask other running loops to close theirs."""
        loop = asyncio.get_running_loop()
        elsewhere: list[concurrent.futures.Future[None]] = []
        for other, (_, keeper) in list(self._by_loop.items()):
            if other is loop:
                await keeper.aclose()
            elif other.is_running() and not other.is_closed():
                elsewhere.append(asyncio.run_coroutine_threadsafe(keeper.aclose(), other))
        if elsewhere:
            # Wait for the other loops to close their sessions, for a bounded real time
            # (in a worker thread: their loops run on their own clocks, not ours); a
            # loop that stops first closes its own session at shutdown_asyncgens.
            await asyncio.to_thread(concurrent.futures.wait, elsewhere, _CLOSE_ELSEWHERE)
            for future in elsewhere:
                if future.done() and not future.cancelled():
                    future.exception()  # seen: a failed close leaves nothing to undo


async def _keep(
    session: aiohttp.ClientSession,
    owner: weakref.ref[Sessions],
    loop: asyncio.AbstractEventLoop,
) -> AsyncGenerator[None, None]:
    # The owner only by weak reference: _OPEN holds this generator, and must not hold
    # the handle alive through it.
    try:
        yield
    finally:
        sessions = owner()
        if sessions is not None:
            sessions._forget(loop, session)
        _OPEN.pop(id(session), None)
        await session.close()
