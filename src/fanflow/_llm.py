"""The LLM protocol and the base of fanflow's handles.

Anything with ``async def complete(self, request) -> Response`` is an :class:`LLM`.
``complete`` makes exactly one attempt; the engine adds admission, timeouts, retries and
hedging around it. Handles made by fanflow derive from :class:`BaseLLM`, which owns the
limits, retry policy and timeout that belong to one API key and model: every pattern
using the same handle shares the same lane.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, ClassVar, Protocol, runtime_checkable

from ._breaker import Breaker
from ._checks import check_seconds
from ._exceptions import ConfigError
from ._limits import DEFAULT_LIMITS, Lane, LaneStatistics, Limits
from ._retry import RetryPolicy
from ._types import Request, Response

__all__ = ["LLM", "BaseLLM"]

_REQUEST_PARAMS = frozenset(
    f.name for f in fields(Request) if f.name not in ("messages", "sample", "metadata")
)


@runtime_checkable
class LLM(Protocol):
    """Anything that can answer a :class:`Request` with one attempt.

    An LLM may also define ``cache_identity() -> dict`` (as :class:`BaseLLM` does): what
    its answers depend on besides the request, so that a result store serves an answer
    only to the same request at the same endpoint. Without it, the identity is the
    object's class, ``model`` and ``name`` attributes.
    """

    async def complete(self, request: Request) -> Response: ...


class BaseLLM(ABC):
    """Base of fanflow's LLM handles.

    ``batch_priced`` is True while a handle's calls go through a provider batch API (a
    budget reserves them at the batch price).

    Args:
        model: the model name filled into requests that name none.
        limits: the handle's limits, shared by every pattern using it (default:
            ``fanflow.limits.DEFAULT_LIMITS``, no limit until the server answers 429/529, then
            adaptive; ``Limits()`` for no limit at all). Each model its requests name has
            a lane of its own with these numbers; to give models different limits, a
            mapping of model name to ``Limits`` (``{"gpt-4o": Limits(rpm=500),
            "gpt-4o-mini": Limits(rpm=5000)}``; a ``"*"`` entry for models not named,
            else the default).
        retry: the handle's retry policy (a pattern's ``retry=`` overrides it).
        timeout: seconds per attempt (a pattern's ``timeout=`` overrides it).
        defaults: request parameters filled in when a request leaves them unset
            (``temperature``, ``max_tokens``, ``seed``, ``stop``, ``top_p``, ...).
    """

    # Whether the hedging policy is on when the retry policy leaves it to the handle
    # (``RetryPolicy(hedge=None)``): on for remote APIs, where a duplicate costs one
    # more request and cuts the tail; off for local models and Python functions, where
    # it would double the work on the same machine (decision 0133).
    hedges: ClassVar[bool] = False
    # True for a router or cascade (fanflow/_router.py, _cascade.py): the engine hands
    # the whole call to its ``route`` method, which runs it on its own handles.
    routed: ClassVar[bool] = False

    def __init__(
        self,
        *,
        model: str | None = None,
        limits: Limits | Mapping[str, Limits] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        check_seconds("timeout", timeout)
        unknown = set(defaults or {}) - _REQUEST_PARAMS
        if unknown:
            raise ConfigError(
                f"unknown request defaults {sorted(unknown)}; use any of {sorted(_REQUEST_PARAMS)}"
            )
        self.model = model
        #: Limits by model name (decision 0290); empty: every model has ``limits``.
        self.model_limits: dict[str, Limits] = _by_model(limits)
        #: The limits of the handle's own model.
        self.limits = limits if isinstance(limits, Limits) else DEFAULT_LIMITS
        if self.model_limits:
            self.limits = self.limits_of(model)
        self.retry = retry
        self.timeout = timeout
        self.defaults: dict[str, Any] = dict(defaults or {})
        if model is not None:
            self.defaults.setdefault("model", model)
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Lane] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[asyncio.AbstractEventLoop, Lane] | None = None
        # The lanes of models other than ``model`` that requests name (decision 0211).
        self._model_lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Lane]] = (
            weakref.WeakKeyDictionary()
        )
        self._model_last: dict[str, Lane] = {}
        # Who this handle's limits belong to, the same in every copy of it (pickled to
        # other processes too): the Ray backend's cluster-wide limiter is keyed by it.
        self.limit_id = uuid.uuid4().hex
        #: Stops sending when every further call must fail the same way (bad key,
        #: unknown model, quota, nothing listening); see :mod:`fanflow._breaker`.
        self.breaker = Breaker()

    def __getstate__(self) -> dict[str, Any]:
        # Lanes are live state of one event loop; a copy in another process starts fresh.
        state = self.__dict__.copy()
        state["_lanes"] = None
        state["_last"] = None
        state["_model_lanes"] = None
        state["_model_last"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lanes = weakref.WeakKeyDictionary()
        self._model_lanes = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"fanflow.{type(self).__name__}(model={self.model!r})"

    @property
    def round_trip_is_work(self) -> bool:
        """Whether an attempt's round trip is all work, so it stands for the model's time
        on a reply that does not say it (``Response.service_time``): true where nothing
        queues in front of the model; false where a pool's or a server's queue may (the
        speed-up is then unknown rather than overstated, decision 0170)."""
        return True

    @abstractmethod
    async def complete(self, request: Request) -> Response:
        """Make one attempt at ``request``. Raise a ``ProviderError`` on failure."""

    def cache_identity(self) -> dict[str, Any]:
        """What this handle's answers depend on besides the request itself.

        A result store serves a stored answer only when both the request
        (:attr:`Request.key`: messages, model, every sampling parameter, the sample
        salt) and this identity are the same (``fanflow._durable.cache_key``). The base
        identity is the handle's class, model and name; HTTP handles add the protocol
        and normalised base URL and their own answer-changing options (``n``,
        ``extra_body``); the local model its file. It never holds the API key or
        headers. Subclasses extend it (``{**super().cache_identity(), ...}``) with
        JSON-serialisable values; it must be the same in every process and every run.
        """
        cls = type(self)
        return {
            "protocol": f"{cls.__module__}.{cls.__qualname__}",
            "model": self.model,
            "name": getattr(self, "name", None),
        }

    @property
    def batch_priced(self) -> bool:
        """Whether the next call is priced at a batch API's rate (a budget reserves it so)."""
        return False

    def prepare(self, request: Request) -> Request:
        """Fill this handle's defaults into the fields the request leaves unset."""
        if not self.defaults:
            return request
        changes = {k: v for k, v in self.defaults.items() if getattr(request, k) is None}
        if not changes:
            return request
        if "stop" in changes and changes["stop"] is not None:
            changes["stop"] = tuple(changes["stop"])
        return request.with_options(**changes)

    def lane(self, model: str | None = None) -> Lane:
        """This handle's limiter on the running event loop; for a ``model`` other than
        the handle's own, that model's (the same limits, booked and steered apart)."""
        if model is not None and model != self.model:
            return self._model_lane(model)
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        lane = self._lanes.get(loop)
        if lane is None:
            lane = self._lanes[loop] = self._new_lane(None, self.limits)
            if last is not None and self._booked_here(self.limits):
                # A new loop (each fanflow.run has one): start from what the last lane
                # learnt of the server, not from scratch (decision 0159).
                lane.inherit(last[1])
        self._last = (loop, lane)
        return lane

    def limits_of(self, model: str | None) -> Limits:
        """The limits of ``model``'s calls (None: the handle's own model)."""
        if not self.model_limits:
            return self.limits
        if model is not None and model in self.model_limits:
            return self.model_limits[model]
        return self.model_limits.get("*", DEFAULT_LIMITS)

    @staticmethod
    def _booked_here(limits: Limits) -> bool:
        """Whether a lane of ``limits`` books in this process (not in a shared store or
        the Ray backend's broker, which hold what is learnt: nothing to inherit)."""
        return limits.shared is None and _lane_factory is None

    def _new_lane(self, model: str | None, limits: Limits) -> Lane:
        """A lane of ``limits`` for ``model`` (None: the handle's own), booked where the
        limits say: a shared store (on Ray too), the Ray broker, or this process."""
        if limits.shared is not None:
            from ._shared import shared_lane

            return shared_lane(self, model, limits)
        if _lane_factory is not None:
            return _lane_factory(self, model, limits)
        return Lane(limits)

    def _model_lane(self, model: str) -> Lane:
        """The lane of ``model``'s calls, with the model's limits: a lane of its own,
        here, in a shared store or at the Ray broker, under the model's identity."""
        loop = asyncio.get_running_loop()
        lanes = self._model_lanes.get(loop)
        if lanes is None:
            lanes = self._model_lanes[loop] = {}
        lane = lanes.get(model)
        if lane is None:
            limits = self.limits_of(model)
            lane = lanes[model] = self._new_lane(model, limits)
            last = self._model_last.get(model)
            if last is not None and self._booked_here(limits):
                lane.inherit(last)  # a new loop starts from what the last one learnt
            self._model_last[model] = lane
        return lane

    def statistics(self) -> LaneStatistics:
        """Admission statistics of this handle on the running event loop."""
        return self.lane().statistics()

    async def aclose(self) -> None:  # noqa: B027 - optional: most handles hold nothing
        """Release resources (connections, worker threads). Safe to call twice."""

    async def __aenter__(self) -> BaseLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# How this process makes a handle's lane (None: a plain local Lane). The Ray backend sets
# it in its worker processes, so every handle's lane there draws from the cluster-wide
# limiter; it is read only when a lane is made, never on the path of a call.
# Process-wide because handles arrive in a worker unpickled inside the user's own objects,
# where no argument could carry a factory (decision 0101). Owner: the process's
# FanflowWorker actor (backends/_worker.py), the only caller of the setter.
_lane_factory: Callable[[BaseLLM, str | None, Limits], Lane] | None = None


def set_lane_factory(factory: Callable[[BaseLLM, str | None, Limits], Lane] | None) -> None:
    """Make this process's new lanes with ``factory(handle, model, limits)`` (model None:
    the handle's own; None: plain local lanes)."""
    global _lane_factory
    _lane_factory = factory


class _PlainLanes:
    """The lanes of LLMs that are not BaseLLM handles on one event loop: an unlimited
    lane per model object, so one model's calls in flight never make another's 429s
    look like its own load (decision 0165).

    Keyed by identity (two equal objects are two models; unhashable ones work too). An
    object that can be weakly referenced takes its lane with it when it goes; one that
    cannot (``__slots__`` without ``__weakref__``) keeps it, and itself, for the life
    of the loop (each ``fanflow.run`` has its own).
    """

    __slots__ = ("lanes",)

    def __init__(self) -> None:
        self.lanes: dict[int, tuple[object, Lane]] = {}

    def get(self, llm: LLM) -> Lane:
        key = id(llm)
        entry = self.lanes.get(key)
        if entry is not None:
            ref, lane = entry
            if ref is llm or (isinstance(ref, weakref.ref) and ref() is llm):
                return lane
        lane = Lane(Limits())
        try:
            held: object = weakref.ref(llm, lambda _: self.lanes.pop(key, None))
        except TypeError:
            held = llm
        self.lanes[key] = (held, lane)
        return lane


# Each loop's plain lanes (see _PlainLanes), gone with the loop. Module-level because a
# plain model is the user's own object: fanflow has no place on it to keep a lane.
_plain: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _PlainLanes] = (
    weakref.WeakKeyDictionary()
)


def _by_model(limits: Limits | Mapping[str, Limits] | None) -> dict[str, Limits]:
    """``limits=`` as a mapping of model name to limits (empty: one Limits for all)."""
    if limits is None or isinstance(limits, Limits):
        return {}
    if not isinstance(limits, Mapping) or not limits:
        raise ConfigError(
            f"limits= must be a fanflow.Limits or a non-empty mapping of model name to "
            f"Limits, got {limits!r}"
        )
    for name, value in limits.items():
        if not isinstance(name, str) or not isinstance(value, Limits):
            raise ConfigError(
                f"limits= maps model names to fanflow.Limits; {name!r} maps to {value!r}"
            )
    return dict(limits)


def lane_of(llm: LLM) -> Lane:
    if isinstance(llm, BaseLLM):
        return llm.lane()
    loop = asyncio.get_running_loop()
    lanes = _plain.get(loop)
    if lanes is None:
        lanes = _plain[loop] = _PlainLanes()
    return lanes.get(llm)
