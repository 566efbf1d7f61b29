"""Helpers for the limits tests: count what a fake server saw, window by window."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

WindowCounter = Callable[[Sequence[float], Sequence[float], float], float]


def _max_in_window(times: Sequence[float], costs: Sequence[float], period: float) -> float:
    """The most cost seen in any window [t, t + period) that starts at a send."""
    pairs = sorted(zip(times, costs, strict=True))
    best = 0.0
    for x, _ in pairs:
        best = max(best, sum(c for t, c in pairs if x <= t < x + period))
    return best


@pytest.fixture
def max_in_window() -> WindowCounter:
    return _max_in_window
