"""Ctrl-C for the command line: delivered by the event loop, never in mid-statement.

SIGINT goes through ``loop.add_signal_handler``, so the main task is cancelled between
two callbacks, where every asyncio primitive is consistent (``asyncio.run``'s handler
can cancel it between any two bytecodes: docs/decisions/0096). A second Ctrl-C stops at
once (KeyboardInterrupt). Once the loop is done, a Ctrl-C is only counted: closing the
output, records and store files is never cut short, and the command still exits 130.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

__all__ = ["Interrupts"]

T = TypeVar("T")


class Interrupts:
    """Counts Ctrl-Cs of one command and turns the first into a clean cancellation."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None
        self._installed = False

    def run(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``asyncio.run(factory())`` with Ctrl-C cancelling the main task between callbacks.

        Raises:
            KeyboardInterrupt: interrupted before the command's coroutine could handle it
                (it let the cancellation out), or a second Ctrl-C.
        """
        try:
            return asyncio.run(self._main(factory))
        except asyncio.CancelledError:
            if self.count:
                raise KeyboardInterrupt from None
            raise

    async def _main(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigint() -> None:
            self.count += 1
            if self.count > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            task.cancel()

        handled = _in_main_thread()
        if handled:
            try:
                loop.add_signal_handler(signal.SIGINT, on_sigint)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
                handled = False  # no loop signal handling here (Windows): asyncio.run's
        try:
            return await factory()
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)
                self._defer()

    def _defer(self) -> None:
        """From now on a Ctrl-C is only counted (the command is closing its files)."""
        if not self._installed:
            self._previous = signal.signal(signal.SIGINT, self._count)
            self._installed = True

    def _count(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.count += 1

    def restore(self) -> None:
        """Give SIGINT back to Python's default handler (end of the command)."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
