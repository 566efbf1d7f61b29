"""Where a map's items run: locally (the default) or over a Ray cluster (``fanflow[ray]``).

``fanflow.map``, ``fanflow.as_completed`` and ``fanflow.Pool`` describe their run (a
:class:`MapSpec`, whose ``options`` are the :class:`CallOptions`, or a
:class:`PoolSpec`) and hand it to one :class:`Backend`, the one their ``backend=``
names (``"local"``, ``"ray"``, a :class:`RayBackend`, or any object implementing
:class:`Backend`). ``_base.py`` says what a backend must do; ``_local.py`` is the
reference (and holds the machinery of a map: its item source, its workers (a ``Crew``),
fail-fast); ``_ray.py`` drives Ray workers (``_worker.py``) under one cluster-wide limit
per model handle (``_limiter.py``). Ray is imported only when a map or a pool asks for
it. ``_batch.py``, ``_batchllm.py`` and ``_batchrun.py`` are the batch backend
(``mode="batch"``/``"auto"``): the providers' batch APIs behind the same seam ("batch"
means only these).

Layer: below the patterns, above durability (``fanflow._durable``), the engine and the
store protocols; nothing here imports ``fanflow.patterns``.
"""

from __future__ import annotations

import warnings as _warnings
from typing import Any as _Any

from .._batchinfo import BatchInfo, batch_info
from .._engine import CallOptions
from ._base import Backend, Enclosing, MapRun, MapSpec, PoolSpec
from ._batch import BatchOptions
from ._batchrun import BatchBackend
from ._config import RayBackend
from ._local import LocalBackend

__all__ = [
    "Backend",
    "BatchBackend",
    "BatchInfo",
    "BatchOptions",
    "CallOptions",
    "Enclosing",
    "LocalBackend",
    "MapRun",
    "MapSpec",
    "PoolSpec",
    "RayBackend",
    "batch_info",
]


def __getattr__(name: str) -> _Any:
    # Old names, served with a warning for one release.
    if name == "BatchRun":
        _warnings.warn(
            "fanflow.backends.BatchRun is deprecated and will be removed in the next "
            "release; use fanflow.backends.MapRun (same protocol: 'batch' now means only "
            "a provider's batch API)",
            DeprecationWarning,
            stacklevel=2,
        )
        return MapRun
    raise AttributeError(f"module 'fanflow.backends' has no attribute {name!r}")
