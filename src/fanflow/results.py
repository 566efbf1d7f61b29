"""What the patterns return: ``<Pattern>Result`` types and the records inside them.

``map`` returns a :class:`MapResult` (one :class:`CallRecord` per item and a
:class:`Summary`); every other pattern a result named after it.
"""

import warnings as _warnings
from typing import Any as _Any

from ._types import Attempt, CallRecord, Deployment, MapResult, RateLimitState, Summary
from .patterns import (
    BestOfNResult,
    Call,
    EstimateResult,
    EvaluateResult,
    FanOutResult,
    FlowResult,
    GuardedResult,
    ItemStatus,
    ParallelCallsResult,
    PoolResult,
    PoolStatus,
    ResultStream,
    Score,
    SectionsResult,
    SkillResult,
    StepRecord,
    VoteResult,
    Worker,
)

__all__ = [
    "Attempt",
    "BestOfNResult",
    "Call",
    "CallRecord",
    "Deployment",
    "EstimateResult",
    "EvaluateResult",
    "FanOutResult",
    "FlowResult",
    "GuardedResult",
    "ItemStatus",
    "MapResult",
    "ParallelCallsResult",
    "PoolResult",
    "PoolStatus",
    "RateLimitState",
    "ResultStream",
    "Score",
    "SectionsResult",
    "SkillResult",
    "StepRecord",
    "Summary",
    "VoteResult",
    "Worker",
]


def _renamed(name: str, stacklevel: int = 2) -> _Any:
    """An old name of a result type, served with a warning for one release."""
    if name != "BatchResult":
        raise AttributeError(f"module 'fanflow.results' has no attribute {name!r}")
    _warnings.warn(
        "fanflow.BatchResult is deprecated and will be removed in the next release; "
        "use fanflow.MapResult (the same class: 'batch' now means only a provider's "
        "batch API)",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
    return MapResult


def __getattr__(name: str) -> _Any:
    return _renamed(name)
