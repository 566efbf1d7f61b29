"""The ``fanflow`` command: the parser of every command and dispatch.

Each command lives in its own module with its arguments and its handler (``_mapcmd``,
``_patterncmds``, ``_runpipe``, ``_jobs``, ``_report``, ``_simcmd``); what they share is
in ``_base`` (exit codes there).

argparse (standard library) parses the arguments: it adds nothing to the install and
starts fastest (docs/decisions/0060-cli-argparse.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from .._exceptions import ConfigError, TemplateError
from . import _jobs, _mapcmd, _patterncmds, _report, _runpipe, _simcmd
from ._base import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Parser,
)
from ._settings import for_cli

__all__ = ["build_parser", "main"]


def _version() -> str:
    import fanflow

    return fanflow.__version__


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = Parser(
        prog="fanflow",
        description="Run many LLM calls at once, within limits, and combine the results.",
    )
    parser.add_argument("--version", action="version", version=f"fanflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    _mapcmd.add_parser(sub)
    _patterncmds.add_parsers(sub)
    _runpipe.add_parser(sub)
    _simcmd.add_parser(sub)
    _jobs.add_parser(sub)
    _report.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Run the ``fanflow`` command and return its exit code.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        env: the environment (default: ``os.environ``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        return _simcmd.cmd_sim(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    try:
        return handler(args, os.environ if env is None else env)
    except (ConfigError, TemplateError) as exc:
        print(f"fanflow {args.command}: error: {for_cli(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fanflow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Our reader went away (`fanflow map ... | head -1`): end quietly. Standard output
        # is pointed at /dev/null so the interpreter's last flush cannot fail again (the
        # Python docs' "Note on SIGPIPE", signal module).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
