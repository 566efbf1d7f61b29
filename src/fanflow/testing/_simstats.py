"""What SimServer saw: its counters, and the snapshots of them it reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ._simwire import Completion, SimRequest

__all__ = ["Counters", "SimSecond", "SimStats"]


@dataclass(frozen=True, slots=True)
class SimSecond:
    """What SimServer saw during one second (since start or the last reset).

    Attributes:
        second: whole seconds since the server started (or was reset).
        requests: chat requests that arrived.
        admitted: requests that passed the limits (in flight, RPM, TPM).
        rate_limited: requests refused with 429 by those limits (injected 429s excluded).
        tokens: input + output tokens charged to the TPM bucket.
        completed: successful replies whose last byte was sent in this second.
    """

    second: int
    requests: int = 0
    admitted: int = 0
    rate_limited: int = 0
    tokens: int = 0
    completed: int = 0


@dataclass(frozen=True, slots=True)
class SimStats:
    """A snapshot of SimServer's counters (``server.stats()`` or ``GET /stats``).

    Attributes:
        requests: chat requests received.
        responses: responses sent, by HTTP status (resets and hangs send none).
        in_flight: requests being handled now.
        max_in_flight: the most handled at once.
        tokens_in: input tokens of admitted requests.
        tokens_out: output tokens of admitted requests.
        disconnects: requests whose client went away before the reply was complete.
        faults: injected faults by kind.
        timeline: one entry per second with any activity, in order.
        prompt_requests: requests received per prompt (the last user message), with
            ``keep_requests`` on (else empty).
        prompt_completed: replies sent in full per prompt (a 200 written to the end),
            with ``keep_requests`` on: a test can prove that no answered prompt was
            asked again (batch results count here too).
        batches: batches created (OpenAI and Anthropic).
        batch_requests: requests submitted in batches.
        batch_cancels: batches whose cancellation was asked for.
        batch_prompts: requests submitted in batches per prompt: a test can prove that
            no item was submitted twice.
        cache_hits: admitted requests that read a prefix from the prompt cache
            (``prompt_cache`` on).
        cache_misses: admitted requests long enough to cache that read nothing from it.
        cached_tokens: input tokens read from the prompt cache.
        cache_write_tokens: input tokens written to it (reported by Anthropic's API).
        cache_write_1h_tokens: of ``cache_write_tokens``, those written at ``"ttl": "1h"``
            breakpoints (Anthropic's ``cache_creation.ephemeral_1h_input_tokens``).
    """

    requests: int
    responses: Mapping[int, int]
    in_flight: int
    max_in_flight: int
    tokens_in: int
    tokens_out: int
    disconnects: int
    faults: Mapping[str, int]
    timeline: tuple[SimSecond, ...] = field(repr=False)
    prompt_requests: Mapping[str, int] = field(default_factory=dict, repr=False)
    prompt_completed: Mapping[str, int] = field(default_factory=dict, repr=False)
    batches: int = 0
    batch_requests: int = 0
    batch_cancels: int = 0
    batch_prompts: Mapping[str, int] = field(default_factory=dict, repr=False)
    cache_hits: int = 0
    cache_misses: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def as_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("faults", "prompt_requests", "prompt_completed", "batch_prompts"):
            out[name] = dict(out[name])
        out["responses"] = {str(k): v for k, v in sorted(self.responses.items())}
        out["timeline"] = [{f.name: getattr(s, f.name) for f in fields(s)} for s in self.timeline]
        return out


class Counters:
    """SimServer's live counters (one object for the server's life; :meth:`clear`
    starts them again)."""

    __slots__ = (
        "batch_cancels",
        "batch_prompts",
        "batch_requests",
        "batches",
        "cache_hits",
        "cache_misses",
        "cache_write_1h_tokens",
        "cache_write_tokens",
        "cached_tokens",
        "disconnects",
        "faults",
        "in_flight",
        "keep_prompts",
        "max_in_flight",
        "prompt_completed",
        "prompt_requests",
        "requests",
        "responses",
        "t0",
        "timeline",
        "tokens_in",
        "tokens_out",
    )

    def __init__(self, keep_prompts: bool) -> None:
        self.keep_prompts = keep_prompts  # count per prompt (``keep_requests``)
        self.in_flight = 0
        self.clear(0.0)

    def clear(self, now: float) -> None:
        """Start every count again at ``now`` (the requests in flight stay counted)."""
        self.t0 = now
        self.requests = self.max_in_flight = self.disconnects = 0
        self.tokens_in = self.tokens_out = 0
        self.responses: dict[int, int] = {}
        self.faults: dict[str, int] = {}
        self.timeline: dict[int, list[int]] = {}  # second -> [req, adm, 429, tok, done]
        self.prompt_requests: dict[str, int] = {}
        self.prompt_completed: dict[str, int] = {}
        self.batches = self.batch_requests = self.batch_cancels = 0
        self.batch_prompts: dict[str, int] = {}
        self.cache_hits = self.cache_misses = self.cached_tokens = 0
        self.cache_write_tokens = self.cache_write_1h_tokens = 0

    def second(self, now: float) -> list[int]:
        """The timeline's row of the second holding ``now``: [requests, admitted,
        rate limited, tokens, completed]."""
        s = int(now - self.t0)
        row = self.timeline.get(s)
        if row is None:
            row = self.timeline[s] = [0, 0, 0, 0, 0]
        return row

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def asked(self, sim: SimRequest) -> None:
        if self.keep_prompts:
            self.prompt_requests[sim.prompt] = self.prompt_requests.get(sim.prompt, 0) + 1

    def completed(self, sim: SimRequest) -> None:
        if self.keep_prompts:
            self.prompt_completed[sim.prompt] = self.prompt_completed.get(sim.prompt, 0) + 1

    def cache(self, done: Completion, cacheable: bool) -> None:
        """Count a request's use of the prompt cache (``done`` has it applied)."""
        self.cache_hits += done.cached_tokens > 0
        self.cache_misses += cacheable and not done.cached_tokens
        self.cached_tokens += done.cached_tokens
        self.cache_write_tokens += done.cache_write_tokens
        self.cache_write_1h_tokens += done.cache_write_1h_tokens

    def snapshot(self) -> SimStats:
        values: dict[str, Any] = {}
        for f in fields(SimStats):  # each a counter of the same name, copied
            value = getattr(self, f.name)
            values[f.name] = dict(value) if isinstance(value, dict) else value
        values["timeline"] = tuple(SimSecond(s, *self.timeline[s]) for s in sorted(self.timeline))
        return SimStats(**values)
