"""``fanflow map``: a prompt over every item of a file, results to JSONL or Parquet.

A thin adapter over :func:`fanflow.as_completed`: the engine does admission, retries and
timeouts; this module reads items, writes rows (in input order by default, through a
small reorder buffer), and feeds the engine's events to the progress display.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .._exceptions import ConfigError
from .._llm import BaseLLM
from .._types import CallRecord
from ..patterns import as_completed
from ._io import Item, OutputWriter, result_row
from ._progress import LiveDisplay, PlainDisplay, QuietDisplay, Tracker, drive
from ._records import RecordsWriter

__all__ = ["MapOutcome", "check_template", "run_map"]


def check_template(template: str) -> None:
    """Reject a template that no item could fill (unbalanced braces), before any call."""
    if not template.strip():
        raise ConfigError("--prompt is empty; give a template such as 'Summarize: {text}'")
    try:
        list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"--prompt is not a valid template ({exc}); name fields as {{field}} and "
            "write {{ and }} for literal braces"
        ) from None


@dataclass
class MapOutcome:
    """How the run ended."""

    interrupted: bool = False
    written: int = 0
    not_run: int = 0


async def run_map(
    llm: BaseLLM,
    prompt: str,
    items: Iterator[Item],
    *,
    tracker: Tracker,
    display: LiveDisplay | PlainDisplay | QuietDisplay,
    writer: OutputWriter,
    records: RecordsWriter | None = None,
    order: str = "input",
    options: dict[str, Any] | None = None,
) -> MapOutcome:
    """Run ``prompt`` over ``items`` and write one row per item.

    Ctrl-C (cancellation of this task) stops cleanly: calls in flight are cancelled by
    the stream, every finished row is written, and the outcome says it was interrupted.
    """
    pending: dict[int, Item] = {}
    ready: dict[int, dict[str, Any]] = {}
    next_row = 0
    outcome = MapOutcome()

    def values() -> Iterator[Any]:
        for index, item in enumerate(items):
            pending[index] = item
            yield item.value

    hooks: list[Callable[[Any], None]] = [tracker]
    if records is not None:
        from .._events import CallEnded

        rec = records

        def keep(event: Any) -> None:
            if isinstance(event, CallEnded):
                rec.write(event.record)

        hooks.append(keep)

    def deliver(record: CallRecord[Any]) -> None:
        nonlocal next_row
        assert record.index is not None
        row = result_row(pending.pop(record.index), record)
        if order == "completion":
            writer.write(row)
            return
        ready[record.index] = row
        while next_row in ready:
            writer.write(ready.pop(next_row))
            next_row += 1

    driver = asyncio.ensure_future(drive(display))
    try:
        async with as_completed(llm, prompt, values(), hooks=hooks, **(options or {})) as stream:
            async for record in stream:
                deliver(record)
    except asyncio.CancelledError:
        # Only the Ctrl-C of asyncio.run cancels us: stop here and report, don't re-raise.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        outcome.interrupted = True
    finally:
        tracker.stop()
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        # Rows that finished after a still-missing earlier one: keep them (no lost work).
        for index in sorted(ready):
            writer.write(ready.pop(index))
        writer.flush()
    outcome.written = writer.written
    outcome.not_run = len(pending)
    return outcome


@dataclass
class DryRun:
    """What ``fanflow map --dry-run`` found: the library's estimate plus input problems."""

    estimate: Any
    template_errors: list[str]


def dry_run(llm: BaseLLM, prompt: str, items: Iterator[Item], options: dict[str, Any]) -> DryRun:
    """Estimate a map with :func:`fanflow.estimate` (nothing is sent).

    Items whose template cannot be filled are counted apart, as the run would fail them.
    """
    from ..patterns import estimate
    from ..patterns._prompt import render

    errors: list[str] = []

    def fillable() -> Iterator[Any]:
        for index, item in enumerate(items):
            try:
                render(prompt, item.value, index)
            except Exception as exc:
                errors.append(f"line {item.line}: {exc}")
                continue
            yield item.value

    params = {k: options[k] for k in ("system", "temperature") if k in options}
    return DryRun(estimate(llm, prompt, fillable(), **params), errors)


def describe_dry_run(
    result: DryRun, *, model: str | None, rpm: float | None, tpm: float | None
) -> list[str]:
    """The lines ``--dry-run`` prints."""
    from ._progress import format_duration

    e = result.estimate
    lines = [f"dry run: {e.items:,} calls would be sent (one per item, before retries)"]
    lines.append(f"  input tokens   ~{e.input_tokens:,} (estimated)")
    lines.append(f"  output tokens  at most {e.output_tokens:,} (max_tokens per call)")
    if e.cost is None:
        unpriced = ", ".join(repr(m) for m in e.unpriced_models) or repr(model)
        lines.append(f"  cost           unknown: no price for model {unpriced}")
    else:
        lines.append(f"  cost           at most ${e.cost:,.4f} (model {model})")
        if e.batch_cost is not None:
            lines.append(
                f"  batch cost     at most ${e.batch_cost:,.4f} with --batch "
                f"(saves ${e.cost - e.batch_cost:,.4f}; answers within 24 h)"
            )
    bounds = []
    if rpm:
        bounds.append(e.items / rpm * 60.0)
    if tpm:
        bounds.append(e.total_tokens / tpm * 60.0)
    if bounds:
        lines.append(f"  duration       at least {format_duration(max(bounds))} at these limits")
    if result.template_errors:
        lines.append(f"  {len(result.template_errors)} items would fail (template):")
        lines.extend(f"    {text}" for text in result.template_errors[:10])
    return lines
