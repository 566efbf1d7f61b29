"""What the patterns return: ``<Pattern>Result`` types and the records inside them.

``map`` returns a :class:`BatchResult` (one :class:`CallRecord` per item and a
:class:`Summary`); every other pattern a result named after it.
"""

from ._types import Attempt, BatchResult, CallRecord, Deployment, RateLimitState, Summary
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
    "BatchResult",
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
