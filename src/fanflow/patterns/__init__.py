"""Patterns: map/gather/race, fan-out, voting, best-of-N, guardrails, evaluation,
sections, ParallelCalls, and multi-step Skill/Step/Chain/Flow run over many inputs by Pool."""

from ._estimate import Estimate, estimate
from ._evaluate import Evaluation, Score, evaluate
from ._fanout import FanOutResult, Worker, fan_out
from ._flow import Chain, Flow, RunResult, Step, StepRecord
from ._gather import Call, call, gather, race
from ._guard import GuardedResult, guarded
from ._judge import BestOfNResult, best_of_n
from ._map import ResultStream, as_completed, map
from ._pool import ItemStatus, Pool, PoolResult, PoolStatus
from ._sections import ParallelCalls, ParallelCallsResult, SectionsResult, sections
from ._skill import Skill, SkillResult
from ._vote import VoteResult, vote

__all__ = [
    "BestOfNResult",
    "Call",
    "Chain",
    "Estimate",
    "Evaluation",
    "FanOutResult",
    "Flow",
    "GuardedResult",
    "ItemStatus",
    "ParallelCalls",
    "ParallelCallsResult",
    "Pool",
    "PoolResult",
    "PoolStatus",
    "ResultStream",
    "RunResult",
    "Score",
    "SectionsResult",
    "Skill",
    "SkillResult",
    "Step",
    "StepRecord",
    "VoteResult",
    "Worker",
    "as_completed",
    "best_of_n",
    "call",
    "estimate",
    "evaluate",
    "fan_out",
    "gather",
    "guarded",
    "map",
    "race",
    "sections",
    "vote",
]
