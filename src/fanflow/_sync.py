"""Running fanflow from synchronous code: scripts, and notebooks whose loop is running.

The rule (``fanflow.run`` and the sync ``.run()`` methods of Skill, Chain, Flow, Pool
and ParallelCalls):

- no event loop runs in this thread (a script, a REPL): the work runs on a new loop
  here (``asyncio.run``); Ctrl-C cancels it, as ``asyncio.run`` does;
- the running loop of this thread is a notebook's (Jupyter, IPython: an IPython shell
  is active in the process): the cell is synchronous code that may block, so the work
  runs on a fresh loop in a helper thread while this one waits. An interrupt (Jupyter's
  stop button, Ctrl-C) cancels the helper's work (its calls in flight are cancelled and
  no new one is sent) and re-raises ``KeyboardInterrupt`` once it has stopped;
- any other running loop in this thread (async code: a web handler, a coroutine)
  raises :class:`fanflow.ConfigError`: blocking there would freeze every other task of
  that loop until the work is done. Await the work instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from ._exceptions import ConfigError

__all__ = ["blocking", "in_notebook", "run"]

T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")

# Seconds an interrupted run waits for its helper thread's work to stop (cancellation
# is prompt; this bounds a call stuck in native code).
STOP_TIMEOUT = 10.0


def in_notebook() -> bool:
    """Whether an IPython shell (a Jupyter kernel, IPython) is active in this process.

    Only looks: IPython is never imported here.
    """
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return callable(get) and get() is not None


def run(awaitable: Awaitable[T] | Callable[[], Awaitable[T]], *, progress: bool = False) -> T:
    """Run an awaitable to completion from synchronous code and return its result.

    ``fanflow.run(fanflow.map(llm, "...", items))`` works in a script (a new event loop
    is made and closed) and in a Jupyter or IPython cell, whose loop is already running
    (the work runs on a fresh loop in a helper thread while the cell waits; interrupting
    the cell cancels the work). In async code, await the work instead.

    Args:
        awaitable: a coroutine, or a no-argument function returning one.
        progress: show every call it makes live, as the ``fanflow`` command does: rich's
            panel on a terminal or in Jupyter (when rich is installed), else a plain
            line on standard error every few seconds and at the end. Every pattern
            also takes ``progress=True``.

    Raises:
        ConfigError: called on the thread of a running event loop that is not a
            notebook's (from async code), where it would block that loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(awaitable, progress))
    if not in_notebook():
        if inspect.iscoroutine(awaitable):
            awaitable.close()  # never run: no "coroutine was never awaited" warning
        raise ConfigError(
            "fanflow.run() (or a .run() method) was called from async code: an event loop "
            "is running in this thread, and waiting here would block every other task of "
            "that loop until the work is done. Await the work instead: "
            "'result = await fanflow.map(...)', 'await pool.arun()', 'await skill.arun()'"
        )
    value: T = _Helper(awaitable, progress).run()
    return value


class _Helper:
    """The work of a notebook cell, on a fresh loop in a helper thread.

    Handles keep one lane per loop, so limits stay correct; the cell's thread waits,
    which is what a sync call promises.
    """

    def __init__(
        self, awaitable: Awaitable[Any] | Callable[[], Awaitable[Any]], progress: bool = False
    ) -> None:
        self.awaitable = awaitable
        self.progress = progress
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None
        self.stopped = False
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    async def _main(self) -> Any:
        with self.lock:
            if self.stopped:  # interrupted before the work began
                if inspect.iscoroutine(self.awaitable):
                    self.awaitable.close()
                raise asyncio.CancelledError
            self.loop = asyncio.get_running_loop()
            self.task = asyncio.current_task()
        return await _as_coroutine(self.awaitable, self.progress)

    def _target(self, ctx: contextvars.Context) -> None:
        try:
            self.value = ctx.run(asyncio.run, self._main())
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def stop(self) -> None:
        """Cancel the work (from the waiting thread)."""
        with self.lock:
            self.stopped = True
            loop, task = self.loop, self.task
        if loop is not None and task is not None and not loop.is_closed():
            # The loop may have closed just now (RuntimeError): then the work is over.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)

    def run(self) -> Any:
        thread = threading.Thread(
            target=self._target,
            args=(contextvars.copy_context(),),
            name="fanflow-run",
            daemon=True,
        )
        thread.start()
        # Wait on an event, not on thread.join(): an interrupted join() marks the thread
        # as stopped while it still runs (CPython 3.11), so it could not be joined again.
        try:
            self.done.wait()
        except BaseException:
            # Interrupted (KeyboardInterrupt from Jupyter's stop button or Ctrl-C):
            # cancel the work, wait until it has stopped, and pass the interrupt on.
            self.stop()
            if self.done.wait(STOP_TIMEOUT):
                thread.join()
            raise
        thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def blocking(method: Callable[Concatenate[S, P], Awaitable[T]]) -> Callable[Concatenate[S, P], T]:
    """The synchronous twin of an async method (``run = blocking(arun)``), by :func:`run`."""

    name = method.__name__

    @functools.wraps(method)
    def sync(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        bound: Callable[P, Awaitable[T]] = getattr(self, name)  # a subclass's own, if any
        return run(lambda: bound(*args, **kwargs))

    sync.__name__ = "run"
    sync.__qualname__ = method.__qualname__.rpartition(".")[0] + ".run"
    sync.__doc__ = (
        f"Synchronous :meth:`{name}` for scripts and notebooks (see :func:`fanflow.run`)."
    )
    return sync


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
