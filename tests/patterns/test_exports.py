from __future__ import annotations

import fanflow
import fanflow.patterns

PATTERN_NAMES = {
    "BestOfNResult",
    "Chain",
    "EvaluateResult",
    "FanOutResult",
    "Flow",
    "GuardedResult",
    "Options",
    "ParallelCalls",
    "ParallelCallsResult",
    "Pool",
    "PoolResult",
    "PoolStatus",
    "FlowResult",
    "SectionsResult",
    "Skill",
    "SkillResult",
    "Step",
    "StepRecord",
    "VoteResult",
    "best_of_n",
    "evaluate",
    "fan_out",
    "guarded",
    "sections",
    "vote",
}


def test_patterns_are_exported_from_both_namespaces() -> None:
    assert set(fanflow.__all__) >= PATTERN_NAMES
    assert set(fanflow.patterns.__all__) >= PATTERN_NAMES
    assert "StepInputError" in fanflow.__all__
    for name in fanflow.patterns.__all__:
        assert getattr(fanflow, name) is getattr(fanflow.patterns, name)


def test_result_reprs_say_fanflow() -> None:
    result = fanflow.PoolResult(items=(), makespan=1.5)
    assert repr(result) == "fanflow.PoolResult(items=(), calls=0, makespan=1.500)"
    assert repr(fanflow.Step(len, output="n")) == "fanflow.Step('len', output='n')"
