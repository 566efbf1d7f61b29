"""Dividing work and combining it by code: a text splitter and the code aggregators.

``split_text`` cuts a long text into chunks by paragraphs or by size (paragraphs
packed up to a size, a paragraph too long for one chunk cut at whitespace), the
"divide work" step of ``ParallelCalls``. The code aggregators combine the branches'
outputs without a model call: ``"concatenate"``, ``"merge"`` (JSON objects merged key by
key, JSON lists joined, else the unique lines of every output) and ``"vote"`` (the most
common answer, after :func:`fanflow.patterns._vote.normalize_answer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from .._exceptions import ConfigError
from ._parsing import find_json
from ._vote import normalize_answer

__all__ = ["AGGREGATORS", "CodeAggregator", "Splitter", "aggregator", "split_text"]

CodeAggregator = Literal["concatenate", "merge", "vote"]
Splitter = int | Literal["paragraphs"] | Callable[[str], Sequence[str]]

_PARAGRAPH = re.compile(r"\n\s*\n")


def split_text(text: str, size: int | None = None) -> list[str]:
    """Cut ``text`` into chunks: one per paragraph, or, with ``size``, paragraphs packed
    into chunks of at most ``size`` characters.

    Paragraphs are separated by blank lines. A paragraph longer than ``size`` is cut at
    the last whitespace before the limit (mid-word only when a word is longer than
    ``size``). Empty paragraphs are dropped; each chunk is stripped.
    """
    if size is not None and size < 1:
        raise ConfigError(f"split size must be >= 1 characters, got {size}")
    paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    if size is None:
        return paragraphs
    chunks: list[str] = []
    current = ""
    for paragraph in paragraphs:
        for piece in _cut(paragraph, size):
            if current and len(current) + 2 + len(piece) <= size:
                current = f"{current}\n\n{piece}"
            else:
                if current:
                    chunks.append(current)
                current = piece
    if current:
        chunks.append(current)
    return chunks


def _cut(paragraph: str, size: int) -> list[str]:
    pieces = []
    rest = paragraph
    while len(rest) > size:
        cut = rest.rfind(" ", 0, size + 1)
        cut = cut if cut > 0 else size
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


def chunks_of(text: str, split: Splitter | None) -> list[str]:
    """The chunks of ``text`` for ``ParallelCalls.run(text=..., split=...)``."""
    if split is None or split == "paragraphs":
        return split_text(text)
    if isinstance(split, int) and not isinstance(split, bool):
        return split_text(text, split)
    if callable(split):
        return [str(chunk) for chunk in split(text)]
    raise ConfigError(
        f"split must be a size in characters, 'paragraphs' or a function, got {split!r}"
    )


def concatenate(outputs: Sequence[str]) -> str:
    """Every output, in input order, separated by blank lines."""
    return "\n\n".join(outputs)


def merge(outputs: Sequence[str]) -> Any:
    """JSON objects merged key by key (lists joined without repeats, nested objects
    merged, the first value kept otherwise); JSON lists joined without repeats; any
    other text: the unique lines of every output, in order."""
    parsed = [find_json(text) for text in outputs]
    if parsed and all(isinstance(p, dict) for p in parsed):
        merged: dict[str, Any] = {}
        for p in parsed:
            _merge_into(merged, p)
        return merged
    if parsed and all(isinstance(p, list) for p in parsed):
        return _union([x for p in parsed for x in p])
    lines = [line.rstrip() for text in outputs for line in text.splitlines() if line.strip()]
    return "\n".join(dict.fromkeys(lines))


def _merge_into(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        old = into.get(key)
        if key not in into:
            into[key] = value
        elif isinstance(old, list) and isinstance(value, list):
            into[key] = _union(old + value)
        elif isinstance(old, dict) and isinstance(value, dict):
            _merge_into(old, value)


def _union(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def vote(outputs: Sequence[str]) -> str:
    """The most common output (compared after ``normalize_answer``; a tie goes to the
    answer seen first), as first written."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for text in outputs:
        key = normalize_answer(text)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, text.strip())
    best = max(counts, key=lambda k: counts[k])  # max keeps the first of equal counts
    return first[best]


AGGREGATORS: dict[str, Callable[[Sequence[str]], Any]] = {
    "concatenate": concatenate,
    "merge": merge,
    "vote": vote,
}


def aggregator(aggregate: CodeAggregator | Callable[..., Any]) -> Callable[..., Any]:
    """The function of a code aggregator: a built-in by name, or the caller's own."""
    if isinstance(aggregate, str):
        try:
            return AGGREGATORS[aggregate]
        except KeyError:
            raise ConfigError(
                f"unknown aggregate {aggregate!r}; use one of {', '.join(AGGREGATORS)}, "
                "a function fn(outputs) -> value, or aggregate_prompt= for a model"
            ) from None
    if callable(aggregate):
        return aggregate
    raise ConfigError(f"aggregate must be a name or a function, got {aggregate!r}")
