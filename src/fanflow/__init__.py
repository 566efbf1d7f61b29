"""fanflow: run many LLM calls at once, within limits, without losing work.

Layers (imports only point down; docs/architecture.md draws them, and
tests/test_layers.py fails on an upward import or an import loop):

    interfaces  fanflow.* (this module), the CLI               (fanflow.cli)
    patterns    map, as_completed, call, gather, race,       (fanflow.patterns)
                fan_out, vote, best_of_n, guarded, evaluate, sections,
                ParallelCalls, Skill, Step, Chain, Flow, Pool
    backends    where a batch runs: local, Ray, provider batch APIs; the Backend protocol
                (fanflow.backends)
    durability  store-backed calls, a batch's job and sink     (_durable)
    store       store protocols, Store (SQLite), sinks         (fanflow.store)
    providers   function(), openai(), anthropic(), local()     (fanflow.providers)
    testing     ScriptedLLM, SimServer                         (fanflow.testing)
    engine      admission, attempts, retries, hedging, budgets (_engine, _limits, _llm)
    core        types, errors, events, backoff, rates, run()   (_types, _exceptions, ...)

Providers, store and testing sit side by side and never import each other.

This module only re-exports; implementation lives in private modules. The names users
reach for are here; the rest of the public surface is in submodules: every error in
``fanflow.errors``, every result type in ``fanflow.results``, the limit controllers in
``fanflow.limits``, the backends in ``fanflow.backends``, events in ``fanflow.events``.
"""

from __future__ import annotations

from typing import Any as _Any

from . import backends, errors, events, limits, results  # noqa: F401 (public submodules)
from ._budget import Budget
from ._exceptions import AllFailed, BudgetExceeded, ConfigError, FanflowError, QuorumNotMet
from ._limits import Limits
from ._llm import LLM, BaseLLM
from ._pricing import Price
from ._retry import RetryPolicy
from ._router import router
from ._sync import run
from ._types import CallRecord, MapResult, Message, Request, Response, Status, Usage
from ._version import __version__  # the one source: hatch reads it for the package too
from .patterns import (
    Chain,
    Flow,
    Options,
    ParallelCalls,
    Pool,
    Skill,
    Step,
    as_completed,
    best_of_n,
    call,
    cascade,
    estimate,
    evaluate,
    fan_out,
    gather,
    guarded,
    map,
    race,
    read_requests,
    sections,
    split_text,
    vote,
)
from .providers import anthropic, function, local, openai
from .store import JsonlSink, ParquetSink, Store

# The submodule of each name kept off the top level (decision 0205), for the error below.
_MOVED = {
    **dict.fromkeys(errors.__all__, "errors"),
    **dict.fromkeys(results.__all__, "results"),
    **dict.fromkeys(limits.__all__, "limits"),
    **dict.fromkeys(backends.__all__, "backends"),
}


def __getattr__(name: str) -> _Any:
    if name == "BatchResult":  # renamed: served with a warning for one release
        return results._renamed(name)
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module 'fanflow' has no attribute {name!r}")
    raise AttributeError(
        f"fanflow.{name} is not a top-level name: use fanflow.{where}.{name} "
        f"(from fanflow.{where} import {name})"
    )


__all__ = [
    "LLM",
    "AllFailed",
    "BaseLLM",
    "Budget",
    "BudgetExceeded",
    "CallRecord",
    "Chain",
    "ConfigError",
    "FanflowError",
    "Flow",
    "JsonlSink",
    "Limits",
    "MapResult",
    "Message",
    "Options",
    "ParallelCalls",
    "ParquetSink",
    "Pool",
    "Price",
    "QuorumNotMet",
    "Request",
    "Response",
    "RetryPolicy",
    "Skill",
    "Status",
    "Step",
    "Store",
    "Usage",
    "__version__",
    "anthropic",
    "as_completed",
    "best_of_n",
    "call",
    "cascade",
    "estimate",
    "evaluate",
    "fan_out",
    "function",
    "gather",
    "guarded",
    "local",
    "map",
    "openai",
    "race",
    "read_requests",
    "router",
    "run",
    "sections",
    "split_text",
    "vote",
]
