"""Sinks: stream each item's result to a file as it completes.

:class:`JsonlSink` appends one JSON line per item and flushes it, so a crash leaves at
most one torn last line, which the next run cuts off. Opening an existing file resumes
it: items already there (succeeded) are not written again, and lines of items that did
not succeed are dropped so that their new outcome replaces them; every item ends up in
the file exactly once. :class:`ParquetSink` (extra ``parquet``) writes a Parquet file.

A pattern calls ``open()``, then ``write(record, input_id)`` for each item after the item
is committed to the store (if any), then ``close()``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .._exceptions import ConfigError, StoreError
from .._types import CallRecord, Response, Status

__all__ = ["JsonlSink", "ParquetSink", "Sink", "SinkStatistics", "sink_for"]


@runtime_checkable
class Sink(Protocol):
    """Where a pattern streams its items' results."""

    def open(self) -> None: ...

    def write(self, record: CallRecord[Any], input_id: Any) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SinkStatistics:
    """What a sink did: lines written, items it already had, what it repaired."""

    path: str
    written: int
    already_present: int
    torn_bytes_removed: int
    lines_replaced: int


def _jsonable(value: Any) -> Any:
    if isinstance(value, Response):
        return value.text
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def row_of(record: CallRecord[Any], input_id: Any) -> dict[str, Any]:
    """The fields written for one item (the same for every sink)."""
    error = record.error
    u = record.usage
    usage = {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens}
    if u.cached_input_tokens or u.cache_write_input_tokens:  # the prompt cache was used
        usage["cached_input_tokens"] = u.cached_input_tokens
        usage["cache_write_input_tokens"] = u.cache_write_input_tokens
        usage["cache_write_1h_input_tokens"] = u.cache_write_1h_input_tokens
    return {
        "index": record.index,
        "id": input_id,
        "status": record.status.value,
        "output": record.value,
        "error": f"{type(error).__name__}: {error}" if error is not None else None,
        "usage": usage,
        "cost": record.cost,
        "cached": record.cached,
        "key": record.key,
    }


class _Ordered:
    """Releases rows in index order, skipping indices that are already written."""

    def __init__(self, present: Mapping[int, Any]) -> None:
        self.present = present
        self.next = 0
        self.waiting: dict[int, dict[str, Any]] = {}

    def push(self, index: int, row: dict[str, Any]) -> list[dict[str, Any]]:
        self.waiting[index] = row
        out = []
        while True:
            if self.next in self.waiting:
                out.append(self.waiting.pop(self.next))
            elif self.next not in self.present:
                break
            self.next += 1
        return out

    def rest(self) -> list[dict[str, Any]]:
        """What is still waiting (a run that stopped early): in index order."""
        out = [self.waiting[i] for i in sorted(self.waiting)]
        self.waiting.clear()
        return out


class JsonlSink:
    """Stream results to a JSON Lines file, one flushed line per item.

    Each line holds ``index``, ``id`` (the input's ``id`` field, else its index),
    ``status``, ``output``, ``error``, ``usage``, ``cost``, ``cached`` and ``key`` (the
    request's idempotency key; never a secret). ``usage`` has the prompt cache's counts
    (``cached_input_tokens``, ``cache_write_input_tokens`` and, of those,
    ``cache_write_1h_input_tokens``) when the call used it.

    Args:
        path: the file. If it exists, it is resumed: a torn last line is removed, items
            that succeeded are kept and not written again, other lines are replaced by
            the item's new outcome.
        ordered: write lines in input order (records wait in memory until the items
            before them are done) instead of as they complete.
        overwrite: start the file afresh instead of resuming it.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, ordered: bool = False, overwrite: bool = False
    ) -> None:
        self.path = Path(path)
        self.ordered = ordered
        self.overwrite = overwrite
        self._file: Any = None
        self._present: dict[int, str | None] = {}
        self._order: _Ordered | None = None
        self._written = 0
        self._skipped = 0
        self._torn = 0
        self._replaced = 0

    def __repr__(self) -> str:
        return f"fanflow.JsonlSink({str(self.path)!r}, ordered={self.ordered})"

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(
            str(self.path), self._written, self._skipped, self._torn, self._replaced
        )

    def open(self) -> None:
        """Open the file, repairing and resuming it if it exists."""
        if self._file is not None:
            return
        try:
            if self.path.parent != Path():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.overwrite and self.path.exists():
                self._resume()
            mode = "w" if self.overwrite else "a"
            self._file = open(self.path, mode, encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise StoreError(
                f"cannot write the output file {self.path} ({exc}); check that its folder "
                "exists and is writable, or choose another path",
                path=str(self.path),
            ) from exc
        self._order = _Ordered(self._present) if self.ordered else None

    def _resume(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A crash mid-write: everything after the last newline is a torn line.
            cut = data.rfind(b"\n") + 1
            self._torn = len(data) - cut
            data = data[:cut]
        keep: list[bytes] = []
        dropped = 0
        for line in data.splitlines(keepends=True):
            try:
                row = json.loads(line)
                index = int(row["index"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if row.get("status") != Status.SUCCEEDED.value or index in self._present:
                dropped += 1
                continue
            self._present[index] = row.get("key")
            keep.append(line)
        self._replaced = dropped
        if dropped or self._torn:
            # Rewrite atomically: a crash now leaves either the old or the new file.
            tmp = self.path.with_name(self.path.name + ".repair")
            with open(tmp, "wb") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def write(self, record: CallRecord[Any], input_id: Any) -> None:
        """Write one item's line (unless the file already has it) and flush it."""
        if self._file is None:
            raise StoreError(f"{self!r} is not open; call open() first", path=str(self.path))
        index = record.index
        if index is None:
            raise ConfigError("a sink needs records with an item index")
        if index in self._present:
            have = self._present[index]
            if have is not None and record.key is not None and have != record.key:
                raise StoreError(
                    f"{self.path} already holds item {index} of a different input (another "
                    "prompt or item); write to a new file, or pass overwrite=True",
                    path=str(self.path),
                )
            self._skipped += 1
            return
        row = row_of(record, input_id)
        if self._order is None:
            self._emit(row)
        else:
            for ready in self._order.push(index, row):
                self._emit(ready)

    def _emit(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n"
        self._file.write(line)
        self._file.flush()
        self._written += 1

    def close(self) -> None:
        """Write what still waits for its turn (ordered), and close the file."""
        if self._file is None:
            return
        try:
            if self._order is not None:
                for row in self._order.rest():
                    self._emit(row)
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlSink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ParquetSink:
    """Write results to a Parquet file (needs ``pip install 'fanflow[parquet]'``).

    Rows are written in row groups as they arrive, to ``<path>.partial``, which is
    renamed to ``path`` on close. Parquet files cannot be appended to, so a resumed
    job rewrites the whole file (items that finished before come from the store).

    Args:
        path: the ``.parquet`` file.
        ordered: write rows in input order.
        row_group_size: rows per row group (memory holds at most this many).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, ordered: bool = False, row_group_size: int = 10_000
    ) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                "ParquetSink needs pyarrow; install it with: pip install 'fanflow[parquet]'"
            ) from None
        if row_group_size < 1:
            raise ConfigError(f"row_group_size must be >= 1, got {row_group_size}")
        self.path = Path(path)
        self.ordered = ordered
        self.row_group_size = row_group_size
        self._rows: list[dict[str, Any]] = []
        self._writer: Any = None
        self._order: _Ordered | None = None
        self._written = 0
        self._open = False

    def __repr__(self) -> str:
        return f"fanflow.ParquetSink({str(self.path)!r}, ordered={self.ordered})"

    @property
    def _partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    def open(self) -> None:
        self._open = True
        self._order = _Ordered({}) if self.ordered else None

    def write(self, record: CallRecord[Any], input_id: Any) -> None:
        if not self._open:
            raise StoreError(f"{self!r} is not open; call open() first", path=str(self.path))
        row = row_of(record, input_id)
        usage = row.pop("usage")
        row["input_tokens"] = usage["input_tokens"]
        row["output_tokens"] = usage["output_tokens"]
        output = row["output"]
        row["output"] = (
            output
            if isinstance(output, str) or output is None
            else json.dumps(output, ensure_ascii=False, default=_jsonable)
        )
        row["id"] = None if input_id is None else str(input_id)
        if self._order is None:
            self._rows.append(row)
        else:
            assert record.index is not None
            self._rows.extend(self._order.push(record.index, row))
        if len(self._rows) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=_parquet_schema())
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self._partial), table.schema)
        self._writer.write_table(table)
        self._written += len(self._rows)
        self._rows.clear()

    def close(self) -> None:
        """Write the rows still buffered and move the finished file into place."""
        if not self._open:
            return
        self._open = False
        if self._order is not None:
            self._rows.extend(self._order.rest())
        self._flush()
        if self._writer is None:  # no rows at all: still leave a valid, empty file
            import pyarrow.parquet as pq

            pq.write_table(_parquet_schema().empty_table(), str(self._partial))
        else:
            self._writer.close()
            self._writer = None
        os.replace(self._partial, self.path)

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(str(self.path), self._written, 0, 0, 0)


def _parquet_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("index", pa.int64()),
            ("id", pa.string()),
            ("status", pa.string()),
            ("output", pa.string()),
            ("error", pa.string()),
            ("input_tokens", pa.int64()),
            ("output_tokens", pa.int64()),
            ("cost", pa.float64()),
            ("cached", pa.bool_()),
            ("key", pa.string()),
        ]
    )


def sink_for(target: Sink | str | os.PathLike[str]) -> Sink:
    """A sink for ``target``: a sink as is, or a path (``.parquet``: Parquet, else JSONL)."""
    if isinstance(target, str | os.PathLike):
        path = Path(target)
        if path.suffix == ".parquet":
            return ParquetSink(path)
        return JsonlSink(path)
    if isinstance(target, Sink):
        return target
    raise ConfigError(
        f"sink must be a path or a sink (fanflow.JsonlSink, fanflow.ParquetSink), "
        f"got {type(target).__name__}"
    )
