"""Consoles and the choice of progress display (live, plain, none)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from .._exceptions import ConfigError
from .._progress import LiveDisplay, PlainDisplay, QuietDisplay, Tracker

__all__ = ["make_console", "make_display", "require_rich"]


def require_rich() -> None:
    """Fail with the install command when rich (the ``cli`` extra) is missing."""
    try:
        import rich  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the fanflow command line needs rich: pip install 'fanflow[cli]'"
        ) from None


def make_console(stream: TextIO | None = None) -> Any:
    """A rich console on standard error (progress and summaries never mix with results)."""
    from rich.console import Console

    return Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)


def make_display(
    mode: str, console: Any, tracker: Tracker, *, interval: float, redirect_stdout: bool
) -> tuple[LiveDisplay | PlainDisplay | QuietDisplay, Callable[[str], None]]:
    """The display for ``mode`` (auto, live, plain, none) and a function to print notes.

    ``auto`` is live on a terminal (unless ``TERM=dumb``), plain otherwise.
    """
    if mode == "auto":
        terminal = console.is_terminal and os.environ.get("TERM") != "dumb"
        mode = "live" if terminal else "plain"
    if mode == "live":
        display = LiveDisplay(console, tracker, redirect_stdout=redirect_stdout)
        return display, lambda text: console.print(text, markup=False, highlight=False)
    stream = console.file

    def note(text: str) -> None:
        stream.write(text + "\n")
        stream.flush()

    if mode == "plain":
        return PlainDisplay(stream, tracker, interval=interval), note
    return QuietDisplay(), note
