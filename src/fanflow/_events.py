"""Events for progress displays, tracing and stores.

A hook is any callable taking one event. Each event is a frozen dataclass, so hooks can
keep them. Hooks run on the event loop thread, inline: keep them quick. A hook that
raises is logged and ignored; it never fails a call.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ._types import CallRecord, Request

__all__ = [
    "AMBIENT_HOOKS",
    "AttemptFailed",
    "AttemptStarted",
    "CallEnded",
    "CallStarted",
    "Event",
    "Hook",
]

log = logging.getLogger("fanflow")

#: Hooks added to every pattern started in this context (``progress=True`` puts its
#: tracker here; the engine's ``make_options`` reads it). Tasks inherit it.
AMBIENT_HOOKS: contextvars.ContextVar[tuple[Hook, ...]] = contextvars.ContextVar(
    "fanflow_ambient_hooks", default=()
)


@dataclass(frozen=True, slots=True)
class CallStarted:
    """A call was admitted to run (before its first attempt)."""

    time: float
    request: Request
    index: int | None
    label: str | None


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """An attempt is about to be sent (it holds a concurrency slot until it ends)."""

    time: float
    request: Request
    index: int | None
    label: str | None
    number: int
    hedge: bool


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """An attempt failed. ``wait`` is the pause before the next try (None: no retry)."""

    time: float
    request: Request
    index: int | None
    label: str | None
    number: int
    error: BaseException
    wait: float | None


@dataclass(frozen=True, slots=True)
class CallEnded:
    """A call reached its terminal status; ``record`` says how."""

    time: float
    record: CallRecord[Any]


Event: TypeAlias = CallStarted | AttemptStarted | AttemptFailed | CallEnded
Hook: TypeAlias = Callable[[Event], None]


def emit(hooks: Sequence[Hook], event: Event) -> None:
    for hook in hooks:
        try:
            hook(event)
        except Exception:
            log.exception("fanflow hook %r raised; ignoring it", hook)
