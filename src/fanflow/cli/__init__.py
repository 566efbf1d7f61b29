"""The ``fanflow`` command line (an interface layer: nothing else imports it).

Run ``fanflow --help`` or ``python -m fanflow --help``. Each command is a thin adapter
over the library: it reads items and settings, calls a pattern, and shows the engine's
events as progress.
"""

from __future__ import annotations

from ._app import main

__all__ = ["main"]
