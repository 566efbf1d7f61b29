"""Small helpers shared across layers."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["given", "is_async_callable"]


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns a coroutine (async def, partials of one, or an
    object whose ``__call__`` is async)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that are not None, in order."""
    return {k: v for k, v in values.items() if v is not None}
