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
import contextlib
import dataclasses
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError, StoreError
from ._console import make_console, make_display, require_rich
from ._interrupt import Interrupts
from ._io import BadLine
from ._progress import ProgressStats, Tracker, render_summary
from ._providers import ProviderPlan, open_llms
from ._settings import OPTIONS, Settings, resolve_settings

if TYPE_CHECKING:
    from ..store import JobStore

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


def _add_map(sub: Any) -> None:
    p = sub.add_parser("map", help="run a prompt over every item of a file")
    p.add_argument(
        "input", metavar="INPUT", help="JSONL, CSV or text file (one item a line); - for stdin"
    )
    p.add_argument(
        "-p", "--prompt", required=True,
        help="template, e.g. 'Summarize: {text}' ({input} for text lines)",
    )  # fmt: skip
    _io_options(p)
    p.add_argument(
        "--order", choices=("input", "completion"), default="input", help="order of output rows"
    )
    p.add_argument(
        "--records", metavar="PATH", help="also write every call record (for fanflow report)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print expected calls, tokens and cost; send nothing"
    )
    job = p.add_argument_group("resumable jobs (a SQLite store, --store or FANFLOW_STORE)")
    job.add_argument("--job", metavar="NAME", help="record items under NAME; rerun to resume")
    job.add_argument("--resume", action="store_true", help="continue job NAME (must exist)")
    job.add_argument("--only-failed", action="store_true", help="rerun only NAME's failures")
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
    _model_options(p)
    _common(p)
    p.set_defaults(handler=_cmd_map)


def _io_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="OUT", help="JSONL (default: stdout) or .parquet")
    p.add_argument(
        "--input-format", choices=("jsonl", "csv", "text"), help="default: from the extension"
    )


def _add_patterns(sub: Any) -> None:
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
        _model_options(p)
        _common(p)
        p.set_defaults(handler=_cmd_pattern, pattern=name.replace("best-of", "best"))


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = _Parser(
        prog="fanflow",
        description="Run many LLM calls at once, within limits, and combine the results.",
    )
    parser.add_argument("--version", action="version", version=f"fanflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_map(sub)
    _add_patterns(sub)

    p = sub.add_parser("run", help="run a pipeline (steps over items) from a YAML file")
    p.add_argument("pipeline", metavar="PIPELINE.yaml", help="the pipeline file")
    p.add_argument("input", metavar="INPUT", nargs="?", help="the items (default: the file's)")
    p.add_argument("--check", action="store_true", help="validate the pipeline and stop")
    job = p.add_argument_group("resumable jobs (a SQLite store, --store or FANFLOW_STORE)")
    job.add_argument("--job", metavar="NAME", help="record items under NAME; rerun to resume")
    job.add_argument("--resume", action="store_true", help="continue job NAME (must exist)")
    p.set_defaults(only_failed=False)
    _io_options(p)
    _model_options(p)
    _common(p)
    p.set_defaults(handler=_cmd_run)

    # `fanflow sim ...` is handed to SimServer's own command line (see main()); this entry
    # lists it in --help.
    sub.add_parser("sim", help="start SimServer (fanflow sim --help for its options)")

    p = sub.add_parser("jobs", help="jobs in the store, their progress and failures")
    p.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    p.add_argument("name", nargs="?", metavar="NAME", help="the job to show")
    p.add_argument("--store", metavar="PATH", help="the store (default .fanflow/store.db)")
    p.add_argument("--limit", type=int, default=50, help="failures listed by show (50)")
    _common(p)
    p.set_defaults(handler=_cmd_jobs)

    p = sub.add_parser("report", help="an HTML run report (timeline, throughput, latency)")
    p.add_argument(
        "source", metavar="NAME", help="a job name (map --job) or a file from map --records"
    )
    p.add_argument("--store", metavar="PATH", help="the store (default .fanflow/store.db)")
    p.add_argument("-o", "--output", default="report.html", metavar="HTML", help="report.html")
    p.add_argument("--png", metavar="PATH", help="also write the timeline as a PNG")
    p.add_argument("--title", help="the report's title")
    _common(p)
    p.set_defaults(handler=_cmd_report)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {o.name: getattr(args, o.name, None) for o in OPTIONS}


def _settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    return _fit_open_files(args, resolve_settings(_flags(args), env=env, config=args.config))


def _fit_open_files(args: argparse.Namespace, settings: Settings) -> Settings:
    """Raise the open-file limit as far as allowed; if the concurrency asked for still
    needs more connections than fit under it, lower it and say so once."""
    from ..providers._openfiles import connection_cap, raise_open_file_limit

    files = raise_open_file_limit()
    cap = connection_cap(files.soft)
    if settings.concurrency is None or settings.concurrency <= cap:
        return settings
    if not getattr(args, "open_files_noted", False):
        args.open_files_noted = True
        print(
            f"fanflow: the open-file limit (ulimit -n) is {files.soft} and the hard limit "
            f"({files.hard}) allows no more, so at most {cap} calls run at once instead of "
            f"{settings.concurrency}; raise the hard limit to run more",
            file=sys.stderr,
        )
    return dataclasses.replace(settings, concurrency=cap)


def _plan(args: argparse.Namespace, env: Mapping[str, str], settings: Settings) -> ProviderPlan:
    from ._providers import parse_sim_spec, plan_llm

    sim = parse_sim_spec(args.sim or env.get("FANFLOW_SIM"))
    return plan_llm(settings, env, sim=sim, max_tokens=args.max_tokens)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class _Bad:
    """Collects malformed input lines: prints the first few, counts them all."""

    def __init__(self) -> None:
        self.lines: list[BadLine] = []
        self.note: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
        self.tracker: Tracker | None = None

    def __call__(self, line: BadLine) -> None:
        self.lines.append(line)
        if self.tracker is not None:
            self.tracker.bad_lines += 1
        if len(self.lines) <= MAX_BAD_LINES_SHOWN:
            self.note(f"fanflow: {line}")
        elif len(self.lines) == MAX_BAD_LINES_SHOWN + 1:
            self.note("fanflow: more malformed lines follow; only their count is shown")


def _finish(
    args: argparse.Namespace,
    console: Any,
    stats: ProgressStats,
    bad: _Bad,
    *,
    interrupted: bool,
    failed: int,
    items: int,
    where: str | None = None,
    unit: str = "items",
    resume: str = "Run the command again to redo the rest.",
    finished: int | None = None,
) -> int:
    if not args.quiet:
        console.print(render_summary(stats, unit=unit))
    if interrupted:
        # Calls cancelled by the interrupt end too (as "cancelled"), but did not finish.
        done = stats.done - stats.failures.get("cancelled", 0) if finished is None else finished
        left = f", {stats.total - done} were not run" if stats.total is not None else ""
        wrote = f" and were written to {where}" if where else ""
        console.print(f"fanflow: interrupted; {done} items finished{wrote}{left}. {resume}")
        return EXIT_INTERRUPTED
    problems = []
    if failed:
        problems.append(f"{failed} of {items} items did not succeed (see 'error' in the rows)")
    if bad.lines:
        problems.append(f"{len(bad.lines)} malformed input lines were skipped")
    if problems:
        console.print("fanflow: " + "; ".join(problems))
        return EXIT_FAILED
    return EXIT_OK


def _cmd_map(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._io import count_items, detect_format, open_output, read_items
    from ._mapcmd import check_template, run_map
    from ._records import RecordsWriter, job_records_path

    require_rich()
    settings = _settings(args, env)
    check_template(args.prompt)
    fmt = detect_format(args.input, args.input_format)
    plan = _plan(args, env, settings)
    options: dict[str, Any] = {}
    for name in ("system", "temperature"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.dry_run:
        return _dry_run(args, plan, fmt, options)
    total = count_items(args.input, fmt)
    bad = _Bad()
    console = make_console()
    if settings.budget is not None:
        options["budget"] = settings.budget
    store = _open_store(settings, args) if args.job else None
    if store is not None:
        options.update(store=store, job=args.job, only_failed=args.only_failed)

    def warn(text: str) -> None:
        console.print(f"fanflow: {text}", markup=False)

    if args.records:
        records = RecordsWriter.open(args.records, warn=warn)
    elif store is not None:
        path = job_records_path(store.location, args.job)
        records = RecordsWriter.open(path, append=True, warn=warn)
    else:
        records = None
    writer = open_output(args.output)
    if settings.concurrency is not None:
        options["concurrency"] = settings.concurrency
    if args.backend == "ray" or args.ray_address is not None:
        from ..backends import RayBackend

        options["backend"] = RayBackend(address=args.ray_address)

    async def go() -> tuple[Any, ProgressStats]:
        tracker = Tracker(total, clock=_loop_time)
        display = _display(args, console, tracker, bad)
        items = read_items(args.input, fmt, bad)
        async with open_llms([plan]) as llms:
            outcome = await run_map(
                llms[0], args.prompt, items, tracker=tracker, display=display, writer=writer,
                records=records, order=args.order, options=options,
            )  # fmt: skip
        return outcome, tracker.snapshot()

    try:
        with _library_warnings(console):
            outcome, stats = args.interrupts.run(go)
    finally:
        unfinished = _close_all(console, writer, records, store)
    where = "standard output" if args.output in (None, "-") else args.output
    code = _finish(
        args, console, stats, bad, interrupted=outcome.interrupted or args.interrupts.count > 0,
        failed=stats.failed,
        items=stats.done, where=where, resume=_resume_hint(args), finished=outcome.written,
    )  # fmt: skip
    return EXIT_USAGE if unfinished and code != EXIT_INTERRUPTED else code


def _close_all(console: Any, writer: Any, records: Any, store: Any) -> bool:
    """Close the output, the records and the store whatever happened; True if the
    output could not be completed (a full disk, say). Never raises: the run's own
    outcome (or error) is what the command reports."""
    unfinished = False
    for thing in (writer, records, store):
        if thing is None:
            continue
        try:
            thing.close()
        except (OSError, StoreError) as exc:
            console.print(f"fanflow: {exc}", markup=False)
            unfinished = unfinished or thing is writer
    return unfinished


def _dry_run(
    args: argparse.Namespace, plan: ProviderPlan, fmt: str, options: dict[str, Any]
) -> int:
    from ._io import read_items
    from ._mapcmd import describe_dry_run, dry_run

    bad = _Bad()
    items = read_items(args.input, fmt, bad)

    async def go() -> Any:
        async with open_llms([plan]) as llms:  # nothing is sent: the handle fills defaults
            return dry_run(llms[0], args.prompt, items, options)

    result = args.interrupts.run(go)
    s = plan.settings
    for line in describe_dry_run(result, model=s.model or plan.provider, rpm=s.rpm, tpm=s.tpm):
        print(line)
    if bad.lines:
        print(f"  {len(bad.lines)} malformed input lines would be skipped")
    return EXIT_FAILED if result.template_errors or bad.lines else EXIT_OK


def _open_store(settings: Settings, args: argparse.Namespace) -> JobStore:
    from ..store import Store

    if args.only_failed and not args.job:
        raise ConfigError("--only-failed needs --job NAME (the job whose failures to rerun)")
    store = Store(settings.store)
    if (args.resume or args.only_failed) and store.job(args.job) is None:
        known = ", ".join(j.name for j in store.jobs()[:10]) or "none"
        store.close()
        raise ConfigError(
            f"no job {args.job!r} in {settings.store or '.fanflow/store.db'} (jobs: {known}); "
            "run without --resume to start it"
        )
    return store


def _resume_hint(args: argparse.Namespace) -> str:
    if not getattr(args, "job", None):
        return "Run the command again to redo the rest; add --job NAME to make runs resumable."
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    command = shlex.join(["fanflow", *argv, "--resume"])
    return f"Finished items are saved in job {args.job!r}; to resume: {command}"


class _LibraryWarnings(logging.Handler):
    """Shows the library's warnings on the console; the CLI says how to resume itself."""

    def __init__(self, console: Any) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if "was interrupted" in str(record.msg):  # the Python-API phrasing of our hint
            return
        self.console.print(f"fanflow: {record.getMessage()}", markup=False)


@contextlib.contextmanager
def _library_warnings(console: Any) -> Iterator[None]:
    logger = logging.getLogger("fanflow")
    handler = _LibraryWarnings(console)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _display(args: argparse.Namespace, console: Any, tracker: Tracker, bad: _Bad) -> Any:
    mode = "none" if args.quiet else args.progress
    to_terminal = getattr(args, "output", None) in (None, "-") and sys.stdout.isatty()
    display, note = make_display(
        mode, console, tracker, interval=args.progress_interval, redirect_stdout=to_terminal
    )
    bad.note = note
    bad.tracker = tracker
    return display


def _cmd_pattern(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._patterncmds import emit_answer, make_call, read_task, run_pattern

    require_rich()
    settings = _settings(args, env)
    task = read_task(args.task)
    plan = _plan(args, env, settings)

    options: dict[str, Any] = {}
    if settings.concurrency is not None:
        options["concurrency"] = settings.concurrency
    if args.system is not None:
        options["system"] = args.system
    if settings.budget is not None:
        options["budget"] = settings.budget
    if args.temperature is not None:
        if args.pattern == "fanout":
            options["temperatures"] = (args.temperature, args.temperature)
        else:
            options["temperature"] = args.temperature
    call, expected, payload = make_call(args.pattern, task, args, options)
    console = make_console()

    async def go() -> Any:
        tracker = Tracker(expected, clock=_loop_time)
        display = _display(args, console, tracker, _Bad())
        async with open_llms([plan]) as llms:
            return await run_pattern(
                lambda hooks: call(llms[0], hooks), tracker=tracker, display=display
            )

    with _library_warnings(console):
        run = args.interrupts.run(go)
    assert run.stats is not None
    if run.result is not None:
        text, data = payload(run.result)
        emit_answer(text, data, as_json=args.json)
    if not args.quiet:
        console.print(render_summary(run.stats, title=f"fanflow {args.command}", unit="calls"))
    if run.interrupted or args.interrupts.count:
        console.print("fanflow: interrupted; no answer. Run the command again.")
        return EXIT_INTERRUPTED
    if run.error is not None:
        console.print(f"fanflow {args.command}: {type(run.error).__name__}: {run.error}")
        return EXIT_FAILED
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._io import detect_format, open_output, read_items
    from ._pipeline import load_pipeline
    from ._runpipe import build_runner, run_pipeline

    pipe = load_pipeline(args.pipeline)
    flags = {k: v for k, v in _flags(args).items() if v is not None}
    base = _fit_open_files(
        args, resolve_settings({**pipe.settings, **flags}, env=env, config=args.config)
    )
    plans: dict[str | None, ProviderPlan] = {None: _plan(args, env, base)}
    for name, spec in pipe.models.items():
        merged = _fit_open_files(
            args, resolve_settings({**pipe.settings, **spec, **flags}, env=env, config=args.config)
        )
        plans[name] = _plan(args, env, merged)
    source = args.input or pipe.input
    if source is None:
        raise ConfigError(
            f"{pipe.path}: no input; give INPUT after the pipeline or set 'input:' in the file"
        )
    if args.check:
        print(f"fanflow: {pipe.path} is valid: {len(pipe.steps)} steps ({pipe.kind})")
        return EXIT_OK
    require_rich()
    fmt = detect_format(source, args.input_format)
    bad = _Bad()
    items = list(read_items(source, fmt, bad))
    store = _open_store(base, args) if args.job else None
    pool_options: dict[str, Any] = {"store": store, "job": args.job} if store is not None else {}
    if base.budget is not None:
        pool_options["budget"] = base.budget  # one cap over every call of the run
    writer = open_output(args.output or pipe.output)
    console = make_console()

    async def go() -> tuple[Any, ProgressStats]:
        tracker = Tracker(len(items) * len(pipe.steps), clock=_loop_time)
        display = _display(args, console, tracker, bad)
        async with open_llms(list(plans.values())) as llms:
            runner = build_runner(pipe, dict(zip(plans, llms, strict=True)))
            outcome = await run_pipeline(
                pipe, runner, items, tracker=tracker, display=display, writer=writer,
                pool_options=pool_options,
            )  # fmt: skip
        return outcome, tracker.snapshot()

    try:
        with _library_warnings(console):
            outcome, stats = args.interrupts.run(go)
    finally:
        unfinished = _close_all(console, writer, None, store)
    code = _finish(
        args, console, stats, bad, interrupted=outcome.interrupted or args.interrupts.count > 0,
        failed=outcome.items - outcome.succeeded, items=outcome.items, unit="calls",
        resume=_resume_hint(args),
    )  # fmt: skip
    return EXIT_USAGE if unfinished and code != EXIT_INTERRUPTED else code


def _report_source(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """A records file as given, else the records of the job of that name."""
    from ._records import job_records_path, legacy_job_records_path

    if os.path.isfile(args.source):
        return str(args.source)
    settings = resolve_settings({"store": args.store}, env=env, config=args.config)
    store_path = settings.store or ".fanflow/store.db"
    path = job_records_path(store_path, args.source)
    if not path.is_file():  # a job recorded by an older fanflow
        path = legacy_job_records_path(store_path, args.source)
    if not path.is_file():
        raise ConfigError(
            f"{args.source} is neither a records file nor a job with records in "
            f"{store_path}; run fanflow map --job {args.source} first, or give the file "
            "written by --records"
        )
    return str(path)


def _cmd_jobs(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._jobs import list_jobs, show_job

    require_rich()
    settings = resolve_settings({"store": args.store}, env=env, config=args.config)
    console = make_console(sys.stdout)
    if args.action == "show":
        if not args.name:
            raise ConfigError("fanflow jobs show needs a job NAME; fanflow jobs lists them")
        return show_job(console, settings.store, args.name, limit=args.limit)
    return list_jobs(console, settings.store)


def _cmd_sim(argv: list[str]) -> int:
    """Run :class:`fanflow.testing.SimServer` in the foreground until Ctrl-C."""
    from ..testing._sim import main as sim_main

    try:
        sim_main(argv)
    except SystemExit as exc:  # --help, or a usage error of SimServer's parser
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except (ValueError, OSError) as exc:
        print(f"fanflow sim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from ._report import write_report

    source = _report_source(args, env)
    path = write_report(source, args.output, png=args.png, title=args.title)
    if not args.quiet:
        also = f" and {args.png}" if args.png else ""
        print(f"fanflow: report written to {path}{also}", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Run the ``fanflow`` command and return its exit code.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        env: the environment (default: ``os.environ``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        return _cmd_sim(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    args.interrupts = interrupts = Interrupts()
    try:
        code = handler(args, os.environ if env is None else env)
        if interrupts.count and code != EXIT_INTERRUPTED:  # Ctrl-C while it was finishing
            raise KeyboardInterrupt
        return code
    except (ConfigError, StoreError) as exc:
        # A store that cannot be used (locked by a running job, full disk, damaged file)
        # stops the command like a wrong option: nothing more can be done without a fix.
        print(f"fanflow {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = _resume_hint(args) if args.command in ("map", "run") else "Run it again."
        print(f"fanflow: interrupted. {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        interrupts.restore()
