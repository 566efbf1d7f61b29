"""Readable reprs for results and records: short, whole fields, units on numbers.

A repr is what people see in a REPL, a notebook or a log line, so it names what matters
(status, output, attempts, latency, tokens, cost) and leaves out the rest (event-loop
timestamps, raw responses). Long values are shortened inside their own quotes or
brackets, never cut mid-field. Classes also give rich's ``__rich_repr__`` the same
pairs, so ``rich.print`` and rich's pretty REPL show them as a tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["TEXT_CHARS", "money", "render", "seconds", "short"]

# How much of a text value a repr shows.
TEXT_CHARS = 60


def money(dollars: float) -> str:
    """``0.00035999999999999964`` -> ``0.00036`` (six significant digits, no float noise)."""
    return f"{dollars:.6g}"


def seconds(value: float) -> str:
    return f"{value:.3f}"


def short(value: Any, limit: int = TEXT_CHARS) -> str:
    """The repr of ``value``, at most about ``limit`` characters, always well formed."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return repr(value[: limit - 1] + "…") + f" ({len(value):,} chars)"
    if isinstance(value, BaseException):
        return f"{type(value).__name__}({short(str(value), limit)})"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, Sequence):
        return f"[{len(value)} {_kind(value)}]"
    return f"<{type(value).__name__}>"


def _kind(items: Sequence[Any]) -> str:
    names = {type(x).__name__ for x in items}
    return f"{names.pop()}s" if len(names) == 1 else "items"


def render(name: str, pairs: Iterable[tuple[str, str]]) -> str:
    """``fanflow.Name(a=1, b=2)`` from already formatted ``(field, text)`` pairs."""
    return f"fanflow.{name}(" + ", ".join(f"{k}={v}" for k, v in pairs) + ")"
