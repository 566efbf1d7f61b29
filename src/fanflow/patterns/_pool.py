"""``Pool``: run a skill, chain or flow over many inputs, each at its own pace.

Up to ``max_flows`` inputs are in progress at once. Each moves through its steps on
its own: input 7 may be on step 3 while input 2 is still on step 1; there is no
barrier between steps. Results come back in input order. ``pool.status`` shows
counts and each input's state (and current step) at any moment, and
``pool.run(only_failed=True)`` runs again only the inputs that did not succeed.

With ``store=`` every model call of every skill goes through the store; with
``job="name"`` the store also records each input's terminal status, so
``store.job(name)`` shows progress and failures, and a run in another process (after
a crash, say) knows which inputs succeeded: those are replayed with every model call
served from the store (their plain-function steps run again, as they are not
stored), the others run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Unpack

from .._durable import Durability
from .._events import Hook, observed
from .._exceptions import ConfigError, StepInputError
from .._progress import with_progress
from .._sync import blocking
from .._types import CallRecord, Status
from ..backends._base import OWN, Backend, Enclosing, PoolSpec
from ..backends._batch import BatchOptions
from ..backends._batchrun import BatchBackend, check_pool_mode
from ..backends._config import resolve_backend
from ._common import PatternResult, now
from ._flow import Chain, Flow, FlowResult, Step
from ._options import Options, option_attributes, resolve
from ._priming import PRIME_MIN_ITEMS, PrimedRunner
from ._prompt import FIRST_ITEMS
from ._skill import Skill

__all__ = ["ItemStatus", "Pool", "PoolResult", "PoolStatus"]

State = Literal["pending", "running", "succeeded", "failed", "timed_out", "cancelled", "skipped"]


@dataclass(frozen=True)
class ItemStatus:
    """One input's state; ``steps`` names the steps running now (empty when idle)."""

    index: int
    state: State
    steps: tuple[str, ...] = ()
    error: BaseException | None = None


@dataclass(frozen=True, repr=False)
class PoolStatus:
    """Counts and per-input state of a pool, at the moment it was read.

    It reads as a dictionary of counts (``status[key]``, ``key in status``, ``keys()``,
    ``values()``, ``get()``, ``dict(status)``; ``items`` stays the per-input tuple):
    ``status["completed"]`` (inputs that succeeded; ``"succeeded"`` is the same),
    ``status["failed"]`` (every input that ended without succeeding),
    ``status["pending"]``, ``status["running"]``, ``status["total"]``, and each terminal
    state (``"timed_out"``, ``"cancelled"``, ``"skipped"``).
    :meth:`which` names the inputs in a state: ``status.which("failed")`` is their
    indices, and ``status.errors`` their errors.
    """

    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    items: tuple[ItemStatus, ...] = field(default=())

    def __repr__(self) -> str:
        return (
            f"fanflow.results.PoolStatus(total={self.total}, pending={self.pending}, "
            f"running={self.running}, succeeded={self.succeeded}, failed={self.failed})"
        )

    @property
    def completed(self) -> int:
        """Inputs that succeeded."""
        return self.succeeded

    def which(self, state: str) -> tuple[int, ...]:
        """The indices of the inputs in ``state`` (any key of the mapping but
        ``"total"``), in input order."""
        if state not in _KEYS or state == "total":
            raise KeyError(f"{state!r} is not a state; use one of {', '.join(_KEYS[1:])}")
        return tuple(it.index for it in self.items if state in _names(it.state))

    @property
    def errors(self) -> dict[int, BaseException]:
        """The error of every input that ended with one, by index."""
        return {it.index: it.error for it in self.items if it.error is not None}

    def __getitem__(self, key: str) -> int:
        if key == "total":
            return self.total
        if key in ("completed", "succeeded"):
            return self.succeeded
        if key == "failed":
            return self.failed
        if key in ("pending", "running"):
            return self.pending if key == "pending" else self.running
        if key in _KEYS:
            return sum(1 for it in self.items if it.state == key)
        raise KeyError(f"{key!r} is not a pool status key; use one of {', '.join(_KEYS)}")

    def get(self, key: str, default: int | None = None) -> int | None:
        return self[key] if key in _KEYS else default

    def keys(self) -> tuple[str, ...]:
        return _KEYS

    def values(self) -> list[int]:
        return [self[key] for key in _KEYS]

    def __contains__(self, key: object) -> bool:
        return key in _KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(_KEYS)

    def __len__(self) -> int:
        return len(_KEYS)


# The mapping's keys: counts, and the states of ItemStatus (``completed`` = succeeded;
# ``failed`` counts every input that ended without succeeding).
_KEYS = (
    "total",
    "completed",
    "succeeded",
    "failed",
    "pending",
    "running",
    "timed_out",
    "cancelled",
    "skipped",
)


def _names(state: str) -> tuple[str, ...]:
    """The keys an input in ``state`` counts under."""
    if state == "succeeded":
        return ("completed", "succeeded")
    if state in ("pending", "running"):
        return (state,)
    return ("failed", state)


@dataclass(frozen=True, kw_only=True, repr=False)
class PoolResult(PatternResult):
    """Every input's :class:`FlowResult`, in input order."""

    items: tuple[FlowResult, ...]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> FlowResult:
        return self.items[index]

    @property
    def outputs(self) -> list[Any]:
        """Each input's output (None where it did not succeed), in input order."""
        return [r.output if r.ok else None for r in self.items]

    @property
    def status(self) -> dict[int, Status]:
        return {i: r.status for i, r in enumerate(self.items)}

    @property
    def errors(self) -> dict[int, BaseException]:
        return {i: r.error for i, r in enumerate(self.items) if r.error is not None}

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.items)


class _Single:
    """A skill or a function as a one-step runner."""

    def __init__(self, runner: Skill | Callable[..., Any]) -> None:
        name = runner.name if isinstance(runner, Skill) else getattr(runner, "__name__", "step")
        self.chain = Chain([Step(runner, output=str(name))])

    async def execute(
        self,
        inputs: Mapping[str, Any],
        *,
        index: int | None,
        hooks: Sequence[Hook],
        on_step: Callable[[str, bool], None] | None = None,
        enclosing: Enclosing = OWN,
    ) -> FlowResult:
        return await self.chain.execute(
            inputs,
            index=index,
            hooks=hooks,
            on_step=on_step,
            enclosing=enclosing,
        )


def _models(runner: Any) -> list[Any]:
    """The model handles of a runner's skills, nested chains and flows included."""
    if isinstance(runner, Skill):
        return [runner.llm]
    if isinstance(runner, Chain | Flow):
        return [m for step in runner.steps for m in _models(step.runner)]
    return []


@option_attributes("hooks", "store", "cache", "job", "budget", "prices", writable=True)
class Pool:
    """Run ``runner`` over every input, up to ``max_flows`` at once.

    Args:
        runner: a :class:`Skill`, :class:`Chain`, :class:`Flow`, or a sync/async function.
        inputs: one dict per item.
        max_flows: the most items in progress at once (``concurrency`` in the other
            patterns; either spelling works; default 10). Their calls also share each
            model handle's own limits.
        backend: ``"local"`` (this event loop) or ``"ray"`` / :class:`fanflow.backends.RayBackend`
            (inputs sharded over Ray workers; ``max_flows`` and each handle's limits then
            hold for the whole cluster; needs ``pip install 'fanflow[ray]'``).
        mode: ``"batch"``: the model steps whose handle has a batch API (OpenAI,
            Anthropic) go through the provider's batch API at its batch price; other
            steps run as usual. Each input in progress holds one request in a batch, so
            ``max_flows`` is raised to the number of inputs (at most twice a batch).
        batch: how batches are sized and polled (:class:`fanflow.backends.BatchOptions`).
        prime: per model step, send the first input's call alone and the step's other
            calls once it has ended, so they read the prompt prefix it put in the
            provider's cache. None (the default): with more than 8 inputs, for the
            steps whose system prompt and constant leading text the model caches; True:
            every model step; False: never. Real time only; on Ray, each worker primes
            its own calls (one miss per worker and step at most).
        **options: the call options (:class:`fanflow.Options`). ``store``, ``cache``,
            ``budget`` and ``prices`` override the skills' and chains' own; ``budget``
            caps one run of the pool, every call of every input together (a number: a
            new cap for each run); an input whose step it cannot cover ends ``skipped``
            with ``BudgetExceeded``. With ``job``, the inputs are the job's items (an
            input's ``"id"`` key, if any, is its id): running the pool with the same
            job again, in any process, replays the inputs that succeeded from the
            store and runs the rest; ``sink`` streams each input's outcome. ``timeout``,
            ``retry``, ``hedge_after`` and ``deadline`` (from the start of a run) apply
            to every skill that sets none (on the local backend).
    """

    def __init__(
        self,
        runner: Skill | Chain | Flow | Callable[..., Any],
        inputs: Sequence[Mapping[str, Any]],
        max_flows: int | None = None,
        *,
        backend: str | Backend = "local",
        mode: Literal["realtime", "batch"] = "realtime",
        batch: BatchOptions | None = None,
        prime: bool | None = None,
        **options: Unpack[Options],
    ) -> None:
        check_pool_mode(mode, _models(runner), backend)
        # Batches keep no order to prime in; nothing waits (decision 0190).
        self.prime = False if mode == "batch" else prime
        if mode == "batch":
            backend = BatchBackend("batch", batch)
        self.backend = resolve_backend(backend)
        if max_flows is not None and options.get("concurrency") not in (None, max_flows):
            raise ConfigError("Pool: max_flows and concurrency are the same option; pass one")
        max_flows = max_flows if max_flows is not None else options.get("concurrency") or 10
        if max_flows < 1:
            raise ConfigError(f"max_flows must be >= 1, got {max_flows}")
        if mode == "batch":  # each input in progress holds one request in a batch
            max_flows = max(max_flows, min(len(inputs), 2 * (batch or BatchOptions()).cap()))
        # The pool's concurrency is its max_flows (inputs in progress), not a limit on
        # the calls of each input.
        self.options = resolve("Pool", {**options, "concurrency": None})
        for i, item in enumerate(inputs):
            if not isinstance(item, Mapping):
                raise ConfigError(
                    f"pool input {i} is a {type(item).__name__}; each input must be a dict "
                    "of the keys the runner reads"
                )
        self.runner = runner
        self._run: Chain | Flow | _Single = (
            runner if isinstance(runner, Chain | Flow) else _Single(runner)
        )
        self.inputs = [dict(item) for item in inputs]
        self.max_flows = max_flows
        o = self.options
        # Checks the store/job combination now rather than at the first run.
        Durability(store=o.store, job=o.job, only_failed=False, cache=o.cache, sink=None)
        self._results: list[FlowResult | None] = [None] * len(self.inputs)
        self._running: list[list[str]] = [[] for _ in self.inputs]

    def __repr__(self) -> str:
        s = self.status
        return (
            f"fanflow.Pool(items={s.total}, max_flows={self.max_flows}, "
            f"succeeded={s.succeeded}, failed={s.failed})"
        )

    @property
    def status(self) -> PoolStatus:
        """Counts and each input's state now (safe to read while the pool runs)."""
        items = []
        for i, result in enumerate(self._results):
            steps = tuple(self._running[i])
            if steps:
                items.append(ItemStatus(i, "running", steps))
            elif result is None:
                items.append(ItemStatus(i, "pending"))
            else:
                items.append(ItemStatus(i, result.status.value, (), result.error))
        count = dict.fromkeys(("pending", "running", "succeeded"), 0)
        for it in items:
            if it.state in count:
                count[it.state] += 1
        return PoolStatus(
            total=len(items),
            pending=count["pending"],
            running=count["running"],
            succeeded=count["succeeded"],
            failed=len(items) - sum(count.values()),
            items=tuple(items),
        )

    def _check_first_inputs(self, first: Sequence[Mapping[str, Any]]) -> None:
        """A key that the runner needs from its input and that none of the first inputs
        has is a mistake in the steps (or the data), found before any call (the rule of
        ``patterns._prompt.check_first_items``)."""
        chain = self._run.chain if isinstance(self._run, _Single) else self._run
        if not first:
            return
        have = sorted({str(k) for item in first for k in item})
        for key in chain.required_keys:
            if not any(key in item for item in first):
                error = chain.check(have, None)  # names the step that needs it
                assert error is not None
                which = (
                    "the only input lacks"
                    if len(first) == 1
                    else (f"none of the first {len(first)} inputs has")
                )
                raise StepInputError(
                    f"{error} ({which} {key!r}; nothing was sent)",
                    step=error.step,
                    field=key,
                )

    @with_progress
    @observed("pool")
    async def arun(self, *, only_failed: bool = False, progress: bool = False) -> PoolResult:
        """Run every input (or, with ``only_failed``, those that did not succeed).

        ``progress=True`` shows the calls live (as ``fanflow map`` does) while it runs.

        With a ``job``, an input that succeeded in an earlier run of the job (in this
        process or another) is replayed from the store: no model call is repeated.

        Returns:
            A :class:`PoolResult` over all inputs, in input order (results of inputs not
            run again are the earlier ones).
        """
        started = now()
        todo = [i for i, r in enumerate(self._results) if not only_failed or r is None or not r.ok]
        self._check_first_inputs([self.inputs[i] for i in todo[:FIRST_ITEMS]])
        for i in todo:
            self._results[i] = None
        # One run for every input: one deadline and one budget cap.
        shared = self.options.run()
        durable = self.options.durability()

        async def finish(i: int, result: FlowResult) -> None:
            if durable is not None:  # committed before the input counts as done
                item = _item_record(result, i)
                await durable.settle(item, self.inputs[i])
                durable.emit(item, self.inputs[i])
            self._results[i] = result

        async def delivered(i: int, result: FlowResult) -> None:
            self._running[i].clear()  # steps of an attempt on a worker that died
            await finish(i, result)

        primed = self.prime is True or (self.prime is None and len(todo) > PRIME_MIN_ITEMS)
        spec = PoolSpec(
            runner=PrimedRunner(self._run, self.prime is True) if primed else self._run,
            todo=[(i, self.inputs[i]) for i in todo],
            max_flows=self.max_flows,
            hooks=self.options.call.hooks,
            store=self.options.store,
            cache=self.options.cache,
            replay=lambda i: durable is not None and _succeeded(durable, i),
            budget=shared.budget,
            prices=self.options.call.prices,
            shared=shared,
            # The backend starts the lanes where the calls run (on Ray, the workers').
            learn=_models(self.runner) if durable is not None and durable.job else (),
        )

        async def run_all() -> int:
            await self.backend.run_pool(spec, delivered, self._moved)
            return len(self.inputs)

        try:
            if durable is None:
                await run_all()
            else:
                await durable.around(run_all, len(self.inputs))
        finally:
            for steps in self._running:
                steps.clear()
        items = tuple(r for r in self._results if r is not None)
        return PoolResult(
            items=items,
            records=tuple(c for r in items for c in r.records),
            makespan=now() - started,
        )

    run = blocking(arun)

    def _moved(self, index: int, step: str, started: bool) -> None:
        """The backend moved input ``index`` into or out of ``step``."""
        running = self._running[index]
        if started:
            running.append(step)
        elif step in running:
            running.remove(step)


def _succeeded(durable: Durability, index: int) -> bool:
    prior = durable.prior.get(index)
    return prior is not None and prior[0] is Status.SUCCEEDED


def _item_record(result: FlowResult, index: int) -> CallRecord[Any]:
    """One input's outcome as a job item: its status, error, and its calls' totals."""
    summary = result.summary
    return CallRecord(
        status=result.status,
        error=result.error,
        start=result.start,
        end=result.end,
        usage=summary.usage,
        cost=summary.cost,
        index=index,
        cached=bool(result.records) and all(r.cached for r in result.records),
    )
