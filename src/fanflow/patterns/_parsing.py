"""Reading numbers and JSON out of free-form model replies, robustly.

Models wrap what was asked for in prose, code fences or JSON. These helpers look for
a JSON object first, then for a number after a telling word ("Candidate 2", "Score:
7/10"), then for any number at all; they never raise on garbage, they return None.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["find_json", "find_number"]

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")


def find_json(text: str) -> Any:
    """The first JSON value in ``text`` (inside a code fence or bare), or None."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for chunk in candidates:
        chunk = chunk.strip()
        for start, ch in enumerate(chunk):
            if ch not in "{[":
                continue
            try:
                value, _ = decoder.raw_decode(chunk, start)
            except ValueError:
                continue
            return value
    return None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _NUMBER.search(value)
        return float(match.group()) if match else None
    return None


def find_number(text: str, *, keys: Sequence[str], words: Sequence[str]) -> float | None:
    """A number from a reply: a JSON field named in ``keys``, else one after any of
    ``words`` ("score: 7", "candidate #2"), else the first number in the text."""
    data = find_json(text)
    if isinstance(data, dict):
        lowered = {str(k).lower(): v for k, v in data.items()}
        for key in keys:
            if key in lowered:
                number = _as_number(lowered[key])
                if number is not None:
                    return number
    if words:
        alternatives = "|".join(re.escape(w) for w in words)
        near = re.search(rf"(?:{alternatives})\W{{0,4}}(-?\d+(?:\.\d+)?)", text, re.IGNORECASE)
        if near:
            return float(near.group(1))
    return _as_number(text)
