"""Patterns: map, as_completed, call, gather, race (and, in later issues, the rest)."""

from ._gather import Call, call, gather, race
from ._map import ResultStream, as_completed, map

__all__ = ["Call", "ResultStream", "as_completed", "call", "gather", "map", "race"]
