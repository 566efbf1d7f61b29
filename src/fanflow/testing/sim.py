"""Run SimServer from the command line: ``python -m fanflow.testing.sim --latency 0.1``."""

from __future__ import annotations

from ._sim import main

if __name__ == "__main__":
    main()
