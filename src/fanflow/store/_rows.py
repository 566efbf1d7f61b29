"""The SQLite store's rows: what a write puts in a table and what a read gets back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._types import CallRecord, Response, Usage
from ._base import ItemRef
from ._writer import Op

__all__ = [
    "FINISH_JOB",
    "INSERT_CALL",
    "SELECT_CALL",
    "SELECT_ITEMS",
    "UPSERT_JOB",
    "call_row",
    "item_op",
    "requeues",
    "usage_of",
]

INSERT_CALL = (
    "INSERT OR REPLACE INTO calls (key, model, text, response_model, finish_reason, "
    "input_tokens, output_tokens, usage_estimated, cost, latency, time_to_first_token, "
    "duration, attempts, created, requeues, cached_input_tokens, cache_write_input_tokens, "
    "cache_write_1h_input_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_ITEM = (
    "INSERT OR REPLACE INTO items (job, idx, input_id, key, status, error_type, error, "
    "cached, input_tokens, output_tokens, cost, updated, requeues, note, cached_input_tokens, "
    "cache_write_input_tokens, cache_write_1h_input_tokens) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
SELECT_CALL = (
    "SELECT text, response_model, finish_reason, input_tokens, output_tokens, "
    "usage_estimated, cost, latency, time_to_first_token, cached_input_tokens, "
    "cache_write_input_tokens, cache_write_1h_input_tokens FROM calls WHERE key = ?"
)
SELECT_ITEMS = (
    "SELECT idx, input_id, key, status, error_type, error, cached, input_tokens, "
    "output_tokens, cost, updated, requeues, note, cached_input_tokens, "
    "cache_write_input_tokens, cache_write_1h_input_tokens FROM items WHERE job = ?"
)
UPSERT_JOB = (
    "INSERT INTO jobs (name, total, runs, created, updated) VALUES (?, ?, 1, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET runs = runs + 1, updated = excluded.updated, "
    "total = coalesce(excluded.total, total)"
)
FINISH_JOB = "UPDATE jobs SET total = ?, updated = ? WHERE name = ?"

# Errors are kept short: the whole message is in the record; the store keeps a summary.
_MAX_ERROR_CHARS = 2000


def call_row(
    key: str,
    model: str | None,
    response: Response,
    duration: float | None,
    attempts: int,
    now: float,
    requeued: int = 0,
) -> tuple[Any, ...]:
    """The ``calls`` row of a response (for :data:`INSERT_CALL`)."""
    usage = response.usage if response.usage is not None else Usage()
    return (
        key,
        model,
        response.text,
        response.model,
        response.finish_reason,
        usage.input_tokens,
        usage.output_tokens,
        int(usage.estimated),
        response.cost,
        response.latency,
        response.time_to_first_token,
        duration,
        attempts,
        now,
        requeued,
        *_cache_counts(usage),
    )


def item_op(record: CallRecord[Any], item: ItemRef, key: str | None, now: float) -> Op:
    """The write of a job item's terminal status."""
    error = record.error
    message = None
    if error is not None:
        message = str(error)
        if len(message) > _MAX_ERROR_CHARS:
            message = message[:_MAX_ERROR_CHARS] + "..."
    return (
        _INSERT_ITEM,
        (
            item.job,
            item.index,
            item.input_id,
            key,
            record.status.value,
            type(error).__name__ if error is not None else None,
            message,
            int(record.cached),
            record.usage.input_tokens,
            record.usage.output_tokens,
            record.cost,
            now,
            requeues(record),
            _last_note(record),
            *_cache_counts(record.usage),
        ),
    )


def usage_of(n_in: int, n_out: int, estimated: bool, cache: Sequence[int]) -> Usage:
    """A row's usage: its token counts and the prompt cache's three columns."""
    read, written, hour = cache
    return Usage(
        n_in,
        n_out,
        estimated,
        cached_input_tokens=read,
        cache_write_input_tokens=written,
        cache_write_1h_input_tokens=hour,
    )


def _cache_counts(usage: Usage) -> tuple[int, int, int]:
    """The prompt cache's columns of a row."""
    return (
        usage.cached_input_tokens,
        usage.cache_write_input_tokens,
        usage.cache_write_1h_input_tokens,
    )


def requeues(record: CallRecord[Any]) -> int:
    """The 429s of a call requeued without using an attempt."""
    return sum(a.requeued for a in record.attempts)


def _last_note(record: CallRecord[Any]) -> str | None:
    """The latest attempt's note (why its wait was what it was), if any says one."""
    note = next((a.note for a in reversed(record.attempts) if a.note), None)
    return None if note is None else note[:_MAX_ERROR_CHARS]
