"""Reading rate-limit headers: Retry-After and the providers' bucket headers.

Pure functions of the headers and two clocks (the event loop's for ``observed_at``,
the wall clock for absolute times such as HTTP dates and RFC 3339 resets), so tests
check them without a server. Order of precedence for how long to wait after a 429
follows openai-python's ``_base_client.py`` (``retry-after-ms``, then ``retry-after`` as
seconds or an HTTP date), then the reset header of whichever bucket is empty.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

from .._types import RateLimitState

__all__ = [
    "parse_anthropic",
    "parse_duration",
    "parse_openai",
    "parse_retry_after",
    "parse_rfc3339",
]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@functools.lru_cache(maxsize=4096)  # the same few values again and again, per reply
def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI reset header: ``120ms``, ``1s``, ``17.28s``, ``6m0s``, ``1h2m3s``.

    A bare number is seconds. Returns None for anything else.
    """
    text = text.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total, pos = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def parse_rfc3339(text: str, wall_now: float) -> float | None:
    """Seconds from ``wall_now`` (epoch) until an RFC 3339 time; None if unparsable."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - wall_now)


def parse_retry_after(headers: Mapping[str, str], wall_now: float) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, then ``retry-after``.

    ``retry-after`` may be seconds (``"2"``, ``"1.5"``) or an HTTP date. Negative or
    unparsable values are ignored.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if value >= 0:
            return value / 1000.0
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        seconds = float(ra)
    except ValueError:
        try:
            date = parsedate_to_datetime(ra)
        except (TypeError, ValueError, IndexError):
            return None
        if date.tzinfo is None:
            return None
        return max(0.0, date.timestamp() - wall_now)
    return seconds if seconds >= 0 else None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def parse_openai(headers: Mapping[str, str], observed_at: float) -> RateLimitState | None:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; None if absent."""
    return _state(headers, "x-ratelimit-{field}-{bucket}", observed_at, parse_duration)


def parse_anthropic(
    headers: Mapping[str, str], observed_at: float, wall_now: float
) -> RateLimitState | None:
    """Anthropic's ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``."""
    return _state(
        headers,
        "anthropic-ratelimit-{bucket}-{field}",
        observed_at,
        lambda value: parse_rfc3339(value, wall_now),
    )


def _state(
    headers: Mapping[str, str],
    name: str,
    observed_at: float,
    read_reset: Callable[[str], float | None],
) -> RateLimitState | None:
    """The state in the headers ``name`` names (None when neither limit is given)."""

    def header(field: str, bucket: str) -> str | None:
        return headers.get(_header_name(name, field, bucket))

    def reset(bucket: str) -> float | None:
        value = header("reset", bucket)
        return read_reset(value) if value is not None else None

    rl, tl = header("limit", "requests"), header("limit", "tokens")
    if rl is None and tl is None:
        return None
    return RateLimitState(
        requests_limit=_int(rl),
        requests_remaining=_int(header("remaining", "requests")),
        requests_reset=reset("requests"),
        tokens_limit=_int(tl),
        tokens_remaining=_int(header("remaining", "tokens")),
        tokens_reset=reset("tokens"),
        observed_at=observed_at,
    )


@functools.cache
def _header_name(name: str, field: str, bucket: str) -> str:
    return name.format(field=field, bucket=bucket)


def wait_from_state(state: RateLimitState | None) -> float | None:
    """After a 429 without Retry-After: the reset of whichever bucket is empty."""
    if state is None:
        return None
    waits = [
        reset
        for remaining, reset in (
            (state.requests_remaining, state.requests_reset),
            (state.tokens_remaining, state.tokens_reset),
        )
        if remaining is not None and remaining <= 0 and reset is not None
    ]
    return max(waits) if waits else None
