"""ScriptedLLM: a deterministic in-process fake model for tests (ours and users').

Modelled on pydantic-ai's ``TestModel``/``FunctionModel``: replies are a function of
the request, latency is fixed or drawn from a seeded generator, and failures are
scripted by call index, by prompt, or with a seeded probability. All waiting is
``asyncio.sleep``, so it runs in virtual time.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from .._exceptions import (
    FanflowError,
    Overloaded,
    ProviderTimeout,
    RateLimited,
    ServerError,
)
from .._limits import Limits
from .._llm import BaseLLM
from .._retry import RetryPolicy
from .._types import Request, Response, Usage

__all__ = ["Fault", "ScriptedLLM"]


@dataclass(frozen=True)
class Fault:
    """A scripted failure.

    Use the constructors: ``Fault.rate_limited(retry_after=2.0)``, ``Fault.server_error()``,
    ``Fault.overloaded()``, ``Fault.timeout()``, ``Fault.hang()``, or
    ``Fault.error(SomeError(...))``. ``after`` is a delay (seconds) before it strikes.
    """

    kind: str
    retry_after: float | None = None
    error: BaseException | None = None
    after: float = 0.0

    @classmethod
    def rate_limited(cls, retry_after: float | None = None, *, after: float = 0.0) -> Fault:
        return cls("rate_limited", retry_after=retry_after, after=after)

    @classmethod
    def server_error(cls, *, after: float = 0.0) -> Fault:
        return cls("server_error", after=after)

    @classmethod
    def overloaded(cls, *, after: float = 0.0) -> Fault:
        return cls("overloaded", after=after)

    @classmethod
    def timeout(cls, *, after: float = 0.0) -> Fault:
        return cls("timeout", after=after)

    @classmethod
    def hang(cls) -> Fault:
        """Never answer (until cancelled)."""
        return cls("hang")

    @classmethod
    def raises(cls, error: BaseException, *, after: float = 0.0) -> Fault:
        return cls("error", error=error, after=after)

    def make_error(self) -> BaseException:
        if self.kind == "rate_limited":
            return RateLimited(
                "scripted 429: rate limited", status_code=429, retry_after=self.retry_after
            )
        if self.kind == "server_error":
            return ServerError("scripted 500: server error", status_code=500)
        if self.kind == "overloaded":
            return Overloaded("scripted 529: overloaded", status_code=529)
        if self.kind == "timeout":
            return ProviderTimeout("scripted timeout")
        if self.kind == "error" and self.error is not None:
            return self.error
        raise FanflowError(f"fault {self.kind!r} raises no error")


FaultLike: TypeAlias = Fault | BaseException
Reply: TypeAlias = "str | Callable[[Request], str | Response]"
Latency: TypeAlias = "float | tuple[float, float] | Callable[[random.Random, Request], float]"


def _echo(request: Request) -> str:
    return f"echo: {request.prompt}"


def _words(text: str) -> int:
    return len(text.split())


def _as_fault(f: FaultLike) -> Fault:
    return f if isinstance(f, Fault) else Fault.raises(f)


class ScriptedLLM(BaseLLM):
    """A fake model for tests.

    Args:
        reply: the reply text, or a function of the request returning text or a
            :class:`fanflow.Response` (default: ``"echo: <prompt>"``).
        latency: seconds per call: a number, a ``(low, high)`` range drawn uniformly, or
            ``fn(rng, request) -> seconds``. Drawn from a generator seeded with ``seed``.
        seed: seed for latency and random failures.
        failures: faults by call index (0-based, every attempt counts): ``{0: Fault...}``.
        fail_on: faults by prompt: ``{regex: Fault}``, matched with ``re.search``.
        failure_rate: probability that a call fails with ``failure`` (seeded).
        failure: the fault drawn by ``failure_rate`` (default: a server error).
        limits, retry, timeout, defaults: as for every handle.

    Attributes:
        calls: number of calls seen (attempts included).
        requests: every request seen, in arrival order.
        in_flight: calls running now.
        max_in_flight: the most calls that ran at once.
        started_at: the event-loop time each call started.
    """

    def __init__(
        self,
        reply: Reply = _echo,
        *,
        latency: Latency = 0.0,
        seed: int = 0,
        failures: Mapping[int, FaultLike] | None = None,
        fail_on: Mapping[str, FaultLike] | None = None,
        failure_rate: float = 0.0,
        failure: FaultLike | None = None,
        model: str = "scripted",
        limits: Limits | Mapping[str, Limits] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model=model, limits=limits, retry=retry, timeout=timeout, defaults=defaults
        )
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate}")
        self.reply = reply
        self.latency = latency
        self.seed = seed
        self._rng = random.Random(seed)
        self.failures = {i: _as_fault(f) for i, f in (failures or {}).items()}
        self.fail_on = [(re.compile(p), _as_fault(f)) for p, f in (fail_on or {}).items()]
        self.failure_rate = failure_rate
        self.failure = _as_fault(failure) if failure is not None else Fault.server_error()
        self.calls = 0
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.started_at: list[float] = []

    def __repr__(self) -> str:
        return f"fanflow.testing.ScriptedLLM(calls={self.calls})"

    def reset(self) -> None:
        """Forget the calls seen (counts, requests, times), keep the script."""
        self.calls = 0
        self.requests.clear()
        self.in_flight = 0
        self.max_in_flight = 0
        self.started_at.clear()

    def _latency(self, request: Request) -> float:
        lat = self.latency
        if isinstance(lat, int | float):
            return float(lat)
        if isinstance(lat, tuple):
            return self._rng.uniform(lat[0], lat[1])
        return float(lat(self._rng, request))

    def _fault(self, index: int, request: Request) -> Fault | None:
        if index in self.failures:
            return self.failures[index]
        text = "\n".join(m.content for m in request.messages)
        for pattern, fault in self.fail_on:
            if pattern.search(text):
                return fault
        # Draw even when the rate is 0 so the stream of latencies does not depend on it.
        if self.failure_rate and self._rng.random() < self.failure_rate:
            return self.failure
        return None

    async def complete(self, request: Request) -> Response:
        index = self.calls
        self.calls += 1
        self.requests.append(request)
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.started_at.append(start)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self._fault(index, request)
            latency = self._latency(request)
            if fault is not None:
                if fault.kind == "hang":
                    await asyncio.Event().wait()
                if fault.after:
                    await asyncio.sleep(fault.after)
                raise fault.make_error()
            if latency > 0:
                await asyncio.sleep(latency)
            reply = self.reply if isinstance(self.reply, str) else self.reply(request)
            if isinstance(reply, Response):
                return reply
            usage = Usage(
                sum(_words(m.content) for m in request.messages), _words(reply), estimated=True
            )
            return Response(
                reply,
                usage=usage,
                model=request.model or self.model,
                finish_reason="stop",
                latency=loop.time() - start,
            )
        finally:
            self.in_flight -= 1
