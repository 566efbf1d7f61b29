"""``fanflow map``: a prompt over every item of a file, results to JSONL or Parquet.

A thin adapter over :func:`fanflow.as_completed`: the engine does admission, retries and
timeouts; this module reads items, writes rows (in input order by default, through a
small reorder buffer), and feeds the engine's events to the progress display.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import CircuitOpen, ConfigError, TemplateError
from .._llm import BaseLLM
from .._progress import LiveDisplay, PlainDisplay, ProgressStats, QuietDisplay, Tracker
from .._types import CallRecord
from ..patterns import as_completed
from ..patterns._prompt import Prompt
from ..patterns._requests import ready_request
from . import _base
from ._console import make_console, require_rich
from ._io import Item, OutputWriter, result_row
from ._providers import ProviderPlan, open_llms
from ._records import RecordsWriter, item_fields
from ._requestcmd import RequestFile, describe_models, sniff
from ._settings import Settings

__all__ = ["MapOutcome", "add_parser", "check_template", "cmd_map", "run_map"]


def check_template(template: str) -> None:
    """Reject a template that is not valid (fanflow's template rules), before any call."""
    from ..patterns._prompt import parse_template

    if not template.strip():
        raise ConfigError("--prompt is empty; give a template such as 'Summarize: {text}'")
    try:
        parse_template(template, "--prompt")
    except TemplateError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class MapOutcome:
    """How the run ended."""

    interrupted: bool = False
    written: int = 0
    not_run: int = 0


async def run_map(
    llm: BaseLLM,
    prompt: Prompt,
    items: Iterator[Item],
    *,
    tracker: Tracker,
    display: LiveDisplay | PlainDisplay | QuietDisplay,
    writer: OutputWriter,
    records: RecordsWriter | None = None,
    order: str = "input",
    options: dict[str, Any] | None = None,
    row: Callable[[Item, CallRecord[Any]], Any] = result_row,
) -> MapOutcome:
    """Run ``prompt`` over ``items`` and write one row per item (``row`` makes it).

    Ctrl-C (cancellation of this task) stops cleanly: calls in flight are cancelled by
    the stream, every finished row is written, and the outcome says it was interrupted.
    """
    pending: dict[int, Item] = {}
    ready: dict[int, Any] = {}
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
                item = pending.get(event.record.index) if event.record.index is not None else None
                rec.write(event.record, item_fields(item.line, item.value) if item else None)

        hooks.append(keep)

    def deliver(record: CallRecord[Any]) -> None:
        nonlocal next_row
        assert record.index is not None
        made = row(pending.pop(record.index), record)
        if order == "completion":
            writer.write(made)
            return
        ready[record.index] = made
        while next_row in ready:
            writer.write(ready.pop(next_row))
            next_row += 1

    try:
        async with _base.driving(tracker, display) as run:
            stream = as_completed(llm, prompt, values(), hooks=hooks, **(options or {}))
            async with stream as finished:
                async for record in finished:
                    deliver(record)
        outcome.interrupted = run.interrupted
    finally:
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

    params = {k: options[k] for k in ("system", "temperature", "prices") if k in options}
    return DryRun(estimate(llm, prompt, fillable(), **params), errors)


def dry_run_requests(llm: BaseLLM, items: Iterator[Item], options: dict[str, Any]) -> DryRun:
    """Estimate a file of ready-made requests (each priced at its own model's price)."""
    from ..patterns import estimate

    prices = {k: options[k] for k in ("prices",) if k in options}
    values = (item.value for item in items)
    return DryRun(estimate(llm, ready_request, values, **prices), [])


# How a dry run says a router's or cascade's items were priced (decision 0270).
_PLANNED = {
    "spread": (
        "spread over the deployments by weight",
        "all on the cheapest to all on the dearest",
    ),
    "fallback": ("all on the first deployment", "all on the cheapest to all on the dearest"),
    "cascade": (
        "if the first tier's answers are all kept",
        "the first tier alone to every tier asked",
    ),
}


def describe_dry_run(
    result: DryRun,
    *,
    model: str | None,
    rpm: float | None,
    tpm: float | None,
    routing: str | None = None,
) -> list[str]:
    """The lines ``--dry-run`` prints (``routing``: spread, fallback or cascade, for
    deployments)."""
    from .._progress import format_duration

    e = result.estimate
    calls = e.items if e.calls is None else e.calls
    each = "one per item" if calls == e.items else f"{calls // max(e.items, 1)} per item"
    lines = [f"dry run: {calls:,} calls would be sent ({each}, before retries)"]
    lines.append(f"  input tokens   ~{e.input_tokens:,} (estimated)")
    lines.append(f"  output tokens  at most {e.output_tokens:,} (max_tokens per call)")
    if e.cost is None:
        unpriced = ", ".join(repr(m) for m in e.unpriced_models) or repr(model)
        lines.append(
            f"  cost           unknown: no price for model {unpriced} (give one: "
            "--price MODEL=IN/OUT)"
        )
    elif routing is not None:
        lines += _routed_cost(e, routing)
    else:
        lines.append(f"  cost           at most ${e.cost:,.4f} (model {model})")
        if e.cached_cost is not None:
            lines.append(
                f"  with the cache at most ${e.cached_cost:,.4f}: the calls share a prefix "
                f"of ~{e.cached_prefix_tokens:,} tokens, read from the prompt cache after "
                "the first"
            )
        if e.batch_cost is not None:
            lines.append(
                f"  batch cost     at most ${e.batch_cost:,.4f} with --batch "
                f"(saves ${e.cost - e.batch_cost:,.4f}; answers within 24 h)"
            )
        if e.batch_cost is not None and e.batch_cached_cost is not None:
            lines.append(
                f"  with the cache about ${e.batch_cached_cost:,.4f}: the first line writes "
                "the prefix, the others read it (best effort in a batch)"
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


def _routed_cost(e: Any, routing: str) -> list[str]:
    """A router's or cascade's priced dry run: the plan, its range, each deployment's part."""
    planned, spans = _PLANNED[routing]
    lines = [f"  cost           at most ${e.cost:,.4f} ({planned})"]
    if e.cost_range is not None:
        low, high = e.cost_range
        lines.append(f"  cost range     ${low:,.4f} to ${high:,.4f} ({spans})")
    for name, (n, cost) in e.by_deployment.items():
        priced = "unknown" if cost is None else f"${cost:,.4f}"
        lines.append(f"    {name}: {n:,} calls, {priced}")
    if e.batch_cost is not None:
        lines.append(f"  batch cost     at most ${e.batch_cost:,.4f} with --batch")
    return lines


# -- the command: its arguments and its handler ------------------------------------------
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``45m``, ``6h`` or ``1d``."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write e.g. 90s, 45m or 6h"
        ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a deadline must be > 0")
    return seconds


def add_parser(sub: Any) -> None:
    p = sub.add_parser("map", help="run a prompt over every item of a file")
    p.add_argument(
        "input", metavar="INPUT", help="JSONL, CSV or text file (one item a line); - for stdin"
    )
    p.add_argument(
        "-p", "--prompt",
        help="template, e.g. 'Summarize: {text}' ({input} for text lines); leave it out "
        "when the lines are requests (Batch API input lines, chat-completions bodies)",
    )  # fmt: skip
    _base.io_options(p)
    p.add_argument(
        "--order", choices=("input", "completion"), default="input", help="order of output rows"
    )
    p.add_argument(
        "--records", metavar="PATH", help="also write every call record (for fanflow report)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print expected calls, tokens and cost; send nothing"
    )
    p.add_argument(
        "--prime", action=argparse.BooleanOptionalAction, default=None,
        help="send the first item alone so the others read the prompt prefix it caches "
        "(default: when the items share a prefix the model caches)",
    )  # fmt: skip
    job = p.add_argument_group("resumable jobs (a SQLite store, --store or FANFLOW_STORE)")
    job.add_argument("--job", metavar="NAME", help="record items under NAME; rerun to resume")
    job.add_argument("--resume", action="store_true", help="continue job NAME (must exist)")
    job.add_argument("--only-failed", action="store_true", help="rerun only NAME's failures")
    batch = p.add_argument_group(
        "provider batch APIs (OpenAI Batch API, Anthropic Message Batches)"
    )
    batch.add_argument(
        "--batch", action="store_true",
        help="send the items through the provider's batch API at its batch price (about "
        "half); results usually within hours, at most 24 h",
    )  # fmt: skip
    batch.add_argument(
        "--deadline", metavar="DURATION", type=_duration,
        help="with --batch: finish by then (e.g. 90s, 45m, 6h); what the batches have not "
        "answered as it nears goes in real time",
    )  # fmt: skip
    scale = p.add_argument_group("scale-out on Ray (pip install 'fanflow[ray]')")
    scale.add_argument(
        "--backend", choices=("local", "ray"), default="local",
        help="run the calls here (default) or on Ray workers, under one limit for all",
    )  # fmt: skip
    scale.add_argument(
        "--ray-address", metavar="ADDR",
        help="join this Ray cluster (implies --backend ray; default: RAY_ADDRESS, else a "
        "local Ray instance is started)",
    )  # fmt: skip
    _base.model_options(p)
    _base.common_options(p)
    p.set_defaults(handler=cmd_map)


def cmd_map(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._io import count_items, detect_format, open_output, read_items
    from ._records import RecordsWriter, job_records_path

    require_rich()
    settings = _base.settings(args, env)
    if args.prompt is None:  # the lines are requests
        settings = _request_settings(args, settings)
    else:
        check_template(args.prompt)
    fmt = detect_format(args.input, args.input_format)
    plan = _base.plan(args, env, settings)
    options: dict[str, Any] = {}
    for name in ("system", "temperature"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    prices = _base.prices(args)
    if prices:
        options["prices"] = prices
    source = None if args.prompt is not None else RequestFile(args.input, _max_bytes(plan))
    if args.dry_run:
        return _dry_run(args, plan, fmt, options, source)
    total = count_items(args.input, fmt) if source is None else source.count()
    bad = _base.Bad()
    console = make_console()
    if settings.budget is not None:
        options["budget"] = settings.budget
    store = _base.open_store(settings, args) if args.job else None
    if store is not None:
        options.update(store=store, job=args.job, only_failed=args.only_failed)
    targets: list[tuple[str | Path, bool]] = []
    if args.records:
        targets.append((args.records, False))
    if store is not None:  # the job's own records too, so `fanflow report JOB` has this run
        targets.append((job_records_path(store.location, args.job), True))

    def warn(text: str) -> None:
        console.print(f"fanflow: {text}", markup=False)

    records = RecordsWriter.open_many(targets, warn=warn) if targets else None
    writer = open_output(args.output)
    prompt: Prompt = args.prompt if source is None else ready_request
    row = result_row if source is None else source.row(writer.flat)
    if settings.concurrency is not None and not plan.settings.model_limits:
        # (With --model-limits it is the handle's, each model's lane holding its own.)
        options["concurrency"] = settings.concurrency
    if args.backend == "ray" or args.ray_address is not None:
        from ..backends import RayBackend

        options["backend"] = RayBackend(address=args.ray_address)
    if args.deadline is not None and not args.batch:
        raise ConfigError("--deadline goes with --batch (it says when to move to real time)")
    if args.prime is not None:
        options["prime"] = args.prime
    if args.batch:
        options["mode"] = "batch" if args.deadline is None else "auto"
        if args.deadline is not None:
            options["deadline"] = args.deadline

    async def go() -> tuple[Any, ProgressStats]:
        tracker = Tracker(total, clock=_base.loop_time)
        display = _base.display(args, console, tracker, bad)
        items = read_items(args.input, fmt, bad) if source is None else source.items(bad)
        async with open_llms([plan]) as llms:
            outcome = await run_map(
                llms[0], prompt, items, tracker=tracker, display=display, writer=writer,
                records=records, order=args.order, options=options, row=row,
            )  # fmt: skip
            stops.extend(_base.tripped(llms))
        return outcome, tracker.snapshot()

    stops: list[CircuitOpen] = []
    outcome, stats = _base.run_then_close(go, args, console, writer, records, store)
    if stops and not outcome.interrupted:
        return _base.stopped(args, console, stats, stops)
    where = "standard output" if args.output in (None, "-") else args.output
    return _base.finish(
        args, console, stats, bad, interrupted=outcome.interrupted, failed=stats.failed,
        items=stats.done, where=where, resume=_base.resume_hint(args), finished=outcome.written,
        empty=_input_name(args.input) if outcome.written == 0 else None,
    )  # fmt: skip


def _request_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """Without ``-p``: check the lines are requests; the first line's model is the
    handle's when ``--model`` gives none (each line is still sent to its own model)."""
    kind, first = sniff(args.input)
    if kind == "items":
        raise ConfigError(
            f"-p/--prompt is needed: the lines of {args.input} are items, not requests (a "
            "request line has custom_id and body, as the Batch API takes, or is a "
            "chat-completions body with messages); give a template, e.g. -p 'Summarize: {text}'"
        )
    if args.system is not None:
        raise ConfigError(
            "--system applies to a template (-p); ready-made requests carry their own "
            "system messages"
        )
    if settings.model is None and first is not None and first.request.model is not None:
        settings = dataclasses.replace(settings, model=first.request.model)
    return settings


def _max_bytes(plan: ProviderPlan) -> int:
    """The longest request line the plan's provider takes (its batch input limit)."""
    from ..providers._batchapi import AnthropicBatches, OpenAIBatches

    return AnthropicBatches.max_bytes if plan.provider == "anthropic" else OpenAIBatches.max_bytes


def _input_name(path: str) -> str:
    return "standard input" if path == "-" else path


def _dry_run(
    args: argparse.Namespace,
    plan: ProviderPlan,
    fmt: str,
    options: dict[str, Any],
    source: RequestFile | None,
) -> int:
    from ._io import read_items

    bad = _base.Bad()
    items = read_items(args.input, fmt, bad) if source is None else source.items(bad)

    async def go() -> Any:
        async with open_llms([plan]) as llms:  # nothing is sent: the handle fills defaults
            if source is None:
                return dry_run(llms[0], args.prompt, items, options)
            return dry_run_requests(llms[0], items, options)

    result = _base.interrupts(args).run(go)
    s = plan.settings
    model = s.model or plan.provider if source is None else "of each line, below"
    routing = None
    if plan.provider == "router":
        routing = "cascade" if s.cascade is not None else s.route or "spread"
    for line in describe_dry_run(result, model=model, rpm=s.rpm, tpm=s.tpm, routing=routing):
        print(line)
    if source is not None:
        for line in describe_models(dict(result.estimate.by_model)):
            print(line)
    if bad.lines:
        print(f"  {len(bad.lines)} malformed input lines would be skipped")
    return _base.EXIT_FAILED if result.template_errors or bad.lines else _base.EXIT_OK
