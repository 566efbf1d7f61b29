"""Running a validated pipeline: ``Skill`` per step, ``Chain`` or ``Flow``, over the items
with ``Pool`` (a thin adapter: the patterns do the work)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._exceptions import CircuitOpen, ConfigError
from .._llm import BaseLLM
from .._progress import ProgressStats, Tracker
from .._types import Status
from . import _base
from ._console import make_console, require_rich
from ._io import Item, OutputWriter
from ._pipeline import Pipeline
from ._providers import ProviderPlan, open_llms
from ._settings import resolve_settings

__all__ = ["PipelineOutcome", "add_parser", "build_runner", "cmd_run", "run_pipeline"]


def build_runner(pipe: Pipeline, llms: Mapping[str | None, BaseLLM]) -> Any:
    """The ``Chain``/``Flow`` of ``pipe``; ``llms[None]`` is the default model."""
    from ..patterns import Chain, Flow, Skill, Step

    steps = []
    for spec in pipe.steps:
        skill = Skill(
            llms[spec.model],
            spec.prompt,
            system=spec.system,
            name=spec.name,
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
            seed=spec.seed,
        )
        steps.append(Step(skill, spec.output, spec.inputs, name=spec.name, after=spec.after))
    return Chain(steps) if pipe.kind == "chain" else Flow(steps)


@dataclass
class PipelineOutcome:
    interrupted: bool = False
    items: int = 0
    succeeded: int = 0


def _row(item: Item, index: int, result: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": index,
        "line": item.line,
        "input": item.value,
        "status": str(result.status),
        "output": result.output,
        "steps": {s.output: s.value for s in result.steps if s.status is Status.SUCCEEDED},
    }
    if result.error is not None:
        row["error"] = f"{type(result.error).__name__}: {result.error}"
        row["failed_step"] = result.failed_step
    return row


async def run_pipeline(
    pipe: Pipeline,
    runner: Any,
    items: Sequence[Item],
    *,
    tracker: Tracker,
    display: Any,
    writer: OutputWriter,
    pool_options: Mapping[str, Any] | None = None,
) -> PipelineOutcome:
    """Run every item through ``runner`` with :class:`fanflow.patterns.Pool`; write rows."""
    from ..patterns import Pool

    inputs = [i.value if isinstance(i.value, dict) else {"input": i.value} for i in items]
    pool = Pool(runner, inputs, pipe.max_flows, hooks=[tracker], **(pool_options or {}))
    outcome = PipelineOutcome(items=len(items))
    async with _base.driving(tracker, display) as driven:
        result = await pool.arun()
    if driven.interrupted:
        outcome.interrupted = True
        outcome.succeeded = pool.status.succeeded
        return outcome
    for index, (item, run) in enumerate(zip(items, result.items, strict=True)):
        writer.write(_row(item, index, run))
        outcome.succeeded += run.status is Status.SUCCEEDED
    writer.flush()
    return outcome


# -- the command: its arguments and its handler ------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a pipeline (steps over items) from a YAML file")
    p.add_argument("pipeline", metavar="PIPELINE.yaml", help="the pipeline file")
    p.add_argument("input", metavar="INPUT", nargs="?", help="the items (default: the file's)")
    p.add_argument("--check", action="store_true", help="validate the pipeline and stop")
    job = p.add_argument_group("resumable jobs (a SQLite store, --store or FANFLOW_STORE)")
    job.add_argument("--job", metavar="NAME", help="record items under NAME; rerun to resume")
    job.add_argument("--resume", action="store_true", help="continue job NAME (must exist)")
    p.set_defaults(only_failed=False)
    _base.io_options(p)
    _base.model_options(p)
    _base.common_options(p)
    p.set_defaults(handler=cmd_run)


# How many items the field check looks at: a field none of them has is a typo or a
# missing step, not an odd item.
SAMPLE = 100


def input_keys(items: Sequence[Item]) -> list[str]:
    """The fields the items provide (``input`` for text lines), in order of first use."""
    keys: dict[str, None] = {}
    for item in items:
        value = item.value
        keys.update(dict.fromkeys(value if isinstance(value, dict) else ("input",)))
    return list(keys)


def cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._io import detect_format, open_output, read_items
    from ._pipeline import check_fields, load_pipeline

    pipe = load_pipeline(args.pipeline)
    flags = {k: v for k, v in _base.flags(args).items() if v is not None}
    base = _base.fit_open_files(
        args, resolve_settings({**pipe.settings, **flags}, env=env, config=args.config)
    )
    plans: dict[str | None, ProviderPlan] = {None: _base.plan(args, env, base)}
    for name, spec in pipe.models.items():
        merged = _base.fit_open_files(
            args, resolve_settings({**pipe.settings, **spec, **flags}, env=env, config=args.config)
        )
        plans[name] = _base.plan(args, env, merged, routed=False)  # its own model
    source = args.input or pipe.input
    if source is None:
        raise ConfigError(
            f"{pipe.path}: no input; give INPUT after the pipeline or set 'input:' in the file"
        )
    fmt = detect_format(source, args.input_format)
    if args.check and source != "-" and not os.path.isfile(source):
        print(
            f"fanflow: {pipe.path} is valid: {len(pipe.steps)} steps ({pipe.kind}); its "
            f"prompts' fields were not checked against the input ({source} not found)"
        )
        return _base.EXIT_OK
    bad = _base.Bad()
    items = list(read_items(source, fmt, bad))
    if items:  # every field of every prompt must be given, before any call is sent
        check_fields(pipe, input_keys(items[:SAMPLE]))
    if args.check:
        print(f"fanflow: {pipe.path} is valid: {len(pipe.steps)} steps ({pipe.kind})")
        return _base.EXIT_OK
    require_rich()
    store = _base.open_store(base, args) if args.job else None
    pool_options: dict[str, Any] = {"store": store, "job": args.job} if store is not None else {}
    if base.budget is not None:
        pool_options["budget"] = base.budget  # one cap over every call of the run
    prices = _base.prices(args)
    if prices:
        pool_options["prices"] = prices
    writer = open_output(args.output or pipe.output)
    console = make_console()

    async def go() -> tuple[Any, ProgressStats]:
        tracker = Tracker(len(items) * len(pipe.steps), clock=_base.loop_time)
        display = _base.display(args, console, tracker, bad)
        async with open_llms(list(plans.values())) as llms:
            runner = build_runner(pipe, dict(zip(plans, llms, strict=True)))
            outcome = await run_pipeline(
                pipe, runner, items, tracker=tracker, display=display, writer=writer,
                pool_options=pool_options,
            )  # fmt: skip
            stops.extend(_base.tripped(llms))
        return outcome, tracker.snapshot()

    stops: list[CircuitOpen] = []
    outcome, stats = _base.run_then_close(go, args, console, writer, store)
    if stops and not outcome.interrupted:
        return _base.stopped(args, console, stats, stops)
    return _base.finish(
        args, console, stats, bad, interrupted=outcome.interrupted,
        failed=outcome.items - outcome.succeeded, items=outcome.items, unit="calls",
        resume=_base.resume_hint(args),
        empty=("standard input" if source == "-" else source) if not items else None,
    )  # fmt: skip
