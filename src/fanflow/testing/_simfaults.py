"""SimServer's faults: which request gets one (seeded draws or scripts by prompt) and
how each is acted out on the wire."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, TypeAlias

from aiohttp import web

from ._simhttp import _Gone, _reset, error_response
from ._simwire import Api, SimRequest, retry_headers

__all__ = ["FAULTS", "FaultKind", "FaultSpec", "Faults"]

FaultKind: TypeAlias = Literal[
    "500", "503", "529", "429", "quota", "hang", "reset", "malformed", "slow_stream"
]
#: Every fault SimServer can inject, in the order a seeded draw walks them.
FAULTS: tuple[str, ...] = (
    "500",
    "503",
    "529",
    "429",
    "quota",
    "hang",
    "reset",
    "malformed",
    "slow_stream",
)

FaultSpec: TypeAlias = (
    "Mapping[str, FaultKind | Sequence[FaultKind]] | Callable[[SimRequest], FaultKind | None]"
)


def check_kind(kind: str) -> None:
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(FAULTS)}")


class Faults:
    """The fault model: ``rates`` (``{kind: probability}``) drawn from a generator seeded
    with ``seed``, and ``fault_on`` scripts (see ``SimServer``). ``rng`` is also the
    server's jitter source, so one seed fixes both."""

    def __init__(self, rates: Mapping[str, float], fault_on: FaultSpec | None, seed: int) -> None:
        self._rates = _thresholds(rates)
        self._fault_on = fault_on
        self._seq_init: dict[str, list[FaultKind]] = {}
        self._rx: list[tuple[re.Pattern[str], FaultKind | None, str]] = []
        if isinstance(fault_on, Mapping):
            for pattern, kind in fault_on.items():
                if isinstance(kind, str):
                    check_kind(kind)
                    self._rx.append((re.compile(pattern), kind, pattern))
                else:
                    kinds = list(kind)
                    for k in kinds:
                        check_kind(k)
                    self._seq_init[pattern] = kinds
                    self._rx.append((re.compile(pattern), None, pattern))
        self._seed = seed
        self._hangs: set[asyncio.Future[None]] = set()
        self.reset()

    def reset(self) -> None:
        """Restart the seeded draws and the scripted sequences."""
        self.rng = random.Random(self._seed)
        self._seq = {k: list(v) for k, v in self._seq_init.items()}

    def draw(self, sim: SimRequest) -> FaultKind | None:
        """The fault ``sim`` gets, if any: a script's first, else a seeded draw."""
        scripted: FaultKind | None = None
        fault_on = self._fault_on
        if callable(fault_on):
            scripted = fault_on(sim)
            if scripted is not None:
                check_kind(scripted)
        elif self._rx:
            prompt = sim.prompt
            for rx, kind, pattern in self._rx:
                if rx.search(prompt):
                    if kind is not None:
                        scripted = kind
                        break
                    seq = self._seq[pattern]
                    if seq:
                        scripted = seq.pop(0)
                        break
        # Draw even when scripted, so scripting one prompt does not shift the others.
        draw = self.rng.random() if self._rates else 1.0
        if scripted is not None:
            return scripted
        for threshold, kind in self._rates:
            if draw < threshold:
                return kind
        return None

    async def act(
        self, api: Api, fault: FaultKind, request: web.BaseRequest, headers: list[tuple[str, str]]
    ) -> web.StreamResponse | None:
        """Act out a fault; None for faults that shape the reply later."""
        if fault in ("500", "503"):
            msg = "The server had an error while processing your request. Sorry about that!"
            return error_response(api, int(fault), msg, headers=headers)
        if fault == "529":
            return error_response(api, 529, "Overloaded", headers=headers)
        if fault == "429":
            msg = "Rate limit reached (injected). Please try again in 1s."
            return error_response(api, 429, msg, headers=headers + retry_headers(api, 1.0))
        if fault == "quota":
            msg = (
                "You exceeded your current quota, please check your plan and billing details."
                if api == "openai"
                else "You have reached your specified API usage limits."
            )
            return error_response(api, 429, msg, kind="insufficient_quota", headers=headers)
        if fault == "hang":
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._hangs.add(fut)
            try:
                await fut  # until the server closes or the client goes away
            finally:
                self._hangs.discard(fut)
            _reset(request)
            return _Gone(by_client=False)
        if fault == "reset":
            _reset(request)
            return _Gone(by_client=False)
        return None

    def release(self) -> None:
        """End every hang (the server is closing)."""
        for fut in list(self._hangs):
            if not fut.done():
                fut.set_result(None)


def _thresholds(rates: Mapping[str, float]) -> list[tuple[float, FaultKind]]:
    """The cumulative probabilities a draw is compared with, in :data:`FAULTS` order."""
    out: list[tuple[float, FaultKind]] = []
    total = 0.0
    for kind in FAULTS:  # a fixed order, so the draws are reproducible
        p = rates.get(kind, 0.0)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"fault probability for {kind!r} must be in [0, 1], got {p}")
        if p:
            total += p
            out.append((total, kind))  # type: ignore[arg-type]
    for kind in rates:
        check_kind(kind)
    if total > 1.0 + 1e-9:
        raise ValueError(f"fault probabilities add up to {total:g}, more than 1")
    return out
