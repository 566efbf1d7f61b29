"""Patterns: map/gather/race, fan-out, voting, best-of-N, guardrails, evaluation,
sections, ParallelCalls, and multi-step Skill/Step/Chain/Flow run over many inputs by Pool.

Every pattern takes the same call options (:class:`Options`). A pattern's result is
named after it: ``<Pattern>Result`` (``VoteResult``, ``EvaluateResult``, ``FlowResult``
for a Chain or Flow run, ...). The exceptions: ``map`` returns a ``MapResult`` (the
engine's own type, shared with the Ray backend and the CLI), ``as_completed`` a
``ResultStream``, ``call`` a ``Call`` (an awaitable, not yet run), and ``gather`` and
``race`` the values of their calls.
"""

from ._cascade import cascade
from ._combine import split_text
from ._estimate import EstimateResult, estimate
from ._evaluate import EvaluateResult, Score, evaluate
from ._fanout import FanOutResult, Worker, fan_out
from ._flow import Chain, Flow, FlowResult, Step, StepRecord
from ._gather import Call, call, gather, race
from ._guard import GuardedResult, guarded
from ._judge import BestOfNResult, best_of_n
from ._map import ResultStream, as_completed, map
from ._options import Options
from ._pool import ItemStatus, Pool, PoolResult, PoolStatus
from ._requests import read_requests
from ._sections import ParallelCalls, ParallelCallsResult, SectionsResult, sections
from ._skill import Skill, SkillResult
from ._vote import VoteResult, vote

__all__ = [
    "BestOfNResult",
    "Call",
    "Chain",
    "EstimateResult",
    "EvaluateResult",
    "FanOutResult",
    "Flow",
    "FlowResult",
    "GuardedResult",
    "ItemStatus",
    "Options",
    "ParallelCalls",
    "ParallelCallsResult",
    "Pool",
    "PoolResult",
    "PoolStatus",
    "ResultStream",
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
    "cascade",
    "estimate",
    "evaluate",
    "fan_out",
    "gather",
    "guarded",
    "map",
    "race",
    "read_requests",
    "sections",
    "split_text",
    "vote",
]
