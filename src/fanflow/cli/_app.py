"""The ``fanflow`` command: argument parsing, dispatch and exit codes.

Exit codes: 0 every item succeeded; 1 some items failed or input lines were skipped (the
count is printed); 2 a usage or configuration error; 130 interrupted (Ctrl-C).
Results go to standard output (or ``-o``); progress, notes and the summary go to standard
error, so ``fanflow map ... > out.jsonl`` and pipes stay clean.

argparse (standard library) parses the arguments: it adds nothing to the install and
starts fastest (docs/decisions/0060-cli-argparse.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._exceptions import ConfigError
from ._settings import OPTIONS, Settings, resolve_settings

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

MAX_BAD_LINES_SHOWN = 20


def _version() -> str:
    import fanflow

    return fanflow.__version__


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and display")
    group.add_argument(
        "--config", metavar="PATH", help="a TOML config file (default: ./fanflow.toml)"
    )
    group.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary")
    group.add_argument(
        "--progress",
        choices=("auto", "live", "plain", "none"),
        default="auto",
        help="live panel on a terminal, log lines otherwise (default: auto)",
    )
    group.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between plain progress lines (default 10)",
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model and limits (also FANFLOW_<NAME> variables and the config file)"
    )
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"help": option.help, "default": None}
        if option.choices:
            kwargs["metavar"] = "{" + ",".join(option.choices) + "}"
        else:
            kwargs["metavar"] = option.name.upper()
        group.add_argument(option.flag, dest=option.name, **kwargs)
    group.add_argument(
        "--sim",
        metavar="SPEC",
        help="the simulated model's knobs: latency=0.05,failure_rate=0.1,rate_limit_rate=0,seed=0",
    )
    group.add_argument("--system", help="a system prompt for every call")
    group.add_argument("--temperature", type=float, help="sampling temperature")
    group.add_argument("--max-tokens", type=int, metavar="N", help="output token limit per call")


class _Parser(argparse.ArgumentParser):
    """argparse, with errors that end in the fix and exit code 2."""

    def error(self, message: str) -> Any:  # argparse's own signature returns NoReturn
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = _Parser(
        prog="fanflow",
        description="Run many LLM calls at once, within limits, and combine the results.",
    )
    parser.add_argument("--version", action="version", version=f"fanflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("map", help="run a prompt over every item of a file")
    p.add_argument(
        "input", metavar="INPUT", help="JSONL, CSV or text file (one item a line); - for stdin"
    )
    p.add_argument(
        "-p",
        "--prompt",
        required=True,
        help="template, e.g. 'Summarize: {text}' ({input} for text lines)",
    )
    p.add_argument("-o", "--output", metavar="OUT", help="JSONL (default: stdout) or .parquet file")
    p.add_argument(
        "--input-format", choices=("jsonl", "csv", "text"), help="default: from the extension"
    )
    p.add_argument(
        "--order", choices=("input", "completion"), default="input", help="order of output rows"
    )
    p.add_argument(
        "--records", metavar="PATH", help="also write every call record (for fanflow report)"
    )
    _model_options(p)
    _common(p)
    p.set_defaults(handler=_cmd_map)

    p = sub.add_parser(
        "report", help="an HTML run report (timeline, throughput, latency, failures)"
    )
    p.add_argument("source", metavar="NAME", help="a records file written by fanflow map --records")
    p.add_argument(
        "-o", "--output", default="report.html", metavar="HTML", help="default report.html"
    )
    p.add_argument("--png", metavar="PATH", help="also write the timeline as a PNG")
    p.add_argument("--title", help="the report's title")
    _common(p)
    p.set_defaults(handler=_cmd_report)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {o.name: getattr(args, o.name, None) for o in OPTIONS}


def _settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    return resolve_settings(_flags(args), env=env, config=args.config)


def _cmd_map(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._console import make_console, make_display, require_rich
    from ._io import BadLine, count_items, detect_format, open_output, read_items
    from ._mapcmd import check_template, run_map
    from ._progress import Tracker, render_summary
    from ._providers import parse_sim_spec, resolve_llm
    from ._records import RecordsWriter

    require_rich()
    settings = _settings(args, env)
    check_template(args.prompt)
    fmt = detect_format(args.input, args.input_format)
    llm = resolve_llm(settings, env, sim=parse_sim_spec(args.sim or env.get("FANFLOW_SIM")))
    total = count_items(args.input, fmt)
    bad: list[BadLine] = []
    console = make_console()
    mode = "none" if args.quiet else args.progress
    loop_clock: Callable[[], float] = lambda: asyncio.get_running_loop().time()  # noqa: E731
    items_path = args.input
    records = RecordsWriter.open(args.records) if args.records else None
    writer = open_output(args.output)

    options: dict[str, Any] = {}
    if settings.concurrency is not None:
        options["concurrency"] = settings.concurrency
    for name in ("system", "temperature", "max_tokens"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)

    async def go() -> tuple[Any, Any]:
        tracker = Tracker(total, clock=loop_clock)
        to_terminal = args.output in (None, "-") and sys.stdout.isatty()
        display, note = make_display(
            mode, console, tracker, interval=args.progress_interval, redirect_stdout=to_terminal
        )

        def on_bad(line: BadLine) -> None:
            bad.append(line)
            tracker.bad_lines += 1
            if len(bad) <= MAX_BAD_LINES_SHOWN:
                note(f"fanflow: {line}")
            elif len(bad) == MAX_BAD_LINES_SHOWN + 1:
                note("fanflow: more malformed lines follow; only their count is shown")

        items = read_items(items_path, fmt, on_bad)
        outcome = await run_map(
            llm,
            args.prompt,
            items,
            tracker=tracker,
            display=display,
            writer=writer,
            records=records,
            order=args.order,
            options=options,
        )
        return outcome, tracker.snapshot()

    try:
        outcome, stats = asyncio.run(go())
    finally:
        writer.close()
        if records is not None:
            records.close()
    if not args.quiet:
        console.print(render_summary(stats))
    where = "standard output" if args.output in (None, "-") else args.output
    if outcome.interrupted:
        left = (stats.total - stats.done) if stats.total is not None else None
        console.print(
            f"fanflow: interrupted; {stats.done} items finished and were written to {where}"
            + (f", {left} were not run" if left is not None else "")
            + ". Run the command again to redo the rest (resumable jobs come with --job)."
        )
        return EXIT_INTERRUPTED
    problems = []
    if stats.failed:
        problems.append(f"{stats.failed} of {stats.done} items failed (see 'error' in the rows)")
    if bad:
        problems.append(f"{len(bad)} malformed input lines were skipped")
    if problems:
        console.print("fanflow: " + "; ".join(problems))
        return EXIT_FAILED
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._report import write_report

    del env
    path = write_report(args.source, args.output, png=args.png, title=args.title)
    if not args.quiet:
        print(
            f"fanflow: report written to {path}" + (f" and {args.png}" if args.png else ""),
            file=sys.stderr,
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Run the ``fanflow`` command and return its exit code.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        env: the environment (default: ``os.environ``).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    try:
        return handler(args, os.environ if env is None else env)
    except ConfigError as exc:
        print(f"fanflow {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fanflow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
