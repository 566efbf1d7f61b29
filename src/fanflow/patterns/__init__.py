"""Patterns: map, as_completed, call, gather, race (and, in later issues, the rest)."""

from ._estimate import Estimate, estimate
from ._gather import Call, call, gather, race
from ._map import ResultStream, as_completed, map

__all__ = [
    "Call",
    "Estimate",
    "ResultStream",
    "as_completed",
    "call",
    "estimate",
    "gather",
    "map",
    "race",
]
