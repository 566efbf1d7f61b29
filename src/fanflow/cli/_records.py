"""Call records as JSON lines, for ``fanflow report`` (``fanflow map --records FILE``).

One line per call: its item index, label, status, start/end (event-loop seconds), each
attempt (start, end, status, error type, whether it was a 429 or a hedge), tokens and
cost. Error messages are kept short and never hold secrets (fanflow's errors never do).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._exceptions import ConfigError
from .._progress import CacheCounts, _is_429
from .._types import CallRecord, elapsed, work_of
from ..store._lock import job_file_stem
from ._settings import for_cli

__all__ = [
    "AttemptRow",
    "CallRow",
    "RecordsWriter",
    "item_fields",
    "job_records_path",
    "legacy_job_records_path",
    "read_records",
    "record_to_json",
]


def job_records_path(store_path: str | Path, job: str) -> Path:
    """Where a job's call records live: ``records/<job>.jsonl`` beside the store file.

    Distinct job names get distinct files (``x/y`` and ``x_y`` too): names that are not
    plain file names get a hash of the exact name (:func:`fanflow.store._lock.job_file_stem`;
    docs/decisions/0098).
    """
    return _records_dir(store_path) / f"{job_file_stem(job)}.jsonl"


def legacy_job_records_path(store_path: str | Path, job: str) -> Path:
    """Where earlier fanflow versions kept a job's records (two names could share it)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job)
    return _records_dir(store_path) / f"{safe}.jsonl"


def _records_dir(store_path: str | Path) -> Path:
    return Path(store_path).parent / "records"


def _error_name(error: BaseException | None) -> str | None:
    return None if error is None else type(error).__name__


# How much of an item's input a record keeps (the report's failures table shows it).
INPUT_CHARS = 200


def item_fields(line: int | None, value: Any) -> dict[str, Any]:
    """The item a call answered, as a record keeps it: its line, its ``id`` field (when it
    has one) and the start of its input."""
    item_id = value.get("id") if isinstance(value, dict) else None
    request = getattr(value, "request", None)  # a request line: its body, its custom_id
    if request is not None:
        item_id, value = getattr(value, "custom_id", None), request.body
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return {
        "line": line,
        "id": None if item_id is None else str(item_id),
        "input": text if len(text) <= INPUT_CHARS else text[: INPUT_CHARS - 1] + "…",
    }


def _deployment(record: CallRecord[Any]) -> dict[str, Any] | None:
    """Which deployment of a router answered (name, model, base URL; never the key)."""
    d = record.deployment
    return None if d is None else {"name": d.name, "model": d.model, "base_url": d.base_url}


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
        "cached_input_tokens": record.usage.cached_input_tokens,
        "cache_write_input_tokens": record.usage.cache_write_input_tokens,
        "cache_write_1h_input_tokens": record.usage.cache_write_1h_input_tokens,
        "cost": record.cost,
        "cache_saved": record.cache_saved,
        "cost_estimated": record.cost_estimated,
        "cached": record.cached,
        "batch_id": record.batch_id,
        "deployment": _deployment(record),
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
                "service": a.service,
            }
            for a in record.attempts
        ],
    }


class RecordsWriter:
    """Appends call records to JSONL files as they end (``--records FILE`` and, for a
    job, the job's own records, so ``fanflow report JOB`` sees every run).

    The records are a by-product of the run, never a reason to stop it: if the disk
    fills up, the first failed write is reported once (``warn``) and later records are
    dropped; closing never raises. A torn last line left by such a failure (or by a
    crash) is cut off when a file is opened again to append, as ``JsonlSink`` does.
    """

    def __init__(
        self, *streams: IO[str], paths: Sequence[str] = (), warn: Warn | None = None
    ) -> None:
        self._streams = streams
        self._paths = list(paths) or ["the records file"] * len(streams)
        self._warn: Warn = warn or _log_warning
        self.failed: OSError | None = None
        self.torn_bytes_removed = 0

    @classmethod
    def open(
        cls, path: str | Path, *, append: bool = False, warn: Warn | None = None
    ) -> RecordsWriter:
        return cls.open_many([(path, append)], warn=warn)

    @classmethod
    def open_many(
        cls, targets: Sequence[tuple[str | Path, bool]], *, warn: Warn | None = None
    ) -> RecordsWriter:
        """One writer for several files, each ``(path, append)``."""
        streams: list[IO[str]] = []
        torn = 0
        for path, append in targets:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                torn += _cut_torn_tail(Path(path)) if append else 0
                streams.append(open(path, "a" if append else "w", encoding="utf-8"))  # noqa: SIM115 - closed by close()
            except OSError as exc:
                for stream in streams:
                    stream.close()
                raise ConfigError(f"cannot write {path}: {exc.strerror}; check --records") from None
        writer = cls(*streams, paths=[str(path) for path, _ in targets], warn=warn)
        writer.torn_bytes_removed = torn
        return writer

    def write(self, record: CallRecord[Any], item: Mapping[str, Any] | None = None) -> None:
        if record.cached or self.failed is not None:  # cached: no call was made this run
            return
        line = json.dumps(record_to_json(record, item), ensure_ascii=False) + "\n"
        for stream, path in zip(self._streams, self._paths, strict=True):
            try:
                stream.write(line)
            except OSError as exc:
                self._fail(exc, path)
                return

    def _fail(self, exc: OSError, path: str) -> None:
        if self.failed is None:
            self.failed = exc
            self._warn(
                f"call records could not be written to {path} ({exc.strerror or exc}); "
                "the run goes on without them (fanflow report will miss the later calls)"
            )

    def close(self) -> None:
        for stream, path in zip(self._streams, self._paths, strict=True):
            try:
                stream.close()
            except OSError as exc:  # the last buffered lines did not fit on the disk
                self._fail(exc, path)
                with contextlib.suppress(OSError):
                    stream.close()


Warn = Callable[[str], None]


def _log_warning(text: str) -> None:
    logging.getLogger("fanflow").warning("%s", text)


def _cut_torn_tail(path: Path) -> int:
    """Remove a last line that has no newline (a write cut short); return its length."""
    try:
        f = open(path, "rb+")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return 0
    with f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            if pos == end and chunk.endswith(b"\n"):
                return 0
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                pos = pos - step + newline + 1
                break
            pos -= step
        f.truncate(pos)
        return end - pos


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
    service: float | None = None  # the model's time on it (None: unknown, older files)


@dataclass(frozen=True, slots=True)
class CallRow(CacheCounts):
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
        return elapsed(self.start, self.end)

    @property
    def note(self) -> str | None:
        """The latest attempt's note (why its wait was what it was), if any says one."""
        return next((a.note for a in reversed(self.attempts) if a.note), None)

    @property
    def busy_time(self) -> float | None:
        """The model's time on the call, as :attr:`fanflow.CallRecord.busy_time` counts
        it (None: unknown; a skipped call was never sent: 0)."""
        if self.attempts:
            return work_of(self.attempts)
        if self.status == "skipped":
            return 0.0
        return self.latency or 0.0


def read_records(path: str) -> Iterator[CallRow]:
    """Read a records file written by ``--records``.

    A last line without its newline is a write cut short (a crash, a full disk): it is
    not a record yet and is passed over (the job's next run cuts it off).

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
                        _seconds(a.get("service")),
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
                    cached_input_tokens=int(d.get("cached_input_tokens") or 0),
                    cache_write_input_tokens=int(d.get("cache_write_input_tokens") or 0),
                    cache_write_1h_input_tokens=int(d.get("cache_write_1h_input_tokens") or 0),
                    cache_saved=d.get("cache_saved"),
                    cost_estimated=bool(d.get("cost_estimated")),
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                if not line.endswith("\n") and isinstance(exc, json.JSONDecodeError):
                    return  # a torn last line
                raise ConfigError(
                    f"{path}:{number}: not a fanflow call record ({type(exc).__name__}: {exc}); "
                    "give a file written by --records"
                ) from None


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)
