"""Any Python callable as an LLM."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
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

    def cache_identity(self) -> dict[str, Any]:
        """The protocol, the function's qualified name and the handle's name."""
        fn = self.fn
        where = (
            f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        )
        return {"protocol": "function", "function": where, "name": self.name}

    async def complete(self, request: Request) -> Response:
        service: float | None = None  # async: the round trip is the function's time
        if self._async:
            result: Any = await self.fn(request)  # type: ignore[misc]
        else:
            # Timed in the thread: the wait for one of asyncio's threads is not work.
            result, took = await asyncio.to_thread(self._timed, request)
            if inspect.isawaitable(result):
                loop = asyncio.get_running_loop()
                began = loop.time()
                result = await result
                took += loop.time() - began
            service = took
        if isinstance(result, str):
            return Response(result, model=self.name, service_time=service)
        if isinstance(result, Response):
            if result.service_time is None and service is not None:
                return dataclasses.replace(result, service_time=service)
            return result
        raise ProviderError(
            f"function {self.name} returned {type(result).__name__}; "
            "return a str or a fanflow.Response"
        )

    def _timed(self, request: Request) -> tuple[Any, float]:
        began = time.perf_counter()
        result = self.fn(request)
        return result, time.perf_counter() - began


def _adapt(model: Any) -> tuple[Fn, str] | None:
    """A request function for another library's model object, or None for a plain
    callable: ``agenerate(prompt, temperature=...)`` objects and LangChain-style chat
    models (``ainvoke(messages)`` returning a message with ``.content``)."""
    kind = type(model).__name__
    agenerate = getattr(model, "agenerate", None)
    if callable(agenerate):

        async def generate(request: Request) -> str | Response:
            kwargs = {} if request.temperature is None else {"temperature": request.temperature}
            return _text_of(await agenerate(_prompt_text(request), **kwargs), kind)

        return generate, kind
    ainvoke = getattr(model, "ainvoke", None)
    if callable(ainvoke):

        async def invoke(request: Request) -> str | Response:
            target = model
            if request.temperature is not None and callable(getattr(model, "bind", None)):
                target = model.bind(temperature=request.temperature)
            messages = [(m.role, m.content) for m in request.messages]
            return _text_of(await target.ainvoke(messages), kind)

        return invoke, kind
    return None


def _prompt_text(request: Request) -> str:
    """The whole conversation as one prompt (the system prompt first)."""
    return "\n\n".join(m.content for m in request.messages)


def _text_of(reply: Any, kind: str) -> str | Response:
    if isinstance(reply, str | Response):
        return reply
    content = getattr(reply, "content", None)  # LangChain's AIMessage
    if isinstance(content, str):
        return content
    text = getattr(reply, "text", None)
    if isinstance(text, str):
        return text
    raise ProviderError(
        f"{kind} returned {type(reply).__name__}, with no text: expected a str, or an "
        "object with .content or .text"
    )


def function(
    fn: Fn | Any,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> FunctionLLM:
    """Wrap any async or sync callable ``fn(request) -> str | Response`` as an LLM.

    It also wraps another library's model object, once, so that every pattern given
    the handle shares its limits: an object with ``agenerate(prompt, temperature=...)``
    (sent the prompt text and the request's temperature) or a LangChain-style chat
    model (``ainvoke(messages)``; the temperature is bound with ``.bind`` when set).

    Args:
        fn: called with each :class:`fanflow.Request` (``request.prompt`` is its text),
            or a model object as above.
            Raise a :class:`fanflow.errors.ProviderError` subclass (``RateLimited``,
            ``ServerError``, ...) to have the engine retry; other exceptions fail the call.
        name: a name for records and messages (default: the function's name).
        limits: the handle's limits (concurrency).
        retry: the handle's retry policy.
        timeout: seconds per attempt.
        defaults: request parameters filled in when unset.
    """
    adapted = _adapt(fn)
    if adapted is not None:
        fn, kind = adapted
        name = name or kind
    return FunctionLLM(
        fn, name=name, limits=limits, retry=retry, timeout=timeout, defaults=defaults
    )
