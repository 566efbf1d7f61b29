"""What every command shares: exit codes, common options, settings, the display, the
end-of-run summary and exit status.

Exit codes: 0 every item succeeded; 1 some items failed or input lines were skipped (the
count is printed); 2 a usage or configuration error; 3 the input held no items (a
warning); 130 interrupted (Ctrl-C); 141 standard output was closed by its reader.
Results go to standard output (or ``-o``); progress, notes and the
summary go to standard error, so ``fanflow map ... > out.jsonl`` and pipes stay clean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import shlex
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .._exceptions import CircuitOpen, ConfigError, StoreError
from .._pricing import Price, load_prices
from .._progress import ProgressStats, Tracker, drive, render_summary
from ._console import make_display
from ._deployments import DEPLOYMENT_EXAMPLE
from ._interrupt import Interrupts
from ._io import BadLine, OutputWriter
from ._modellimits import MODEL_LIMITS_EXAMPLE, parse_model_limits
from ._providers import SIM_EXAMPLE, ProviderPlan, sim_keys
from ._settings import OPTIONS, Settings, for_cli, resolve_settings

if TYPE_CHECKING:
    from ..store import JobStore

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_EMPTY",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Bad",
    "Parser",
    "common_options",
    "display",
    "driving",
    "finish",
    "flags",
    "io_options",
    "library_log",
    "log_level",
    "loop_time",
    "model_options",
    "open_store",
    "plan",
    "prices",
    "resume_hint",
    "run_then_close",
    "settings",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_EMPTY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# The reader of standard output went away (``fanflow map ... | head -1``): the code a shell
# shows for a process ended by SIGPIPE (128 + 13), with no traceback and no summary.
EXIT_BROKEN_PIPE = 141

MAX_BAD_LINES_SHOWN = 20

R = TypeVar("R")


def common_options(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log what the library does: -v retries, 429s and pauses; -vv every attempt",
    )
    group.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="the fanflow logger's level (overrides -v; default: warning); keys and "
        "prompts are never logged",
    )


LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level(args: argparse.Namespace) -> int:
    """The ``fanflow`` logger's level from ``--log-level`` or ``-v``/``-vv``."""
    if getattr(args, "log_level", None):
        return int(getattr(logging, str(args.log_level).upper()))
    verbose = int(getattr(args, "verbose", 0) or 0)
    return max(logging.WARNING - 10 * verbose, logging.DEBUG)


def model_options(parser: argparse.ArgumentParser) -> None:
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
        help=f"the simulated model's knobs, e.g. {SIM_EXAMPLE}; keys: {sim_keys()}",
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="the API key (default: FANFLOW_API_KEY, else OPENAI_API_KEY or "
        "ANTHROPIC_API_KEY); never printed",
    )
    group.add_argument(
        "--price",
        action="append",
        metavar="MODEL=IN/OUT",
        help="a model's price in USD per million input/output tokens (e.g. "
        "gpt-5=1.25/10), or a prices file (.toml, the format of fanflow's prices.toml); "
        "repeat for more; overrides the built-in table",
    )
    group.add_argument(
        "--deployment",
        action="append",
        metavar="NAME=URL,...",
        help=f"a deployment of the model, e.g. {DEPLOYMENT_EXAMPLE} (keys: model, key-env, "
        "provider, rpm, tpm, concurrency, weight); repeat for more: the calls are spread "
        "over them (see --route); the key is read from the key-env variable",
    )
    group.add_argument(
        "--model-limits",
        action="append",
        metavar="MODEL:KEY=N,...",
        help=f"limits of one model a request file names, e.g. {MODEL_LIMITS_EXAMPLE} "
        "(keys: rpm, tpm, concurrency; the rest as --rpm/--tpm/--concurrency); repeat "
        "for more; replaces the config file's [model-limits]",
    )
    group.add_argument("--system", help="a system prompt for every call")
    group.add_argument("--temperature", type=float, help="sampling temperature")
    group.add_argument("--max-tokens", type=int, metavar="N", help="output token limit per call")


class Parser(argparse.ArgumentParser):
    """argparse, with errors that end in the fix and exit code 2."""

    def error(self, message: str) -> Any:  # argparse's own signature returns NoReturn
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def io_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="OUT", help="JSONL (default: stdout) or .parquet")
    p.add_argument(
        "--input-format", choices=("jsonl", "csv", "text"), help="default: from the extension"
    )


def flags(args: argparse.Namespace) -> dict[str, Any]:
    return {o.name: getattr(args, o.name, None) for o in OPTIONS}


def settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    return fit_open_files(args, resolve_settings(flags(args), env=env, config=args.config))


def fit_open_files(args: argparse.Namespace, settings: Settings) -> Settings:
    """Raise the open-file limit as far as allowed; if the concurrency asked for still
    needs more connections than fit under it, lower it and say so once
    (docs/decisions/0097-open-file-limit.md)."""
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


def interrupts(args: argparse.Namespace) -> Interrupts:
    """The command's Ctrl-C handling (made by ``main``; one of its own otherwise)."""
    found = getattr(args, "interrupts", None)
    if not isinstance(found, Interrupts):
        found = args.interrupts = Interrupts()
    return found


def plan(
    args: argparse.Namespace, env: Mapping[str, str], settings: Settings, *, routed: bool = True
) -> ProviderPlan:
    """The command's handle (``routed=False``: a pipeline's named model, which keeps its
    own settings rather than the ``--deployment`` router)."""
    from ._deployments import parse_deployment
    from ._providers import parse_sim_spec, plan_llm

    spec = args.sim or env.get("FANFLOW_SIM")
    sim = parse_sim_spec(spec)
    if spec:
        # --sim describes the simulated model: alone it chooses it; with another
        # provider it would be ignored, which is never what was meant.
        if settings.provider is None:
            settings = dataclasses.replace(settings, provider="sim")
        elif settings.provider != "sim":
            raise ConfigError(
                f"--sim (or FANFLOW_SIM) sets the simulated model's knobs, but the provider "
                f"is {settings.provider!r}; pass --provider sim, or drop --sim"
            )
    per_model = getattr(args, "model_limits", None) or []
    if per_model:
        given_limits = tuple(parse_model_limits(text) for text in per_model)
        settings = dataclasses.replace(settings, model_limits=given_limits)
    given = getattr(args, "deployment", None) or []
    if not routed:
        settings = dataclasses.replace(
            settings, deployments=(), route=None, cascade=None, accept=None
        )
    elif given:
        specs = tuple(parse_deployment(text) for text in given)
        settings = dataclasses.replace(settings, deployments=specs)
    return plan_llm(settings, env, sim=sim, max_tokens=args.max_tokens, api_key=args.api_key)


def prices(args: argparse.Namespace) -> dict[str, Price] | None:
    """The prices given with ``--price`` (None when none were)."""
    specs: list[str] = getattr(args, "price", None) or []
    out: dict[str, Price] = {}
    for spec in specs:
        model, sep, value = spec.partition("=")
        if not sep:
            out.update(load_prices(spec))
            continue
        parts = value.split("/")
        try:
            if not model.strip() or len(parts) != 2:
                raise ValueError(spec)
            out[model.strip()] = Price(float(parts[0]), float(parts[1]))
        except ValueError:
            raise ConfigError(
                f"--price {spec}: write MODEL=INPUT/OUTPUT in USD per million tokens "
                "(e.g. --price gpt-5=1.25/10), or give a prices file (.toml)"
            ) from None
    return out or None


def loop_time() -> float:
    return asyncio.get_running_loop().time()


class Bad:
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


def finish(
    args: argparse.Namespace,
    console: Any,
    stats: ProgressStats,
    bad: Bad,
    *,
    interrupted: bool,
    failed: int,
    items: int,
    where: str | None = None,
    unit: str = "items",
    resume: str = "Run the command again to redo the rest.",
    finished: int | None = None,
    empty: str | None = None,
) -> int:
    """Print the summary and what went wrong; return the exit code.

    ``empty`` names the input when it held no items at all (a warning, :data:`EXIT_EMPTY`).
    """
    interrupted = interrupted or interrupts(args).count > 0
    if empty is not None and not interrupted and not bad.lines:
        console.print(f"fanflow: warning: {empty} holds no items; nothing was run", markup=False)
        return EXIT_EMPTY
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


def tripped(llms: Any) -> list[CircuitOpen]:
    """The breakers that stopped a run's handles (each one's error says what to fix);
    a router stopped only when every deployment's breaker did."""
    stops: list[CircuitOpen] = []
    for llm in llms:
        handles = _leaves(llm)
        found = [b for h in handles if (b := h.breaker.tripped) is not None]
        if len(found) == len(handles):
            stops += found
    return stops


def _leaves(llm: Any) -> list[Any]:
    """The handles a router's or cascade's calls run on (those of a router in a cascade's
    tier too); a plain handle's own."""
    if not getattr(llm, "routed", False):
        return [llm]
    return [leaf for h in llm.handles for leaf in _leaves(h)]


def stopped(
    args: argparse.Namespace,
    console: Any,
    stats: ProgressStats,
    stops: list[CircuitOpen],
    *,
    summary: bool = True,
    unit: str = "items",
) -> int:
    """A run its breaker stopped: exit 2 with one message saying what to fix
    (``summary=False``: the caller has printed the summary already)."""
    if summary and not args.quiet:
        console.print(render_summary(stats))
    reason = for_cli(str(stops[0]).removeprefix("not sent: "))
    console.print(
        f"fanflow: stopped early, the remaining {unit} were not sent (skipped): {reason}",
        markup=False,
    )
    return EXIT_USAGE


def open_store(settings: Settings, args: argparse.Namespace) -> JobStore:
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


def without_key(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--api-key`` and its value (a printed command never holds a key),
    and whether one was removed."""
    out: list[str] = []
    skip = removed = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--api-key":
            skip = removed = True
        elif arg.startswith("--api-key="):
            removed = True
        else:
            out.append(arg)
    return out, removed


def resume_hint(args: argparse.Namespace) -> str:
    if not getattr(args, "job", None):
        return "Run the command again to redo the rest; add --job NAME to make runs resumable."
    argv, removed = without_key([a for a in sys.argv[1:] if a != "--resume"])
    command = shlex.join(["fanflow", *argv, "--resume"])
    key = " (with the API key in FANFLOW_API_KEY)" if removed else ""
    return f"Finished items are saved in job {args.job!r}; to resume{key}: {command}"


class _LibraryLog(logging.Handler):
    """Shows the library's log on the console (above a live panel); the CLI says how to
    resume itself, so the library's own resume hint is left out."""

    def __init__(self, console: Any, level: int) -> None:
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if "was interrupted" in str(record.msg):  # the Python-API phrasing of our hint
            return
        kind = "" if record.levelno >= logging.WARNING else f"{record.levelname.lower()}: "
        message = for_cli(record.getMessage()).removeprefix("fanflow: ")  # said once
        self.console.print(f"fanflow: {kind}{message}", markup=False)


@contextlib.contextmanager
def library_log(console: Any, level: int = logging.WARNING) -> Iterator[None]:
    """Send the ``fanflow`` logger's records at ``level`` and above to ``console``."""
    logger = logging.getLogger("fanflow")
    handler = _LibraryLog(console, level)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    old_level = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(old_level)


def run_then_close(
    go: Callable[[], Coroutine[Any, Any, R]], args: argparse.Namespace, console: Any, *closing: Any
) -> R:
    """Run ``go()`` on a new event loop (the library's log shown on ``console`` at the
    level ``args`` ask), then close every one of ``closing`` that is not None.

    Ctrl-C cancels ``go()`` between two callbacks of the loop (``_interrupt``). Closing
    never raises: a thing that cannot be closed (a full disk) is one line on the console,
    and if it was the output, ``args.output_unfinished`` is set (``main`` exits 2).
    """
    try:
        with library_log(console, log_level(args)):
            return interrupts(args).run(go)
    finally:
        for thing in closing:
            if thing is None:
                continue
            try:
                thing.close()
            except BrokenPipeError:
                raise
            except (OSError, StoreError) as exc:
                console.print(f"fanflow: {exc}", markup=False)
                if isinstance(thing, OutputWriter):
                    args.output_unfinished = True


def display(args: argparse.Namespace, console: Any, tracker: Tracker, bad: Bad) -> Any:
    mode = "none" if args.quiet else args.progress
    to_terminal = getattr(args, "output", None) in (None, "-") and sys.stdout.isatty()
    display, note = make_display(
        mode, console, tracker, interval=args.progress_interval, redirect_stdout=to_terminal
    )
    bad.note = note
    bad.tracker = tracker
    return display


@dataclasses.dataclass
class Driven:
    """Whether a Ctrl-C ended the block :func:`driving` ran."""

    interrupted: bool = False


@contextlib.asynccontextmanager
async def driving(tracker: Tracker, display: Any) -> AsyncIterator[Driven]:
    """Draw ``display`` while the block runs, and stop the tracker after it.

    Only the command's Ctrl-C cancels the block: it ends there, ``interrupted`` is set and
    the cancellation is not re-raised, so the command can report and exit 130.
    """
    driven = Driven()
    driver = asyncio.ensure_future(drive(display))
    try:
        yield driven
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        driven.interrupted = True
    finally:
        tracker.stop()
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
