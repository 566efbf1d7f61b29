"""``fanflow sim``: run SimServer in the foreground (its own command line parses the rest).

SimServer is the simulated OpenAI/Anthropic-compatible server fanflow's tests use; run it
to try fanflow, a pipeline or your own client against latency, rate limits and faults
without an API key or cost.
"""

from __future__ import annotations

import sys
from typing import Any

from . import _base

__all__ = ["add_parser", "cmd_sim"]


def add_parser(sub: Any) -> None:
    # `fanflow sim ...` is handed to SimServer's own command line (see _app.main()); this
    # entry lists it in --help.
    sub.add_parser(
        "sim",
        help="start SimServer, a simulated OpenAI/Anthropic server for offline trials "
        "(fanflow sim --help)",
    )


def cmd_sim(argv: list[str]) -> int:
    """Run :class:`fanflow.testing.SimServer` in the foreground until Ctrl-C."""
    from ..testing._sim import main as sim_main

    try:
        sim_main(argv)
    except SystemExit as exc:  # --help, or a usage error of SimServer's parser
        return exc.code if isinstance(exc.code, int) else _base.EXIT_USAGE
    except (ValueError, OSError) as exc:
        print(f"fanflow sim: error: {exc}", file=sys.stderr)
        return _base.EXIT_USAGE
    return _base.EXIT_OK
