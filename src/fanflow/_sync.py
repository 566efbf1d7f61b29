"""Running fanflow from synchronous code, including where a loop is already running."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(awaitable: Awaitable[T] | Callable[[], Awaitable[T]], *, progress: bool = False) -> T:
    """Run an awaitable to completion from synchronous code and return its result.

    ``fanflow.run(fanflow.map(llm, "...", items))`` works in a script (a new event loop
    is made and closed) and inside Jupyter or any other running loop (the work runs on
    a fresh loop in a helper thread while this thread waits), without nest_asyncio.

    Args:
        awaitable: a coroutine, or a no-argument function returning one.
        progress: show every call it makes live, as the ``fanflow`` command does: rich's
            panel on a terminal or in Jupyter (when rich is installed), else a plain
            line on standard error every few seconds and at the end. Every pattern
            also takes ``progress=True``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(awaitable, progress))
    # A loop runs in this thread (Jupyter): we may not block it re-entrantly, so run the
    # work on a fresh loop in another thread. Handles keep one lane per loop, so limits
    # stay correct; this thread waits, which is what a sync call promises.
    box: dict[str, Any] = {}
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            box["value"] = ctx.run(asyncio.run, _as_coroutine(awaitable, progress))
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="fanflow-run", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


async def _as_coroutine(
    awaitable: Awaitable[T] | Callable[[], Awaitable[T]], progress: bool = False
) -> T:
    if callable(awaitable) and not isinstance(awaitable, Awaitable):
        awaitable = awaitable()
    if not progress:
        return await awaitable
    from ._progress import show_progress

    async with show_progress():
        return await awaitable
