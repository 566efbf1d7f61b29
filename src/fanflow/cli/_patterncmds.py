"""``fanflow vote``, ``fanflow fanout`` and ``fanflow best-of``: one pattern, one task.

Thin adapters over :func:`fanflow.patterns.vote`, :func:`~fanflow.patterns.fan_out` and
:func:`~fanflow.patterns.best_of_n`: the answer goes to standard output (``--json`` for
every detail), progress and the summary to standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .._events import Hook
from .._exceptions import AllFailed, CircuitOpen, ConfigError, QuorumNotMet
from .._llm import BaseLLM
from .._progress import ProgressStats, Tracker, render_summary
from .._types import CallRecord
from .._util import given
from . import _base
from ._console import make_console, require_rich
from ._providers import open_llms
from ._settings import for_cli

__all__ = [
    "PatternRun",
    "add_parsers",
    "best_of_payload",
    "cmd_pattern",
    "fanout_payload",
    "run_pattern",
    "vote_payload",
]

R = TypeVar("R")


@dataclass
class PatternRun:
    """How a single-pattern command ended."""

    result: Any = None
    error: BaseException | None = None
    interrupted: bool = False
    stats: ProgressStats | None = None


async def run_pattern(
    make: Callable[[list[Hook]], Awaitable[Any]],
    *,
    tracker: Tracker,
    display: Any,
) -> PatternRun:
    """Await the pattern with the tracker as its hook, driving the display meanwhile."""
    out = PatternRun()
    async with _base.driving(tracker, display) as run:
        try:
            out.result = await make([tracker])
        except (AllFailed, QuorumNotMet) as exc:
            out.error = exc
    out.interrupted = run.interrupted
    out.stats = tracker.snapshot()
    return out


def read_task(task: str) -> str:
    """The task text: the argument, or standard input for ``-``."""
    text = sys.stdin.read() if task == "-" else task
    if not text.strip():
        raise ConfigError("the task is empty; give the prompt as an argument or on stdin (-)")
    return text


def _record(r: CallRecord[Any] | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "status": str(r.status),
        "error": None if r.error is None else f"{type(r.error).__name__}: {r.error}",
        "latency": r.latency,
    }


def vote_payload(result: Any) -> tuple[str, dict[str, Any]]:
    """(the answer text, the JSON form) of a :class:`fanflow.patterns.VoteResult`."""
    payload = {
        "winner": result.winner,
        "confidence": result.confidence,
        "count": result.count,
        "counted": result.n_counted,
        "samples_used": result.samples_used,
        "tied": list(result.tied),
        "distribution": [[str(k), v] for k, v in result.distribution.items()],
        "stopped_early": result.stopped_early,
    }
    return str(result.winner), payload


def fanout_payload(result: Any) -> tuple[str, dict[str, Any]]:
    """(the answer text, the JSON form) of a :class:`fanflow.patterns.FanOutResult`."""
    payload = {
        "answer": result.answer,
        "aggregation": result.aggregation,
        "workers": [{"output": w.output, **(_record(w.record) or {})} for w in result.workers],
        "aggregation_error": None
        if result.aggregation_error is None
        else str(result.aggregation_error),
    }
    return result.answer or "", payload


def best_of_payload(result: Any) -> tuple[str, dict[str, Any]]:
    """(the answer text, the JSON form) of a :class:`fanflow.patterns.BestOfNResult`."""
    payload = {
        "best": result.best,
        "index": result.index,
        "selection": result.selection,
        "fallback_reason": result.fallback_reason,
        "candidates": [{"output": c.value, **(_record(c) or {})} for c in result.candidates],
        "judge_reply": result.judge_reply,
    }
    return result.best, payload


Call = Callable[[BaseLLM, list[Hook]], Awaitable[Any]]


def make_call(
    command: str, task: str, args: Any, options: Mapping[str, Any]
) -> tuple[Call, int, Callable[[Any], tuple[str, dict[str, Any]]]]:
    """The pattern call of ``command``, its expected number of calls, and its payload.

    The call takes the handle, which is opened later on the command's event loop.
    """
    from ..patterns import best_of_n, fan_out, vote

    if command == "vote":
        if args.n < 1:
            raise ConfigError(f"-n must be >= 1, got {args.n}")

        def go_vote(llm: BaseLLM, hooks: list[Hook]) -> Awaitable[Any]:
            return vote(llm, task, n=args.n, early_stop=args.early_stop, hooks=hooks, **options)

        return go_vote, args.n, vote_payload
    if command == "fanout":
        focus = args.focus or None
        workers = args.workers if args.workers is not None else (len(focus) if focus else 3)
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        aggregate: Any = "concat" if args.aggregate == "concat" else None

        def go_fan(llm: BaseLLM, hooks: list[Hook]) -> Awaitable[Any]:
            return fan_out(
                llm, task, workers=workers, focus=focus, aggregate=aggregate, hooks=hooks,
                **options,
            )  # fmt: skip

        return go_fan, workers + (aggregate is None), fanout_payload
    if args.n < 1:
        raise ConfigError(f"-n must be >= 1, got {args.n}")

    def go_best(llm: BaseLLM, hooks: list[Hook]) -> Awaitable[Any]:
        extra = {"criteria": args.criteria} if args.criteria else {}
        return best_of_n(llm, task, n=args.n, hooks=hooks, **extra, **options)

    return go_best, args.n + 1, best_of_payload


def emit_answer(text: str, payload: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


# -- the command: its arguments and its handler ------------------------------------------
def add_parsers(sub: Any) -> None:
    for name, help_text in (
        ("vote", "sample a task n times and print the majority answer"),
        ("fanout", "send a task to several workers at once and merge their answers"),
        ("best-of", "generate n candidates at once and let a judge pick the best"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("task", metavar="TASK", help="the prompt; - reads it from stdin")
        if name == "fanout":
            p.add_argument("--workers", type=int, help="how many workers (default: 3)")
            p.add_argument(
                "--focus", action="append", metavar="AREA", help="a worker's focus (repeat)"
            )
            p.add_argument(
                "--aggregate", choices=("llm", "concat"), default="llm",
                help="merge with the model (default) or concatenate",
            )  # fmt: skip
        else:
            p.add_argument("-n", type=int, default=5 if name == "vote" else 3, help="samples")
        if name == "vote":
            p.add_argument("--early-stop", action="store_true", help="stop once settled")
        if name == "best-of":
            p.add_argument("--criteria", help="what the judge weighs, in words")
        p.add_argument("--json", action="store_true", help="print every detail as JSON")
        _base.model_options(p)
        _base.common_options(p)
        p.set_defaults(handler=cmd_pattern, pattern=name.replace("best-of", "best"))


def cmd_pattern(args: argparse.Namespace, env: Mapping[str, str]) -> int:

    require_rich()
    settings = _base.settings(args, env)
    task = read_task(args.task)
    plan = _base.plan(args, env, settings)

    options = given(concurrency=settings.concurrency, system=args.system, budget=settings.budget)
    prices = _base.prices(args)
    if prices:
        options["prices"] = prices
    if args.temperature is not None:
        if args.pattern == "fanout":
            options["temperatures"] = (args.temperature, args.temperature)
        else:
            options["temperature"] = args.temperature
    call, expected, payload = make_call(args.pattern, task, args, options)
    console = make_console()

    async def go() -> Any:
        tracker = Tracker(expected, clock=_base.loop_time)
        display = _base.display(args, console, tracker, _base.Bad())
        async with open_llms([plan]) as llms:
            try:
                return await run_pattern(
                    lambda hooks: call(llms[0], hooks), tracker=tracker, display=display
                )
            finally:
                stops.extend(_base.tripped(llms))

    stops: list[CircuitOpen] = []
    run = _base.run_then_close(go, args, console)
    assert run.stats is not None
    if run.result is not None:
        text, data = payload(run.result)
        emit_answer(text, data, as_json=args.json)
    if not args.quiet:
        console.print(render_summary(run.stats, title=f"fanflow {args.command}", unit="calls"))
    if run.interrupted or _base.interrupts(args).count:
        console.print("fanflow: interrupted; no answer. Run the command again.")
        return _base.EXIT_INTERRUPTED
    if stops:  # as map and run say it: one message, what to fix, exit 2
        return _base.stopped(args, console, run.stats, stops, summary=False, unit="calls")
    if run.error is not None:
        console.print(
            f"fanflow {args.command}: {type(run.error).__name__}: {for_cli(str(run.error))}",
            markup=False,
        )
        return _base.EXIT_FAILED
    return _base.EXIT_OK
