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
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypedDict, TypeVar

from .._budget import Budget
from .._durable import Durability
from .._engine import CallOptions, Run
from .._events import Hook
from .._exceptions import ConfigError
from .._pricing import Price
from .._retry import RetryPolicy
from ..store import Sink, Store

__all__ = [
    "CALL_OPTION_NAMES",
    "OPTION_NAMES",
    "Options",
    "Resolved",
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


#: The options the engine reads (:class:`CallOptions`); the others are the store's.
CALL_OPTION_NAMES: frozenset[str] = frozenset(f.name for f in fields(CallOptions))


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """One pattern's options, checked, with defaults filled in (not public): the
    engine's :class:`CallOptions` and the store's options (store, cache, job, sink)."""

    pattern: str
    given: frozenset[str] = frozenset()
    call: CallOptions = field(default_factory=CallOptions)
    store: Store | None = None
    cache: bool = True
    job: str | None = None
    sink: Sink | str | os.PathLike[str] | None = None

    def run(self) -> Run:
        """The engine's run of these options, starting now (every call of the run
        shares its gate, deadline and budget cap)."""
        return self.call.start()

    def as_kwargs(self, **override: Any) -> dict[str, Any]:
        """Every option as keyword arguments, to hand to an inner pattern (``map``);
        ``override`` replaces some (a run's budget cap, shared with the inner one)."""
        kwargs = {
            name: getattr(self.call if name in CALL_OPTION_NAMES else self, name)
            for name in OPTION_NAMES
        }
        return {**kwargs, **override}

    def with_option(self, name: str, value: Any) -> Resolved:
        """These options with option ``name`` set to ``value`` (as if it was given)."""
        given = self.given | {name}
        if name not in CALL_OPTION_NAMES:
            return replace(self, given=given, **{name: value})
        if name == "hooks":
            value = tuple(value or ())
        return replace(self, given=given, call=replace(self.call, **{name: value}))

    def durability(self, *, only_failed: bool = False) -> Durability | None:
        """The run's store, job and sink (None when it has none of them)."""
        return Durability.of(
            store=self.store,
            job=self.job,
            only_failed=only_failed,
            cache=self.cache,
            sink=self.sink,
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
    call = {k: v for k, v in given.items() if k in CALL_OPTION_NAMES}
    if "hooks" in call:
        call["hooks"] = tuple(call["hooks"] or ())
    return Resolved(
        pattern=pattern,
        given=frozenset(k for k in given if k in OPTION_NAMES),
        call=CallOptions(**call),
        store=given.get("store"),
        cache=bool(given.get("cache", True)),
        job=given.get("job"),
        sink=given.get("sink"),
    )


T = TypeVar("T")


def option_attributes(*names: str, writable: bool = False) -> Callable[[type[T]], type[T]]:
    """Class decorator: the named options, given at construction and kept in
    ``self.options``, read back as attributes (``skill.timeout``, ``calls.budget``: the
    budget as given), as these classes had them before the options were gathered.
    ``writable``: setting one replaces it in ``self.options`` (``pool.hooks = ...``)."""

    def decorate(cls: type[T]) -> type[T]:
        for name in names:

            def get(self: Any, name: str = name) -> Any:
                options = self.options
                return getattr(options.call if name in CALL_OPTION_NAMES else options, name)

            def put(self: Any, value: Any, name: str = name) -> None:
                self.options = self.options.with_option(name, value)

            doc = f"The ``{name}`` option{'' if writable else ' (read-only)'}."
            setattr(cls, name, property(get, put if writable else None, doc=doc))
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
