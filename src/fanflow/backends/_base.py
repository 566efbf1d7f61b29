"""The backend seam: what a place that runs a map's or a pool's items must do.

``map``, ``as_completed`` and ``Pool`` describe a run (a :class:`MapSpec` or a
:class:`PoolSpec`) and hand it to the :class:`Backend` that ``backend=`` names
(:func:`fanflow.backends._config.resolve_backend`): ``_local.py`` runs the items on this
event loop, ``_ray.py`` on Ray workers; another backend implements the same two methods.
Why the seam is shaped so: docs/decisions/0100-backend-protocol.md.

A backend must (the local backend is the reference):

- **Run every item to exactly one record**: ``spec.build(item, index)`` (an exception
  is that item's failed record), call the model, ``spec.parse`` the response, and hand
  the :class:`~fanflow.CallRecord` (``index`` set) to ``deliver``, awaiting what it
  returns before taking more work (back-pressure). Records may come in any order.
- **Stream in bounded memory**: pull from ``spec.items`` (maybe endless) only as there
  is room; ``MapRun.workers`` is how many records may be in flight, ``seen`` how many
  items were pulled.
- **Honour the store**: with ``spec.durable``, run each item through it
  (:meth:`fanflow._durable.Durability.run`, or its store by the
  :class:`~fanflow.store.JobStore` protocol in another process), call
  ``durable.emit(record, item)`` before delivering, run the map inside
  ``durable.around(...)``, and serve from the store what ``durable.prior`` succeeded.
  A pool run as a job names in ``spec.learn`` the handles whose lanes start from what
  the job's store kept of their server and keep there what they learnt
  (:class:`fanflow._durable.Learning`, on the lanes that make the calls).
- **Honour the options and limits**: ``spec.options.start()`` makes the run (one gate,
  one deadline, one budget cap for the whole map, wherever its calls run); every call
  goes through the handle's lane, so ``Limits`` hold across the map.
- **Emit events** to ``spec.options.hooks`` on the caller's event loop.
- **Fail fast** with ``spec.fail_fast``: the first record that did not succeed stops the
  map (in-flight items cancelled) and its error is raised.
- **Cancel cleanly**: a cancelled ``run()`` stops sending, cancels what is in flight and
  returns once it has stopped.

A backend that cannot run pools raises :class:`fanflow.ConfigError` from
:meth:`Backend.run_pool` saying which backend to use.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

from .._budget import Budget
from .._durable import Durability
from .._engine import CallOptions, Run
from .._events import Hook
from .._llm import LLM
from .._pricing import Price
from .._types import CallRecord, Request, Response
from ..store import JobStore

__all__ = [
    "Backend",
    "Deliver",
    "Enclosing",
    "FirstCheck",
    "HandleFor",
    "Items",
    "MapRun",
    "MapSpec",
    "PoolDeliver",
    "PoolMoved",
    "PoolSpec",
]

Items: TypeAlias = Iterable[Any] | AsyncIterable[Any]

# Where a backend hands each finished record; await what it returns (back-pressure).
Deliver: TypeAlias = Callable[[CallRecord[Any]], Awaitable[None] | None]
#: What a pool's model step calls, given its own handle.
HandleFor: TypeAlias = Callable[[LLM], LLM]
# ``await deliver(index, result)``: a pool's input has ended with its FlowResult.
PoolDeliver: TypeAlias = Callable[[int, Any], Awaitable[None]]
# ``on_step(index, step, started)``: a pool's input entered or left a step.
PoolMoved: TypeAlias = Callable[[int, str, bool], None]


@dataclass(frozen=True)
class Enclosing:
    """What an enclosing pool, chain or flow gives the steps of a runner
    (``runner.execute(..., enclosing=)``): each field set overrides the step's own.

    ``store``, ``cache``, ``budget``, ``prices``: those its calls use. ``shared``: the
    enclosing run, whose timing options (one deadline, one gate) apply to every skill
    that sets none. ``handle_for``: the handle a model step calls in place of its own (a
    Pool with ``mode="batch"``: the batching handle).
    """

    store: JobStore | None = None
    cache: bool | None = None
    budget: Budget | None = None
    prices: Mapping[str, Price] | None = None
    shared: Run | None = None
    handle_for: HandleFor | None = None


#: The steps' own of everything.
OWN = Enclosing()


@dataclass(frozen=True)
class FirstCheck:
    """A check of a map's first ``count`` items before any call is made.

    ``check(items)`` raises (a ``TemplateError``, say) when the items show that every
    call would fail the same way; the local and Ray backends run it on the first items
    before any call. As ``MapSpec.prime`` it returns whether to prime the map.
    """

    count: int
    check: Callable[[list[Any]], Any]


@dataclass(frozen=True, eq=False)
class MapSpec:
    """One ``map`` / ``as_completed`` call, as a backend receives it.

    Attributes:
        llm: the model handle (its lane and limits apply to every call).
        build: builds the request of one item: ``build(item, index)``. It pickles (to
            run in another process); it raises for a bad item (that item fails).
        items: the inputs, a sequence or a (async) iterator, pulled lazily.
        parse: turns a response into the record's value (it may raise: the item fails).
        options: the call options (``concurrency``: the most items in flight;
            ``deadline``: seconds from the start by which every item must end;
            ``budget``: one cap for every call of the map; ``hooks`` receive each
            event, on the caller's event loop).
        label: a label for every record.
        fail_fast: the first failure stops the map and is raised.
        durable: the map's store, job and sink (None: nothing is kept).
        check_first: a check of the first items, run before any call (None: none).
        prime: whether to prime the map, decided from its first ``prime.count`` items
            before any call: the first item is sent alone and the others wait until it
            is done, so that they read the prefix it put in the provider's prompt
            cache (None: never; the local and Ray backends honour it).
    """

    llm: LLM
    build: Callable[[Any, int], Request]
    items: Items
    parse: Callable[[Response], Any]
    options: CallOptions = field(default_factory=CallOptions)
    label: str | None = None
    fail_fast: bool = False
    durable: Durability | None = None
    check_first: FirstCheck | None = None
    prime: FirstCheck | None = None

    @property
    def size(self) -> int | None:
        """How many items there are, when ``items`` is a sequence (else None)."""
        return len(self.items) if isinstance(self.items, Sequence) else None

    def __getattr__(self, name: str) -> Any:
        # Called only for a name that is not a field: the fields the options replaced
        # are read from them, with a warning, for one release.
        if name in _IN_OPTIONS:
            warnings.warn(
                f"MapSpec.{name} is deprecated and will be removed in the next release; "
                f"read spec.options.{name} (fanflow.backends.CallOptions)",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


# MapSpec's fields before the call options were gathered in ``MapSpec.options``.
_IN_OPTIONS = frozenset(
    ("concurrency", "timeout", "deadline", "retry", "hedge_after", "hooks", "budget", "prices")
)


@dataclass(frozen=True, eq=False)
class PoolSpec:
    """One run of a ``Pool``, as a backend receives it.

    Attributes:
        runner: what runs one input: ``await runner.execute(item, index=, hooks=,
            on_step=, enclosing=)`` returns its ``FlowResult``
            (a ``Chain``, a ``Flow``, or a wrapped function; it pickles).
        todo: the inputs to run, as (index, input) pairs.
        max_flows: the most inputs in progress at once (across the whole backend).
        hooks: receive every call's events, on the caller's event loop.
        store: the store every call goes through (None: none).
        cache: serve calls found in the store.
        replay: whether input ``index`` succeeded in an earlier run of the job (its
            calls are then served from the store whatever ``cache`` says).
        budget: one spending cap for the whole run.
        prices: model prices beyond the built-in table.
        handle_for: the handle a model step calls in place of its own (a Pool with
            ``mode="batch"``: the batching handle); None: its own.
        shared: the run every skill without options of its own runs within (its
            timeout, retry, hedge_after, one deadline for the whole run). Ray sends
            its options to its workers (the deadline as wall-clock time);
            ``max_flows`` bounds the calls in flight there, as it is split between
            the workers.
        learn: the handles whose lanes start from what the job's store kept of their
            server, and keep there what they learnt (a Pool run as a job: its skills'
            handles; :class:`fanflow._durable.Learning`, decisions 0282, 0305, 0311).
            The backend does it where the calls run: the local backend around its run,
            Ray's driver for its workers.
    """

    runner: Any
    todo: Sequence[tuple[int, Any]]
    max_flows: int
    hooks: tuple[Hook, ...] = ()
    store: JobStore | None = None
    cache: bool = True
    replay: Callable[[int], bool] = lambda index: False
    budget: Budget | None = None
    prices: Mapping[str, Price] | None = None
    shared: Run | None = None
    handle_for: HandleFor | None = None
    learn: Sequence[LLM] = ()

    def enclosing(self, index: int) -> Enclosing:
        """What input ``index``'s steps run within (a replayed input is served from the
        store whatever ``cache`` says)."""
        return Enclosing(
            store=self.store,
            cache=self.cache or self.replay(index),
            budget=self.budget,
            prices=self.prices,
            shared=self.shared,
            handle_for=self.handle_for,
        )


@runtime_checkable
class MapRun(Protocol):
    """A map's run on a backend, made by :meth:`Backend.map_run`, run once."""

    # How many records may be in flight at once (a result stream sizes its queue by it).
    workers: int

    @property
    def seen(self) -> int:
        """How many items were pulled from ``spec.items`` (after :meth:`run`)."""
        ...

    async def run(self) -> None:
        """Run every item, delivering each record; raise with ``fail_fast``."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Where a map's or a pool's items run (see the module docstring for what it must do)."""

    def map_run(self, spec: MapSpec, deliver: Deliver) -> MapRun:
        """The run of a ``map`` / ``as_completed`` call (not started yet)."""
        ...

    async def run_pool(self, spec: PoolSpec, deliver: PoolDeliver, on_step: PoolMoved) -> None:
        """Run a pool's inputs; ``await deliver(index, result)`` as each ends and call
        ``on_step(index, step, started)`` as inputs enter and leave steps."""
        ...
