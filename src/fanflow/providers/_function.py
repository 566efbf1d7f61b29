"""Any Python callable as an LLM."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .._exceptions import ProviderError
from .._limits import Limits
from .._llm import BaseLLM
from .._retry import RetryPolicy
from .._types import Request, Response
from .._util import is_async_callable

__all__ = ["FunctionLLM", "function"]

Fn = Callable[[Request], "str | Response | Awaitable[str | Response]"]


class FunctionLLM(BaseLLM):
    """An LLM backed by a Python callable that takes a :class:`fanflow.Request`.

    Async callables are awaited on the event loop; sync ones run in a worker thread
    (``asyncio.to_thread``), so a blocking call never stalls other calls.
    """

    def __init__(
        self,
        fn: Fn,
        *,
        name: str | None = None,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model=None, limits=limits, retry=retry, timeout=timeout, defaults=defaults)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self._async = is_async_callable(fn)

    def __repr__(self) -> str:
        return f"fanflow.function({self.name})"

    async def complete(self, request: Request) -> Response:
        if self._async:
            result: Any = await self.fn(request)  # type: ignore[misc]
        else:
            result = await asyncio.to_thread(self.fn, request)
            if inspect.isawaitable(result):
                result = await result
        if isinstance(result, str):
            return Response(result, model=self.name)
        if isinstance(result, Response):
            return result
        raise ProviderError(
            f"function {self.name} returned {type(result).__name__}; "
            "return a str or a fanflow.Response"
        )


def function(
    fn: Fn,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> FunctionLLM:
    """Wrap any async or sync callable ``fn(request) -> str | Response`` as an LLM.

    Args:
        fn: called with each :class:`fanflow.Request` (``request.prompt`` is its text).
            Raise a :class:`fanflow.ProviderError` subclass (``RateLimited``,
            ``ServerError``, ...) to have the engine retry; other exceptions fail the call.
        name: a name for records and messages (default: the function's name).
        limits: the handle's limits (concurrency).
        retry: the handle's retry policy.
        timeout: seconds per attempt.
        defaults: request parameters filled in when unset.
    """
    return FunctionLLM(
        fn, name=name, limits=limits, retry=retry, timeout=timeout, defaults=defaults
    )
