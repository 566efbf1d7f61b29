"""Events for progress displays, tracing and stores.

A hook is any callable taking one event. Each event is a frozen dataclass, so hooks can
keep them. Hooks run on the event loop thread, inline: keep them quick. A hook that
raises is logged and ignored; it never fails a call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeAlias, TypeVar

from ._types import CallRecord, Request

__all__ = [
    "AMBIENT_HOOKS",
    "INSTALLED",
    "AttemptFailed",
    "AttemptStarted",
    "CallEnded",
    "CallStarted",
    "Endpoint",
    "Event",
    "Hook",
    "Instrument",
    "endpoint_of",
    "observed",
    "observing",
]

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("fanflow")

#: Hooks added to every pattern started in this context (``progress=True`` puts its
#: tracker here; ``CallOptions.start`` reads it). Tasks inherit it.
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
    #: The model the call goes to (instrumentation reads its provider and endpoint; an
    #: :class:`Endpoint` in its place on events from a Ray worker).
    llm: object = field(default=None, repr=False, compare=False)


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


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a model handle's calls go, as instrumentation names it: small and
    picklable (a Ray worker sends it with its events in place of the handle)."""

    provider: str
    base_url: str | None = None


def endpoint_of(llm: object) -> Endpoint:
    """The handle's provider (its ``provider``, else ``fanflow.<kind>``) and base URL."""
    if isinstance(llm, Endpoint):
        return llm
    provider = getattr(llm, "provider", None)
    if not isinstance(provider, str) or llm is None:
        name = type(llm).__name__.lower() if llm is not None else "unknown"
        provider = "fanflow." + (name.removesuffix("llm") or name)
    base_url = getattr(llm, "base_url", None)
    return Endpoint(provider, base_url if isinstance(base_url, str) else None)


class Instrument(Protocol):
    """What :func:`fanflow.otel.instrument` installs: a hook for every pattern's calls,
    and a context manager around each pattern run (its span)."""

    def __call__(self, event: Event) -> None: ...

    def run(self, pattern: str, index: int | None) -> AbstractContextManager[object]: ...

    def batch(
        self, what: str, provider: str, batch_id: str | None
    ) -> AbstractContextManager[Callable[[str], None]]: ...


#: The installed instrumentation (at most one; empty, the default: nothing observes).
#: Process-wide, as the tracer and meter providers it reports to are; the engine's
#: ``CallOptions.start`` adds it to every pattern's hooks.
INSTALLED: list[Instrument] = []


def observed(
    pattern: str,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Run the decorated pattern under the installed instrumentation's span (if any)."""

    def wrap(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            if not INSTALLED:
                return await fn(*args, **kwargs)
            index = kwargs.get("index")
            with INSTALLED[0].run(pattern, index if isinstance(index, int) else None):
                return await fn(*args, **kwargs)

        return run

    return wrap


def _ignore(batch_id: str) -> None:
    pass


_UNOBSERVED = contextlib.nullcontext(_ignore)


def observing(
    what: str, provider: str, batch_id: str | None = None
) -> AbstractContextManager[Callable[[str], None]]:
    """Around one call to a provider's batch endpoints (``what``: the log's words for
    it): the installed instrumentation's span, which the caller tells the id of a batch
    it created. Without instrumentation, nothing."""
    if not INSTALLED:
        return _UNOBSERVED
    return INSTALLED[0].batch(what, provider, batch_id)


def emit(hooks: Sequence[Hook], event: Event) -> None:
    for hook in hooks:
        try:
            hook(event)
        except Exception:
            log.exception("fanflow hook %r raised; ignoring it", hook)
