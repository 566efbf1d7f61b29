"""fanflow: run many LLM calls at once, within limits, without losing work.

Layers (imports only point down; see DESIGN.md):

    interfaces  fanflow.* (this module), the CLI
    patterns    map, as_completed, call, gather, race,       (fanflow.patterns)
                fan_out, vote, best_of_n, guarded, evaluate, sections,
                ParallelCalls, Skill, Step, Chain, Flow, Pool
    engine      admission, attempts, retries, hedging, events (_engine, _limits, _retry)
    providers   function(), openai(), anthropic()              (fanflow.providers)
    store       Store (SQLite cache + jobs), JSONL/Parquet sinks (fanflow.store)
    testing     ScriptedLLM, SimServer                         (fanflow.testing)

This module only re-exports; implementation lives in private modules.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from ._budget import Budget
from ._exceptions import (
    AllFailed,
    AuthenticationError,
    BadRequest,
    BatchError,
    BudgetExceeded,
    CallTimeout,
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
from ._limits import DEFAULT_CONCURRENCY, DEFAULT_LIMITS, Adaptive, Limits
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
from .backends import RayBackend
from .patterns import (
    BestOfNResult,
    Call,
    Chain,
    Estimate,
    Evaluation,
    FanOutResult,
    Flow,
    GuardedResult,
    ItemStatus,
    ParallelCalls,
    ParallelCallsResult,
    Pool,
    PoolResult,
    PoolStatus,
    ResultStream,
    RunResult,
    Score,
    SectionsResult,
    Skill,
    SkillResult,
    Step,
    StepRecord,
    VoteResult,
    Worker,
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
    sections,
    vote,
)
from .providers import anthropic, function, local, openai
from .store import JsonlSink, ParquetSink, Store

try:
    __version__ = _version("fanflow")
except _PackageNotFoundError:  # running from a source tree that is not installed
    from ._version import __version__

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
    "BatchError",
    "BatchResult",
    "BestOfNResult",
    "Budget",
    "BudgetExceeded",
    "Call",
    "CallRecord",
    "CallTimeout",
    "Chain",
    "ConfigError",
    "ContentFiltered",
    "Estimate",
    "Evaluation",
    "FanOutResult",
    "FanflowError",
    "Flow",
    "GuardedResult",
    "ItemStatus",
    "JsonlSink",
    "Limits",
    "Message",
    "NotFound",
    "Overloaded",
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
    "RunResult",
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
    "run",
    "sections",
    "vote",
]
