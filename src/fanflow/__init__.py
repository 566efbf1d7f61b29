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

This module only re-exports; implementation lives in private modules.
"""

from __future__ import annotations

from ._budget import Budget
from ._exceptions import (
    AllFailed,
    AuthenticationError,
    BadRequest,
    BatchError,
    BatchIncomplete,
    BudgetExceeded,
    CallTimeout,
    CircuitOpen,
    ConfigError,
    ContentFiltered,
    FanflowError,
    NotFound,
    Overloaded,
    ParseError,
    PermissionDenied,
    ProtocolError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    QuorumNotMet,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    ServerError,
    Skipped,
    StepInputError,
    StoreError,
    TemplateError,
    is_retryable,
)
from ._limits import DEFAULT_CONCURRENCY, DEFAULT_LIMITS, Adaptive, Limits, Pacing
from ._llm import LLM, BaseLLM
from ._pricing import Price
from ._retry import RetryPolicy
from ._sync import run
from ._types import (
    Attempt,
    BatchResult,
    CallRecord,
    Message,
    RateLimitState,
    Request,
    Response,
    Status,
    Summary,
    Usage,
)
from ._version import __version__  # the one source: hatch reads it for the package too
from .backends import BatchBackend, BatchOptions, RayBackend
from .patterns import (
    BestOfNResult,
    Call,
    Chain,
    EstimateResult,
    EvaluateResult,
    FanOutResult,
    Flow,
    FlowResult,
    GuardedResult,
    ItemStatus,
    Options,
    ParallelCalls,
    ParallelCallsResult,
    Pool,
    PoolResult,
    PoolStatus,
    ResultStream,
    Score,
    SectionsResult,
    Skill,
    SkillResult,
    Step,
    StepRecord,
    VoteResult,
    Worker,
    _renamed,
    as_completed,
    best_of_n,
    call,
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

__getattr__ = _renamed(__name__)  # the old result names, deprecated for one release


__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_LIMITS",
    "LLM",
    "Adaptive",
    "AllFailed",
    "Attempt",
    "AuthenticationError",
    "BadRequest",
    "BaseLLM",
    "BatchBackend",
    "BatchError",
    "BatchIncomplete",
    "BatchOptions",
    "BatchResult",
    "BestOfNResult",
    "Budget",
    "BudgetExceeded",
    "Call",
    "CallRecord",
    "CallTimeout",
    "Chain",
    "CircuitOpen",
    "ConfigError",
    "ContentFiltered",
    "EstimateResult",
    "EvaluateResult",
    "FanOutResult",
    "FanflowError",
    "Flow",
    "FlowResult",
    "GuardedResult",
    "ItemStatus",
    "JsonlSink",
    "Limits",
    "Message",
    "NotFound",
    "Options",
    "Overloaded",
    "Pacing",
    "ParallelCalls",
    "ParallelCallsResult",
    "ParquetSink",
    "ParseError",
    "PermissionDenied",
    "Pool",
    "PoolResult",
    "PoolStatus",
    "Price",
    "ProtocolError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderTimeout",
    "QuorumNotMet",
    "QuotaExceeded",
    "RateLimitState",
    "RateLimited",
    "RayBackend",
    "Request",
    "RequestTooLarge",
    "Response",
    "ResultStream",
    "RetryPolicy",
    "Score",
    "SectionsResult",
    "ServerError",
    "Skill",
    "SkillResult",
    "Skipped",
    "Status",
    "Step",
    "StepInputError",
    "StepRecord",
    "Store",
    "StoreError",
    "Summary",
    "TemplateError",
    "Usage",
    "VoteResult",
    "Worker",
    "__version__",
    "anthropic",
    "as_completed",
    "best_of_n",
    "call",
    "estimate",
    "evaluate",
    "fan_out",
    "function",
    "gather",
    "guarded",
    "is_retryable",
    "local",
    "map",
    "openai",
    "race",
    "read_requests",
    "run",
    "sections",
    "split_text",
    "vote",
]
