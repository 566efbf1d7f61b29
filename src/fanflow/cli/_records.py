"""Call records as JSON lines, for ``fanflow report`` (``fanflow map --records FILE``).

One line per call: its item index, label, status, start/end (event-loop seconds), each
attempt (start, end, status, error type, whether it was a 429 or a hedge), tokens and
cost. Error messages are kept short and never hold secrets (fanflow's errors never do).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._exceptions import ConfigError
from .._progress import _is_429
from .._types import CallRecord
from ._settings import for_cli

__all__ = [
    "AttemptRow",
    "CallRow",
    "RecordsWriter",
    "item_fields",
    "job_records_path",
    "read_records",
    "record_to_json",
]


def job_records_path(store_path: str | Path, job: str) -> Path:
    """Where a job's call records live: ``records/<job>.jsonl`` beside the store file."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job)
    return Path(store_path).parent / "records" / f"{safe}.jsonl"


def _error_name(error: BaseException | None) -> str | None:
    return None if error is None else type(error).__name__


# How much of an item's input a record keeps (the report's failures table shows it).
INPUT_CHARS = 200


def item_fields(line: int | None, value: Any) -> dict[str, Any]:
    """The item a call answered, as a record keeps it: its line, its ``id`` field (when it
    has one) and the start of its input."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    item_id = value.get("id") if isinstance(value, dict) else None
    return {
        "line": line,
        "id": None if item_id is None else str(item_id),
        "input": text if len(text) <= INPUT_CHARS else text[: INPUT_CHARS - 1] + "…",
    }


def record_to_json(
    record: CallRecord[Any], item: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON form of one call record (``item``: from :func:`item_fields`)."""
    return {
        **(item or {}),
        "index": record.index,
        "label": record.label,
        "status": str(record.status),
        "start": record.start,
        "end": record.end,
        "input_tokens": record.usage.input_tokens,
        "output_tokens": record.usage.output_tokens,
        "cost": record.cost,
        "cached": record.cached,
        "batch_id": record.batch_id,
        "error": _error_name(record.error),
        "message": None if record.error is None else for_cli(str(record.error))[:300],
        "attempts": [
            {
                "number": a.number,
                "start": a.start,
                "end": a.end,
                "status": str(a.status),
                "error": _error_name(a.error),
                "rate_limited": a.error is not None and _is_429(a.error),
                "hedge": a.hedge,
                "requeued": a.requeued,
                "note": a.note,
            }
            for a in record.attempts
        ],
    }


class RecordsWriter:
    """Appends call records to JSONL files as they end (``--records FILE`` and, for a
    job, the job's own records, so ``fanflow report JOB`` sees every run)."""

    def __init__(self, *streams: IO[str]) -> None:
        self._streams = streams

    @classmethod
    def open(cls, path: str | Path, *, append: bool = False) -> RecordsWriter:
        return cls.open_many([(path, append)])

    @classmethod
    def open_many(cls, targets: Sequence[tuple[str | Path, bool]]) -> RecordsWriter:
        """One writer for several files, each ``(path, append)``."""
        streams: list[IO[str]] = []
        for path, append in targets:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                streams.append(open(path, "a" if append else "w", encoding="utf-8"))  # noqa: SIM115 - closed by close()
            except OSError as exc:
                for stream in streams:
                    stream.close()
                raise ConfigError(f"cannot write {path}: {exc.strerror}; check --records") from None
        return cls(*streams)

    def write(self, record: CallRecord[Any], item: Mapping[str, Any] | None = None) -> None:
        if record.cached:  # served from the store: no call was made in this run
            return
        line = json.dumps(record_to_json(record, item), ensure_ascii=False) + "\n"
        for stream in self._streams:
            stream.write(line)

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One attempt as the report sees it."""

    start: float
    end: float
    status: str
    error: str | None
    rate_limited: bool
    hedge: bool
    requeued: bool = False
    note: str | None = None


@dataclass(frozen=True, slots=True)
class CallRow:
    """One call as the report sees it."""

    index: int | None
    label: str | None
    status: str
    start: float | None
    end: float | None
    input_tokens: int
    output_tokens: int
    cost: float | None
    error: str | None
    message: str | None
    attempts: tuple[AttemptRow, ...]
    line: int | None = None
    id: str | None = None
    input: str | None = None

    @property
    def latency(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return self.end - self.start

    @property
    def note(self) -> str | None:
        """The latest attempt's note (why its wait was what it was), if any says one."""
        return next((a.note for a in reversed(self.attempts) if a.note), None)

    @property
    def busy_time(self) -> float:
        """Time spent being answered (attempts only; queueing and backoff excluded)."""
        if self.attempts:
            return sum(a.end - a.start for a in self.attempts)
        return self.latency or 0.0


def read_records(path: str) -> Iterator[CallRow]:
    """Read a records file written by ``--records``.

    Raises:
        ConfigError: the file is missing or a line is not a call record (named by line).
    """
    try:
        stream = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigError(f"records file {path} cannot be read: {exc.strerror}") from None
    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                attempts = tuple(
                    AttemptRow(
                        float(a["start"]),
                        float(a["end"]),
                        str(a["status"]),
                        a.get("error"),
                        bool(a.get("rate_limited")),
                        bool(a.get("hedge")),
                        bool(a.get("requeued")),
                        a.get("note"),
                    )
                    for a in d.get("attempts", ())
                )
                yield CallRow(
                    index=d.get("index"),
                    label=d.get("label"),
                    status=str(d["status"]),
                    start=d.get("start"),
                    end=d.get("end"),
                    input_tokens=int(d.get("input_tokens") or 0),
                    output_tokens=int(d.get("output_tokens") or 0),
                    cost=d.get("cost"),
                    error=d.get("error"),
                    message=d.get("message"),
                    attempts=attempts,
                    line=d.get("line"),
                    id=d.get("id"),
                    input=d.get("input"),
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(
                    f"{path}:{number}: not a fanflow call record ({type(exc).__name__}: {exc}); "
                    "give a file written by --records"
                ) from None
