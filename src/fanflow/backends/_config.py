"""The ``backend=`` option of ``map``, ``as_completed`` and ``Pool``: ``"local"``,
``"ray"``, a RayBackend, or any other :class:`~fanflow.backends.Backend`;
:func:`resolve_backend` is the one place it is read."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from .._exceptions import ConfigError
from ._base import Backend, Deliver, MapRun, MapSpec, PoolDeliver, PoolMoved, PoolSpec
from ._local import LOCAL

__all__ = ["RayBackend", "resolve_backend"]


@dataclass(frozen=True)
class RayBackend:
    """Run a map or a pool on Ray: shards of items on worker processes, one limit for all.

    Args:
        address: the cluster to join (``"auto"``, ``"ray://head:10001"``, ...). None:
            the cluster Ray is already connected to, else ``RAY_ADDRESS``, else a local
            Ray instance is started (and kept for the rest of the process).
        workers: worker processes (each runs many calls at once on its own event
            loop). None: one per CPU of the cluster.
        shard_size: items sent to a worker at a time. None: twice the items a worker
            runs at once, between 16 and 2,048. Smaller shards balance better and lose
            less on a crash; larger ones cost fewer messages.
        worker_cpus: CPUs Ray reserves for each worker (0: workers are packed by
            count alone; LLM calls mostly wait on the network).
        max_worker_restarts: worker processes that may die (killed, node lost) and be
            replaced during one run before it fails; None: twice ``workers``.
        ray_init: extra keyword arguments for ``ray.init`` when fanflow starts or
            joins the cluster (``runtime_env``, ``namespace``, ...).
    """

    address: str | None = None
    workers: int | None = None
    shard_size: int | None = None
    worker_cpus: float = 0.0
    max_worker_restarts: int | None = None
    ray_init: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}; use None for one per CPU")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.worker_cpus < 0:
            raise ConfigError(f"worker_cpus must be >= 0, got {self.worker_cpus}")
        if self.max_worker_restarts is not None and self.max_worker_restarts < 0:
            raise ConfigError(f"max_worker_restarts must be >= 0, got {self.max_worker_restarts}")

    def __repr__(self) -> str:
        return (
            f"fanflow.backends.RayBackend(address={self.address!r}, workers={self.workers}, "
            f"shard_size={self.shard_size})"
        )

    # The Backend protocol. Ray itself is imported only when a map or a pool runs here.

    def map_run(self, spec: MapSpec, deliver: Deliver) -> MapRun:
        from ._ray import RayMapRun

        return RayMapRun(self, spec, deliver)

    async def run_pool(self, spec: PoolSpec, deliver: PoolDeliver, on_step: PoolMoved) -> None:
        from ._ray import run_pool_on_ray

        await run_pool_on_ray(self, spec, deliver, on_step)


def resolve_backend(backend: object) -> Backend:
    """The backend a ``backend=`` argument names: ``"local"`` (or None), ``"ray"``, a
    :class:`RayBackend`, or any object that implements :class:`Backend`.

    Raises:
        ConfigError: an unknown backend.
    """
    if backend == "local" or backend is None:
        return LOCAL
    if backend == "ray":
        return RayBackend()
    if isinstance(backend, Backend):
        return backend
    if callable(getattr(backend, "map_batch", None)) and callable(
        getattr(backend, "run_pool", None)
    ):
        return _Renamed(backend)
    raise ConfigError(
        f"unknown backend {backend!r}; use 'local', 'ray', fanflow.backends.RayBackend(...) or an "
        "object with the fanflow.backends.Backend methods (map_run, run_pool)"
    )


class _Renamed:
    """A backend written before ``map_batch`` was renamed ``map_run`` (served, with a
    warning, for one release)."""

    def __init__(self, backend: Any) -> None:
        warnings.warn(
            f"{type(backend).__name__}.map_batch is deprecated and will be removed in the "
            "next release; rename it map_run (fanflow.backends.Backend): 'batch' now "
            "means only a provider's batch API",
            DeprecationWarning,
            stacklevel=4,
        )
        self.backend = backend
        self.run_pool = backend.run_pool

    def map_run(self, spec: MapSpec, deliver: Deliver) -> MapRun:
        run: MapRun = self.backend.map_batch(spec, deliver)
        return run
