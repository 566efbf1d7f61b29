"""Python's cyclic GC during a batch: fewer young-generation collections.

Each call in flight holds a few dozen young container objects that reference counting
frees; at CPython's default first threshold (700) a batch runs a generation-0 collection
every few calls, each walking every call still in flight. While at least one batch runs,
:func:`batch_gc` raises the first threshold to ``BATCH_GC_THRESHOLD`` and puts the
previous one back when the last batch ends; a threshold the user set higher, or changed
during the batch, is left alone. See docs/decisions/0150-gc-during-batches.md.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BATCH_GC_THRESHOLD", "batch_gc"]

BATCH_GC_THRESHOLD = 10_000

_active = 0
_saved: tuple[int, int, int] | None = None  # the thresholds before the first batch


@contextmanager
def batch_gc() -> Iterator[None]:
    """Raise the GC's first threshold while any batch runs (nests; one event loop or many)."""
    global _active, _saved
    if _active == 0:
        before = gc.get_threshold()
        if 0 < before[0] < BATCH_GC_THRESHOLD:  # 0: the user turned automatic GC off
            _saved = before
            gc.set_threshold(BATCH_GC_THRESHOLD, before[1], before[2])
        else:
            _saved = None
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if _active == 0 and _saved is not None:
            if gc.get_threshold()[0] == BATCH_GC_THRESHOLD:  # not changed meanwhile
                gc.set_threshold(*_saved)
            _saved = None
