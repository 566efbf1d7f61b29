"""The call options every pattern accepts: one vocabulary, documented once.

Every public pattern (``map``, ``as_completed``, ``call``, ``gather``, ``race``,
``fan_out``, ``vote``, ``best_of_n``, ``guarded``, ``evaluate``, ``sections``,
``estimate``, ``ParallelCalls``, ``Skill``, ``Chain``, ``Flow``, ``Pool``) takes these
options as keyword arguments, with the same names and meanings, typed by
:class:`Options` (``**options: Unpack[Options]``, as pydantic-ai types its
``ModelSettings``). A pattern reads them through :func:`resolve`, which rejects unknown
names with the closest valid one, turns old spellings into new ones with a
``DeprecationWarning``, and checks the values before any call is made. See
docs/decisions/0110-one-options-vocabulary.md.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, TypeVar

from .._budget import Budget, as_budget
from .._durable import Durability
from .._engine import CallOptions, make_options
from .._events import Hook
from .._exceptions import ConfigError
from .._pricing import Price
from .._retry import RetryPolicy
from ..store import Sink, Store

__all__ = [
    "OPTION_NAMES",
    "Options",
    "Resolved",
    "Shared",
    "fill",
    "option_attributes",
    "resolve",
]


class Options(TypedDict, total=False):
    """The call options of every pattern (all optional, all keyword arguments).

    Attributes:
        concurrency: the most calls of this pattern in flight at once (the model
            handle's own limit still applies); None: the handle's limit alone.
            ``ParallelCalls`` documents it as ``max_workers`` and ``Pool`` as
            ``max_flows`` (the names those patterns are known by); both spellings work.
        timeout: seconds per attempt (None: the handle's; the handle's None: no limit).
        deadline: seconds from the start of the pattern by which every call must end;
            a call not done by then ends ``timed_out`` (None: no deadline).
        retry: the :class:`fanflow.RetryPolicy` (None: the handle's, else the default).
        hedge_after: start a duplicate attempt of a call still running after this many
            seconds; the first to answer wins (None: no hedging).
        hooks: callables that receive each :mod:`event <fanflow.events>` of every call.
        budget: the most the pattern's calls may spend together: dollars (a number, a
            new cap for each run) or a :class:`fanflow.Budget` (``Budget(tokens=...)``;
            share one to cap several patterns or a whole job). Each attempt reserves
            its expected cost first; calls the budget cannot cover end ``skipped`` with
            ``BudgetExceeded``.
        prices: model prices beyond the built-in table, ``{model: fanflow.Price}``.
        store: a :class:`fanflow.Store` for every call: a call stored before is served
            from it (``cached=True``, costing nothing), a new one is committed before it
            counts.
        cache: serve any call found in the store (False: ask the model again, except
            for the job's own succeeded items). Default True.
        job: a name under which the store records each item's terminal status (needs
            ``store``); running the same job again resumes it.
        sink: stream each finished call's record to a file: a path (``.jsonl``,
            ``.parquet``) or a sink (:class:`fanflow.JsonlSink`,
            :class:`fanflow.ParquetSink`).
    """

    concurrency: int | None
    timeout: float | None
    deadline: float | None
    retry: RetryPolicy | None
    hedge_after: float | None
    hooks: Sequence[Hook]
    budget: float | Budget | None
    prices: Mapping[str, Price] | None
    store: Store | None
    cache: bool
    job: str | None
    sink: Sink | str | os.PathLike[str] | None


OPTION_NAMES: tuple[str, ...] = tuple(Options.__annotations__)


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """One pattern's options, checked, with defaults filled in (not public)."""

    pattern: str
    given: frozenset[str] = frozenset()
    concurrency: int | None = None
    timeout: float | None = None
    deadline: float | None = None
    retry: RetryPolicy | None = None
    hedge_after: float | None = None
    hooks: tuple[Hook, ...] = ()
    budget: Budget | None = None
    # The budget as given: a number becomes a new cap at each ``start()``.
    budget_spec: float | Budget | None = field(default=None, repr=False)
    prices: Mapping[str, Price] | None = None
    store: Store | None = None
    cache: bool = True
    job: str | None = None
    sink: Sink | str | os.PathLike[str] | None = None

    def start(self) -> Resolved:
        """These options for one run: a budget given as a number is a new cap."""
        if self.budget_spec is None or isinstance(self.budget_spec, Budget):
            return self  # nothing to renew (the common case: no copy)
        return replace(self, budget=as_budget(self.budget_spec))

    def calls(self, **override: Any) -> CallOptions:
        """The engine options of one run: a new concurrency gate, and the deadline
        counted from now. Every call of the run should share them."""
        values: dict[str, Any] = {
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "deadline": self.deadline,
            "retry": self.retry,
            "hedge_after": self.hedge_after,
            "hooks": self.hooks,
            "budget": self.budget,
            "prices": self.prices,
        }
        values.update(override)
        return make_options(**values)

    def as_kwargs(self) -> dict[str, Any]:
        """Every option as keyword arguments, to hand to an inner pattern (``map``)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    def durability(self, *, only_failed: bool = False) -> Durability | None:
        """The run's store, job and sink (None when it has none of them)."""
        return Durability.of(
            store=self.store,
            job=self.job,
            only_failed=only_failed,
            cache=self.cache,
            sink=self.sink,
        )


@dataclass(frozen=True)
class Shared:
    """An enclosing pattern's options as its inner calls share them (one gate, one
    deadline): what ``gather`` and ``race`` hand to each :func:`call`."""

    options: Resolved
    engine: CallOptions

    @classmethod
    def of(cls, options: Resolved) -> Shared:
        started = options.start()
        return cls(started, started.calls())

    def fill(self, own: CallOptions, given: frozenset[str]) -> CallOptions:
        """``own`` (a call's options) with what the call did not set taken from here."""
        outer = self.engine
        if not given:
            return outer  # the call set nothing of its own (the common case: no copy)
        return fill(
            own,
            given,
            outer,
            budget=own.budget if "budget" in given else outer.budget,
            # A budget prices its calls (make_options), so the call's prices go with it.
            prices=own.prices if {"prices", "budget"} & given else outer.prices,
            hooks=tuple(dict.fromkeys((*outer.hooks, *own.hooks))),
        )


def fill(
    own: CallOptions, given: frozenset[str], outer: CallOptions | None, **also: Any
) -> CallOptions:
    """``own`` with the timing options it was not given (``given``: the option names it
    was) taken from an enclosing run's ``outer``: its timeout, retry, hedging, deadline
    (the sooner of the two applies) and concurrency gate. Budget, prices and hooks
    travel separately (an enclosing pool's budget overrides a skill's own); ``also``
    sets further fields in the same copy."""
    if outer is None:
        return replace(own, **also) if also else own
    deadline = own.deadline if "deadline" in given else None
    if outer.deadline is not None:
        deadline = outer.deadline if deadline is None else min(deadline, outer.deadline)
    return replace(
        own,
        timeout=own.timeout if "timeout" in given else outer.timeout,
        deadline=deadline,
        retry=own.retry if "retry" in given else outer.retry,
        hedge_after=own.hedge_after if "hedge_after" in given else outer.hedge_after,
        gate=own.gate if "concurrency" in given else outer.gate,
        **also,
    )


def resolve(
    pattern: str,
    options: Mapping[str, Any],
    *,
    renamed: Mapping[str, str] | None = None,
    allowed: Sequence[str] = (),
    stacklevel: int = 3,
) -> Resolved:
    """Check a pattern's call options and fill in the defaults.

    Args:
        pattern: the pattern's name, for messages (``"vote"``).
        options: the keyword arguments it was given beyond its own parameters.
        renamed: old spellings this pattern still accepts, ``{old: new}``; each use
            warns with a ``DeprecationWarning`` naming the new one.
        allowed: further names the pattern reads itself (so they are not rejected).
        stacklevel: where the warning points (3: the pattern's caller).

    Raises:
        TypeError: an unknown option (with the closest valid name), as Python does.
        ConfigError: a value out of range, with the fix.
    """
    if not options:
        return _defaults(pattern)
    given = dict(options)
    for old, new in (renamed or {}).items():
        if old not in given:
            continue
        warnings.warn(
            f"{pattern}({old}=...) is deprecated and will be removed in the next release; "
            f"use {new}=... (same meaning)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        if new in given:
            raise ConfigError(f"{pattern}: pass {new}= only, not both {old}= and {new}=")
        given[new] = given.pop(old)
    for name in given:
        if name not in OPTION_NAMES and name not in allowed:
            # The pattern's own parameters are suggestions too (``max_flow``).
            code = sys._getframe(1).f_code
            params = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            raise TypeError(_unknown(pattern, name, (*allowed, *params)))
    _check(given)
    budget = given.get("budget")
    return Resolved(
        pattern=pattern,
        given=frozenset(k for k in given if k in OPTION_NAMES),
        concurrency=given.get("concurrency"),
        timeout=given.get("timeout"),
        deadline=given.get("deadline"),
        retry=given.get("retry"),
        hedge_after=given.get("hedge_after"),
        hooks=tuple(given.get("hooks") or ()),
        budget=as_budget(budget),
        budget_spec=budget,
        prices=given.get("prices"),
        store=given.get("store"),
        cache=bool(given.get("cache", True)),
        job=given.get("job"),
        sink=given.get("sink"),
    )


T = TypeVar("T")


def option_attributes(*names: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: the named options, given at construction and kept in
    ``self.options``, read back as attributes (``skill.timeout``, ``calls.budget``: the
    budget as given), as these classes had them before the options were gathered."""

    def decorate(cls: type[T]) -> type[T]:
        for name in names:
            field_name = "budget_spec" if name == "budget" else name

            def get(self: Any, field_name: str = field_name) -> Any:
                return getattr(self.options, field_name)

            setattr(cls, name, property(get, doc=f"The ``{name}`` option (read-only)."))
        return cls

    return decorate


@functools.cache
def _defaults(pattern: str) -> Resolved:
    """A pattern's options when it is given none (immutable, so shared)."""
    return Resolved(pattern=pattern)


def _unknown(pattern: str, name: str, allowed: Sequence[str]) -> str:
    names = (*OPTION_NAMES, *allowed)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"{pattern}() got an unexpected keyword argument {name!r}{hint} "
        f"(the call options are: {', '.join(OPTION_NAMES)})"
    )


def _check(given: Mapping[str, Any]) -> None:
    concurrency = given.get("concurrency")
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ConfigError(f"concurrency must be >= 1, got {concurrency!r}; use None for no limit")
    for name in ("timeout", "deadline", "hedge_after"):
        value = given.get(name)
        if value is not None and (not isinstance(value, int | float) or value <= 0):
            raise ConfigError(f"{name} must be > 0 seconds, got {value!r}; use None for none")
