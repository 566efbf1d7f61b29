from __future__ import annotations

import fanflow
import fanflow.patterns

PATTERN_NAMES = {
    "Chain",
    "Flow",
    "Options",
    "ParallelCalls",
    "Pool",
    "Skill",
    "Step",
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
    for name in fanflow.patterns.__all__:
        home = fanflow if name in fanflow.__all__ else fanflow.results
        assert getattr(home, name) is getattr(fanflow.patterns, name)
    assert "StepInputError" in fanflow.errors.__all__


def test_result_reprs_say_fanflow() -> None:
    result = fanflow.results.PoolResult(items=(), makespan=1.5)
    assert repr(result) == "fanflow.results.PoolResult(items=(), calls=0, makespan=1.500)"
    assert repr(fanflow.Step(len, output="n")) == "fanflow.Step('len', output='n')"
