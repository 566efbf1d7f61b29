"""The checks of option values that several layers accept (one message each)."""

from __future__ import annotations

import numbers
from typing import Any

from ._exceptions import ConfigError

__all__ = ["check_concurrency", "check_seconds"]


def check_concurrency(value: Any, name: str = "concurrency") -> None:
    """Refuse a concurrency limit that is not a whole number >= 1 (None: no limit)."""
    if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
        raise ConfigError(f"{name} must be >= 1, got {value!r}; use None for no limit")


def check_seconds(name: str, value: Any) -> None:
    """Refuse a duration that is not a number > 0 (None: none)."""
    if value is not None and (not isinstance(value, int | float) or value <= 0):
        raise ConfigError(f"{name} must be > 0 seconds, got {value!r}; use None for none")
