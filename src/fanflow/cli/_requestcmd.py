"""``fanflow map FILE`` without ``-p``: the lines are requests, run as they are written.

A thin layer over :func:`fanflow.read_requests` and ``fanflow.as_completed(llm,
requests)``: this module tells whether a file holds requests, streams them as items of
``fanflow map`` (so jobs, resume, records, reports and Ctrl-C work as for a template),
answers each line in its own shape (``_answers.py``; CSV and Parquet rows as for a
template) and prices a dry run per model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from .._exceptions import ConfigError
from .._types import CallRecord
from ..patterns._requests import BadLine, RequestLine, is_request_line, read_requests
from ._answers import answer
from ._io import Item, open_input, result_row

__all__ = ["RequestFile", "describe_models", "sniff"]

Kind = Literal["requests", "items", "empty"]


# Lines looked at to tell a request file from an item file: a first line that is not
# JSON (a broken line) does not decide; the first JSON object among these does.
SNIFF_LINES = 8


def sniff(path: str) -> tuple[Kind, RequestLine | None]:
    """Whether the file holds requests (and its first good one), items, or nothing.

    The first JSON object among its first :data:`SNIFF_LINES` non-blank lines decides:
    a request of either shape means a request file (its bad lines are reported as the
    run reads them); anything else, items for a template.
    """
    if path == "-":
        raise ConfigError(
            "without -p, fanflow map reads ready-made requests from a file; give its path "
            "(standard input takes items for a template: -p 'Summarize: {text}')"
        )
    kind: Kind = "empty"
    with open_input(path) as stream:
        looked = 0
        for raw in stream:
            if not raw.strip():
                continue
            kind, looked = "items", looked + 1
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):
                if looked < SNIFF_LINES:
                    continue
                break
            if is_request_line(value):
                kind = "requests"
            break
    if kind != "requests":
        return kind, None
    first = next(iter(read_requests(path, on_bad=lambda bad: None)), None)
    return kind, first


@dataclass(frozen=True)
class RequestFile:
    """A file of request lines, as ``fanflow map`` items.

    Attributes:
        path: the file.
        max_bytes: the longest line accepted (the provider's request size).
    """

    path: str
    max_bytes: int | None

    def items(self, on_bad: Callable[[BadLine], None]) -> Iterator[Item]:
        """The request lines (as items whose value is the :class:`RequestLine`)."""

        for line in read_requests(self.path, on_bad=on_bad, max_bytes=self.max_bytes):
            assert line.line is not None
            yield Item(line.line, line)

    def count(self) -> int:
        """How many lines are requests (a first pass, for the ETA)."""
        return sum(1 for _ in read_requests(self.path, on_bad=lambda bad: None))

    @staticmethod
    def row(flat: bool) -> Callable[[Item, CallRecord[Any]], Any]:
        """The output row of a line: its answer in its shape, or for CSV and Parquet
        the usual row with the line as written as its ``input``."""
        if not flat:
            return lambda item, record: answer(item.value, record)

        def flat_row(item: Item, record: CallRecord[Any]) -> dict[str, Any]:
            line: RequestLine = item.value
            written = dict(line.request.body or {})
            if line.custom_id is not None:
                written = {"custom_id": line.custom_id, "body": written}
            return result_row(Item(item.line, written), record)

        return flat_row


def describe_models(by_model: dict[str | None, tuple[int, float | None]]) -> list[str]:
    """The lines of a dry run's cost per model."""
    lines = ["  by model:"]
    for model, (calls, cost) in sorted(by_model.items(), key=lambda kv: str(kv[0])):
        price = "unknown (no price)" if cost is None else f"at most ${cost:,.4f}"
        plural = "" if calls == 1 else "s"
        lines.append(f"    {model or '(the handle model)'}: {calls:,} call{plural}, {price}")
    return lines
