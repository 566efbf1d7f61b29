"""SimServer's prompt cache: what a request reads from the cache and writes to it.

A prefix is cached only once a request carrying it has been prefilled: the entry a
request writes becomes readable when its prefill ends (its time to first token), so
requests sent at the same moment all miss, as at the hosted APIs. An entry lives
``ttl`` seconds from its last use (Anthropic: 5 minutes, or 1 hour with
``"ttl": "1h"``).

The two APIs' rules (``fanflow._promptcache``):

- OpenAI caches automatically: the longest prefix of the prompt (the messages' tokens
  in order) that is at least 1,024 tokens, in steps of 128; ``cached_tokens`` is the
  part of it read from the cache. Writes are not reported.
- Anthropic caches at ``cache_control`` breakpoints (on a system block or a content
  block; at most 4): the prefix ending at a breakpoint, when at least the model's
  minimum. The longest cached breakpoint prefix is read; the prompt up to the last
  breakpoint beyond it is written (``cache_creation_input_tokens``; ``cache_creation``
  splits it into the 5-minute and the 1-hour breakpoints' parts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._promptcache import OPENAI_STEP, minimum_tokens
from ._simwire import Completion, SimRequest

__all__ = ["CacheUse", "PromptCache", "SimCache"]


@dataclass(frozen=True, slots=True)
class SimCache:
    """How SimServer's prompt cache behaves (``SimServer(prompt_cache=SimCache(...))``).

    Args:
        ttl: seconds an entry lives after its last use (a ``"ttl": "1h"`` breakpoint: an
            hour).
        min_tokens: the shortest cached prefix; None: the vendor's minimum for the model
            (OpenAI 1,024; Anthropic by model, 1,024 for a name it does not know).
    """

    ttl: float = 300.0
    min_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class CacheUse:
    """One request's use of the cache: tokens ``read`` and ``written`` (``written_1h`` of
    them at ``"ttl": "1h"`` breakpoints); ``cacheable``: some prefix of it was long
    enough to cache."""

    read: int = 0
    written: int = 0
    cacheable: bool = False
    written_1h: int = 0

    def applied(self, done: Completion) -> Completion:
        """``done`` with this use in its usage (never more than its prompt's tokens)."""
        read = min(self.read, done.input_tokens)
        written = min(self.written, done.input_tokens - read)
        return dataclasses.replace(
            done,
            cached_tokens=read,
            cache_write_tokens=written,
            cache_write_1h_tokens=min(self.written_1h, written),
            caching=True,
        )


@dataclass(slots=True)
class _Entry:
    ready: float  # when the prefill that writes it ends
    expires: float


# Expired entries are dropped once this many more have been added since the last purge.
_PURGE_EVERY = 10_000

# A breakpoint: the prompt's first `end` tokens, cached for `ttl` seconds (an hour when
# it says "ttl": "1h", the third item).
_Breakpoint = tuple[int, float, bool]


class PromptCache:
    """The cache of one SimServer: prefix keys (a chain of hashes) to their entries."""

    def __init__(self, config: SimCache) -> None:
        self.config = config
        self._entries: dict[int, _Entry] = {}
        self._purge_at = _PURGE_EVERY  # entries: long runs of distinct prompts stay bounded

    def clear(self) -> None:
        self._entries.clear()

    def use(self, sim: SimRequest, now: float, prefilled: float) -> CacheUse:
        """Look ``sim`` up at ``now``; what it writes is readable from ``prefilled``."""
        tokens, breakpoints = _layout(sim, self.config.ttl)
        minimum = self.config.min_tokens or minimum_tokens(sim.api, sim.model)
        if sim.api == "openai":
            ends = range(minimum, len(tokens) + 1, OPENAI_STEP)
            breakpoints = [(end, self.config.ttl, False) for end in ends]
        breakpoints = [b for b in breakpoints if b[0] >= minimum]
        if not breakpoints:
            return CacheUse()
        keys = _keys(sim.model, tokens, [end for end, _, _ in breakpoints])
        read = 0
        for key, (end, ttl, _) in zip(keys, breakpoints, strict=True):
            entry = self._entries.get(key)
            if entry is not None and entry.ready <= now < entry.expires:
                read = end
                entry.expires = max(entry.expires, now + ttl)
        for key, (end, ttl, _) in zip(keys, breakpoints, strict=True):
            if end <= read:
                continue
            entry = self._entries.get(key)
            if entry is None or entry.expires <= now:
                self._entries[key] = _Entry(prefilled, prefilled + ttl)
            else:  # being written by another request, or cached: the earlier one counts
                entry.ready = min(entry.ready, prefilled)
                entry.expires = max(entry.expires, prefilled + ttl)
        if len(self._entries) >= self._purge_at:
            self._entries = {k: e for k, e in self._entries.items() if e.expires > now}
            self._purge_at = len(self._entries) + _PURGE_EVERY
        if sim.api == "openai":  # OpenAI reports no writes
            return CacheUse(read, 0, cacheable=True)
        return CacheUse(read, breakpoints[-1][0] - read, True, _hour_writes(breakpoints, read))


def _hour_writes(breakpoints: list[_Breakpoint], read: int) -> int:
    """The tokens after ``read`` written at 1-hour breakpoints: each breakpoint writes
    the stretch from the one before it."""
    hour, start = 0, 0
    for end, _, long in breakpoints:
        if long:
            hour += max(0, end - max(start, read))
        start = end
    return hour


def _keys(model: str, tokens: list[str], ends: list[int]) -> list[int]:
    """One key per prefix ``tokens[:end]``, each chained on the one before."""
    keys: list[int] = []
    key, start = hash(model), 0
    for end in ends:
        key = hash((key, tuple(tokens[start:end])))
        keys.append(key)
        start = end
    return keys


def _layout(sim: SimRequest, ttl: float) -> tuple[list[str], list[_Breakpoint]]:
    """The prompt's tokens in the order the model reads them, and its ``cache_control``
    breakpoints (Anthropic)."""
    tokens: list[str] = []
    marks: list[_Breakpoint] = []

    def add(content: Any) -> None:
        if isinstance(content, str):
            tokens.extend(content.split())
            return
        for block in content if isinstance(content, list) else ():
            if isinstance(block, Mapping):
                tokens.extend(str(block.get("text", "")).split())
                control = block.get("cache_control")
                if isinstance(control, Mapping):
                    hour = control.get("ttl") == "1h"
                    marks.append((len(tokens), 3600.0 if hour else ttl, hour))

    if sim.api == "anthropic" and "system" in sim.body:
        add(sim.body["system"])
    for message in sim.body.get("messages") or ():
        if isinstance(message, Mapping):
            add(message.get("content"))
    return tokens, marks
