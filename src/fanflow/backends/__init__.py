"""Where a batch runs: locally (the default) or over a Ray cluster (``fanflow[ray]``).

``fanflow.map(..., backend="ray")`` and ``Pool(..., backend="ray")`` split the items into
shards and stream them to Ray worker processes, each running fanflow's own async engine
on its shard, under one cluster-wide limit per model handle (``_ray.py`` drives the
workers, ``_limiter.py`` is the cluster-wide limiter). Ray is imported only when a batch
asks for it. ``mode="batch"``/``"auto"`` run the calls through the providers' batch
APIs (``_batch.py``: the queue and the batching handle; ``_batchrun.py``: the hook).
"""

from __future__ import annotations

from ._batch import BatchOptions
from ._config import RayBackend

__all__ = ["BatchOptions", "RayBackend"]
