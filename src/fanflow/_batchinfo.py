"""What the batch backend adds to a record: a :class:`BatchInfo` under :data:`BATCH` in
the ``extra`` mapping of a :class:`~fanflow.results.Response` or a
:class:`~fanflow.errors.ProviderError`. The core types hold it without knowing it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BATCH", "BatchInfo", "batch_extra", "batch_info"]

#: The key of a :class:`BatchInfo` in an ``extra`` mapping.
BATCH = "fanflow.batch"


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """The provider batch that answered a call (or that it was last sent in).

    ``saved`` is what the batch price saved against the real-time price, in dollars
    (None: a failure, or the price is unknown).
    """

    batch_id: str
    saved: float | None = None


def batch_extra(batch_id: str, saved: float | None = None) -> dict[str, Any]:
    """An ``extra`` mapping naming one batch."""
    return {BATCH: BatchInfo(batch_id, saved)}


def batch_info(extra: Mapping[str, Any]) -> BatchInfo | None:
    """The batch an ``extra`` mapping names, or None (a real-time call)."""
    info = extra.get(BATCH)
    return info if isinstance(info, BatchInfo) else None
