"""Where a batch runs: locally (the default) or over a Ray cluster (``fanflow[ray]``).

``fanflow.map``, ``fanflow.as_completed`` and ``fanflow.Pool`` describe their batch (a
:class:`MapSpec` or :class:`PoolSpec`) and hand it to one :class:`Backend`, the one
their ``backend=`` names (``"local"``, ``"ray"``, a :class:`RayBackend`, or any object
implementing :class:`Backend`). ``_base.py`` says what a backend must do; ``_local.py``
is the reference (and holds the batch machinery: source, window, workers, fail-fast);
``_ray.py`` drives Ray workers (``_worker.py``) under one cluster-wide limit per model
handle (``_limiter.py``). Ray is imported only when a batch asks for it. ``_batch.py``
and ``_batchrun.py`` are the batch backend (``mode="batch"``/``"auto"``): the providers'
batch APIs behind the same seam.

Layer: below the patterns, above durability (``fanflow._durable``), the engine and the
store protocols; nothing here imports ``fanflow.patterns``.
"""

from __future__ import annotations

from .._batchinfo import BatchInfo, batch_info
from ._base import Backend, BatchRun, MapSpec, PoolSpec
from ._batch import BatchOptions
from ._batchrun import BatchBackend
from ._config import RayBackend
from ._local import LocalBackend

__all__ = [
    "Backend",
    "BatchBackend",
    "BatchInfo",
    "BatchOptions",
    "BatchRun",
    "LocalBackend",
    "MapSpec",
    "PoolSpec",
    "RayBackend",
    "batch_info",
]
