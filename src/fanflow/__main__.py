"""``python -m fanflow``: the command line."""

from __future__ import annotations

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports fanflow: nothing ran yet
    raise SystemExit(130) from None

raise SystemExit(main())
