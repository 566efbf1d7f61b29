"""Reading items from files and writing results.

Inputs: JSONL (one JSON object or string per line), CSV (a header row, then one item per
row) or plain text (one item per line); ``-`` reads standard input, which is JSONL when its
first line is a JSON object and text otherwise (``--input-format`` decides when given).
A malformed line or row is reported as ``file:line: reason``, counted and skipped: it
never stops the run.

Outputs, by the extension of ``-o``: JSONL (the default, to standard output; ``.jsonl``,
``.ndjson``, ``.json``), CSV (``.csv``) or Parquet (``.parquet``, needs ``pyarrow``); any
other extension is refused. Each output row says which item it answers (``index``, ``line``), its
``status``, its ``output`` and, when it failed, its ``error``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from .._exceptions import ConfigError, StoreError
from .._types import CallRecord
from ..patterns._requests import BadLine

__all__ = [
    "FLAT_COLUMNS",
    "FORMATS",
    "OUTPUT_FORMATS",
    "SNIFF",
    "BadLine",
    "Item",
    "OutputWriter",
    "count_items",
    "detect_format",
    "flat_row",
    "open_input",
    "open_output",
    "output_format",
    "read_items",
    "result_row",
]

FORMATS = ("jsonl", "csv", "text")
# Standard input without --input-format: JSONL if its first line is a JSON object, else text.
SNIFF = "sniff"

# Stands for "standard output as it is at the time of the write".
_STDOUT: IO[str] = io.StringIO()

_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class Item:
    """One input item and the line it came from (1-based)."""

    line: int
    value: Any


def detect_format(path: str, explicit: str | None) -> str:
    """The input format: ``explicit`` if given, else from the file's extension."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise ConfigError(f"unknown input format {explicit!r}; use one of {', '.join(FORMATS)}")
        return explicit
    if path == "-":
        return SNIFF
    return _EXTENSIONS.get(Path(path).suffix.lower(), "text")


def open_input(path: str) -> IO[bytes] | TextIO:
    if path == "-":
        # Bytes when there are any (so each line is decoded on its own); a replaced
        # sys.stdin without a buffer (tests, embedding) is read as the text it is.
        return getattr(sys.stdin, "buffer", sys.stdin)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ConfigError(f"input file {path} not found; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"input {path} is a directory; give a JSONL, CSV or text file") from None
    except OSError as exc:
        raise ConfigError(f"input file {path} cannot be read: {exc.strerror}") from None


class _Lines:
    """The lines of an input, decoded one by one, with their numbers (1-based).

    Each line is decoded on its own, so a line that is not UTF-8 is reported (by its
    number, with the byte offset of the bad byte) and skipped, and the lines after it
    are read as usual. A UTF-8 byte-order mark at the start of the file is dropped.
    ``number`` is the number of the line last handed out; ``first`` the number of the
    first line handed out since it was last reset (the CSV reader uses it to name the
    line where a multi-line row starts). Lines read ahead (``head``) are handed out first.
    """

    def __init__(
        self, stream: IO[bytes] | TextIO, name: str, on_bad: Callable[[BadLine], None]
    ) -> None:
        self._stream = stream
        self._name = name
        self._on_bad = on_bad
        self._read = 0
        self._ahead: list[tuple[int, str]] = []
        self.number = 0
        self.first: int | None = None

    def _decoded(self) -> Iterator[tuple[int, str]]:
        for raw in self._stream:
            self._read += 1
            if isinstance(raw, bytes):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    reason = f"is not UTF-8 text (byte {exc.start + 1} of the line: {exc.reason})"
                    self._on_bad(BadLine(self._name, self._read, reason))
                    continue
            else:
                line = raw
            if self._read == 1:
                line = line.removeprefix("\ufeff")
            yield self._read, line

    def head(self) -> list[str]:
        """Read up to the first non-blank line (kept to be handed out again)."""
        for number, line in self._decoded():
            self._ahead.append((number, line))
            if line.strip():
                break
        return [line for _, line in self._ahead]

    def __iter__(self) -> Iterator[str]:
        for number, line in itertools.chain(self._ahead, self._decoded()):
            self.number = number
            if self.first is None:
                self.first = number
            yield line


def _jsonl(lines: _Lines, name: str, on_bad: Callable[[BadLine], None]) -> Iterator[Item]:
    for line in lines:
        number = lines.number
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            # json's own messages may end in "at" ("Invalid control character at").
            reason = exc.msg.removesuffix(" at")
            on_bad(BadLine(name, number, f"not valid JSON ({reason} at column {exc.colno})"))
            continue
        except ValueError as exc:  # a number too long to convert, say
            on_bad(BadLine(name, number, f"not valid JSON ({exc})"))
            continue
        except RecursionError:
            on_bad(BadLine(name, number, "not valid JSON (nested too deeply)"))
            continue
        if not isinstance(value, dict | str):
            kind = type(value).__name__
            on_bad(BadLine(name, number, f"expected a JSON object or string, got {kind}"))
            continue
        yield Item(number, value)


def _csv(lines: _Lines, name: str, on_bad: Callable[[BadLine], None]) -> Iterator[Item]:
    reader = csv.reader(lines)
    header: list[str] | None = None
    while True:
        lines.first = None  # a quoted field may span lines: report the first
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            on_bad(BadLine(name, lines.first or lines.number, f"not valid CSV ({exc})"))
            continue
        start = lines.first or lines.number
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            continue
        if len(row) != len(header):
            on_bad(BadLine(name, start, f"has {len(row)} fields but the header has {len(header)}"))
            continue
        yield Item(start, dict(zip(header, row, strict=True)))


def _text(lines: _Lines, name: str, on_bad: Callable[[BadLine], None]) -> Iterator[Item]:
    del name, on_bad  # every non-blank line is an item
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip():
            yield Item(lines.number, text)


_READERS = {"jsonl": _jsonl, "csv": _csv, "text": _text}


def _sniff(lines: _Lines) -> str:
    """The format of the input (JSONL when its first non-blank line is a JSON object, else
    text); the lines read to decide are handed out again."""
    head = lines.head()
    fmt = "text"
    if head and head[-1].lstrip().startswith("{"):
        try:
            fmt = "jsonl" if isinstance(json.loads(head[-1]), dict) else "text"
        except (ValueError, RecursionError):
            fmt = "jsonl"  # meant as JSON: report the line, don't send it as text
    return fmt


def read_items(path: str, fmt: str, on_bad: Callable[[BadLine], None]) -> Iterator[Item]:
    """Yield the items of ``path`` lazily; report malformed lines to ``on_bad``.

    The file is opened before the first item is asked for, so a missing file is a
    :class:`ConfigError` raised by this call, not later. ``fmt`` may be :data:`SNIFF`.
    A line that is not UTF-8 is reported by its number and skipped like any other
    malformed line.
    """
    stream = open_input(path)
    name = "<stdin>" if path == "-" else path

    def generate() -> Iterator[Item]:
        try:
            lines = _Lines(stream, name, on_bad)
            kind = _sniff(lines) if fmt == SNIFF else fmt
            yield from _READERS[kind](lines, name, on_bad)
        finally:
            if path != "-":
                stream.close()

    return generate()


def count_items(path: str, fmt: str) -> int | None:
    """A cheap first pass to know the total for the ETA (None for standard input)."""
    if path == "-":
        return None
    n = 0
    for _ in read_items(path, fmt, lambda bad: None):
        n += 1
    return n


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    from ._settings import for_cli

    return for_cli(f"{type(error).__name__}: {error}")


def result_row(item: Item, record: CallRecord[Any]) -> dict[str, Any]:
    """The output row of one item."""
    row: dict[str, Any] = {
        "index": record.index,
        "line": item.line,
        "input": item.value,
        "status": str(record.status),
        "output": record.value,
    }
    if record.error is not None:
        row["error"] = _error_text(record.error)
    if record.batch_id is not None:
        row["batch_id"] = record.batch_id
    return row


# The columns of a flat (CSV or Parquet) output row; nested values are JSON text.
FLAT_COLUMNS = ("index", "line", "input", "status", "output", "error")
OUTPUT_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}


def _text_of(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A result row with one scalar per column (:data:`FLAT_COLUMNS`), for CSV and Parquet."""
    return {
        "index": row["index"],
        "line": row["line"],
        "input": json.dumps(row["input"], ensure_ascii=False, default=str),
        "status": row["status"],
        "output": _text_of(row["output"]),
        "error": row.get("error"),
    }


class OutputWriter:
    """Writes result rows as JSONL, CSV or Parquet."""

    def __init__(
        self, stream: IO[str] | None, parquet: Any = None, path: str = "-", fmt: str = "jsonl"
    ) -> None:
        self._stream = stream
        self._parquet = parquet
        self._csv = csv.DictWriter(stream, FLAT_COLUMNS) if fmt == "csv" and stream else None
        self._rows: list[dict[str, Any]] = []
        self.path = path
        self.written = 0
        if self._csv is not None:
            self._csv.writeheader()

    @property
    def flat(self) -> bool:
        """Whether rows are written flat (CSV, Parquet), as :func:`flat_row` makes them."""
        return self._csv is not None or self._parquet is not None

    def write(self, row: Any) -> None:
        try:
            self._write(row)
        except BrokenPipeError:
            raise  # the reader went away (| head): the command ends quietly
        except OSError as exc:
            raise self._failed(exc) from None
        self.written += 1

    def _failed(self, exc: OSError) -> StoreError:
        where = "standard output" if self._stream is _STDOUT else self.path
        return StoreError(
            f"cannot write the results to {where} ({exc.strerror or exc}); free disk space "
            "(or choose another -o) and run again",
            path=self.path,
        )

    def _write(self, row: Any) -> None:
        if self._csv is not None:
            self._csv.writerow(flat_row(row))
            return
        if self._stream is not None:
            # Standard output is looked up at each write: the live display may route it
            # above its panel while it runs (rich's redirect_stdout).
            stream = sys.stdout if self._stream is _STDOUT else self._stream
            stream.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            return
        self._rows.append(row)
        if len(self._rows) >= 1024:
            self._flush_parquet()

    def _flush_parquet(self) -> None:
        if not self._rows:
            return
        import pyarrow as pa

        rows = [flat_row(r) for r in self._rows]
        self._parquet.write_table(pa.Table.from_pylist(rows, schema=self._parquet.schema))
        self._rows.clear()

    def flush(self) -> None:
        if self._stream is not None:
            (sys.stdout if self._stream is _STDOUT else self._stream).flush()

    def close(self) -> None:
        """Write what is buffered and close the file.

        Raises:
            StoreError: the rest could not be written (a full disk, say).
        """
        try:
            if self._parquet is not None:
                self._flush_parquet()
                self._parquet.close()
            elif self._stream is not None and self._stream is not _STDOUT:
                self._stream.close()
            else:
                self.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise self._failed(exc) from None


def output_format(path: str) -> str:
    """The output format of ``-o path``, from its extension.

    Raises:
        ConfigError: an extension fanflow does not write (rather than writing JSONL in it).
    """
    suffix = Path(path).suffix.lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt is None:
        known = ", ".join(OUTPUT_FORMATS)
        what = f"extension {suffix!r}" if suffix else "no extension"
        raise ConfigError(
            f"-o {path}: {what}; fanflow writes {known} (e.g. -o results.jsonl), or - for "
            "standard output"
        )
    return fmt


def open_output(path: str | None) -> OutputWriter:
    """Open the output: JSONL to standard output (None or ``-``), else by extension."""
    if path is None or path == "-":
        return OutputWriter(_STDOUT)
    fmt = output_format(path)
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                "writing Parquet needs pyarrow: pip install 'fanflow[parquet]' "
                "(or write JSONL: -o results.jsonl)"
            ) from None
        types = {"index": pa.int64(), "line": pa.int64()}
        schema = pa.schema([(c, types.get(c, pa.string())) for c in FLAT_COLUMNS])
        try:
            writer = pq.ParquetWriter(path, schema)
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc}") from None
        return OutputWriter(None, writer, path)
    try:
        # newline="" lets the csv module write its own line ends (RFC 4180).
        newline = "" if fmt == "csv" else None
        stream = open(path, "w", encoding="utf-8", newline=newline)  # noqa: SIM115 - closed by the writer
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}; check the -o path") from None
    return OutputWriter(stream, path=path, fmt=fmt)
