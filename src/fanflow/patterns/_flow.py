"""``Step``, ``Chain`` and ``Flow``: multi-step work over one input dict.

A step runs a *runner* (a :class:`Skill`, a plain sync or async function, or a nested
``Chain``/``Flow``) on inputs taken from the context (the input dict plus every earlier
step's output, stored under the step's ``output`` key), and stores its value under its
own key. ``inputs={"param": "source_key"}`` maps context keys to the runner's inputs;
without it a skill gets the whole context and a function the keys named like its
parameters.

A ``Chain`` runs its steps in order. A ``Flow`` is a DAG: a step depends on the steps
whose outputs it reads (and on any named in ``after=``); every step whose dependencies
are done starts at once, so independent steps overlap. A failed step skips the steps
that depend on it; independent branches go on.

Input keys are checked before anything runs: a missing key fails the item at once with
a :class:`fanflow.errors.StepInputError` naming the step and the key.

Sync functions run in a worker thread (``asyncio.to_thread``), so a blocking step
(fetching a URL with requests, say) does not hold up the other items.

Model calls are made by skills only, so a skill's ``store=`` (or a pool's, which
overrides it) covers every model call of a chain or flow. Likewise ``budget=`` given to
a chain, flow or pool caps every model call of every step together (it overrides the
skills' own); a step the budget cannot cover ends ``skipped`` with
:class:`fanflow.BudgetExceeded`, and so does its run (the steps that depend on it are
skipped, the finished ones keep their values).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias, Unpack

from .._events import Hook, observed
from .._exceptions import ConfigError, Skipped, StepInputError
from .._progress import shown
from .._sync import blocking
from .._types import CallRecord, Status, elapsed
from .._util import is_async_callable
from ..backends._base import OWN, Enclosing
from ._common import PatternResult, now
from ._options import Options, Resolved, option_attributes, resolve
from ._skill import Skill

__all__ = ["Chain", "Flow", "FlowResult", "Step", "StepRecord"]

Runner: TypeAlias = "Skill | Chain | Flow | Callable[..., Any]"
OnStep = Callable[[str, bool], None]


@dataclass(frozen=True, repr=False)
class StepRecord:
    """What one step did: status, value or error, its calls and when it ran."""

    name: str
    output: str
    status: Status
    value: Any = None
    error: BaseException | None = None
    calls: tuple[CallRecord[Any], ...] = field(default=(), repr=False)
    start: float | None = None
    end: float | None = None

    def __repr__(self) -> str:
        return f"fanflow.results.StepRecord({self.name!r}, status={self.status.value})"

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED

    @property
    def latency(self) -> float | None:
        return elapsed(self.start, self.end)


@dataclass(frozen=True, kw_only=True, repr=False)
class FlowResult(PatternResult):
    """One input's run through a chain, flow or skill.

    Attributes:
        status: ``succeeded`` when every step succeeded, else the first failed step's.
        output: a chain's last step value; a flow's ``{output key: value}``; a skill's value.
        error: the first failed step's error.
        failed_step: that step's name.
        context: the inputs plus every successful step's output.
        steps: each step's :class:`StepRecord`, in declaration order.
        index: the input's index in a pool.
    """

    status: Status
    output: Any = None
    error: BaseException | None = None
    failed_step: str | None = None
    context: dict[str, Any] = field(default_factory=dict, repr=False)
    steps: tuple[StepRecord, ...] = field(default=(), repr=False)
    index: int | None = None
    start: float | None = field(default=None, repr=False)
    end: float | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED

    @property
    def step(self) -> dict[str, StepRecord]:
        """Step records by name."""
        return {s.name: s for s in self.steps}


def _runner_name(runner: Any) -> str:
    if isinstance(runner, Skill):
        return runner.name
    return str(getattr(runner, "__name__", type(runner).__name__))


def _function_needs(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    """(required parameter names, whether it takes ``**kwargs``)."""
    required: list[str] = []
    takes_any = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            takes_any = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty:
            required.append(p.name)
    return required, takes_any


class Step:
    """One step of a :class:`Chain` or :class:`Flow`.

    Args:
        runner: a :class:`Skill`, a sync or async function, or a nested Chain/Flow.
        output: the context key its value is stored under.
        inputs: ``{runner input: context key}``; None: a skill or nested chain gets the
            whole context, a function the keys named like its required parameters.
        name: a name for records and errors (default: ``output``).
        after: in a Flow, output keys of steps that must finish first even though this
            step reads nothing from them.
    """

    def __init__(
        self,
        runner: Runner,
        output: str,
        inputs: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        after: Sequence[str] = (),
    ) -> None:
        if not callable(runner) and not isinstance(runner, Chain | Flow):
            raise ConfigError(
                f"step {output!r}: runner must be a Skill, a function, a Chain or a Flow"
            )
        self.runner = runner
        self.output = output
        self.inputs = dict(inputs) if inputs is not None else None
        self.name = name or output
        self.after = tuple(after)

    def __repr__(self) -> str:
        return f"fanflow.Step({_runner_name(self.runner)!r}, output={self.output!r})"

    def needs(self) -> list[tuple[str, str]]:
        """``(runner input, context key)`` pairs this step reads."""
        if self.inputs is not None:
            return list(self.inputs.items())
        runner = self.runner
        if isinstance(runner, Skill):
            return [(f, f) for f in runner.fields]
        if isinstance(runner, Chain | Flow):
            return [(k, k) for k in runner.required_keys]
        required, _ = _function_needs(runner)
        return [(p, p) for p in required]

    def arguments(self, context: Mapping[str, Any]) -> dict[str, Any]:
        if self.inputs is not None:
            return {param: context[key] for param, key in self.inputs.items()}
        runner = self.runner
        if isinstance(runner, Skill | Chain | Flow):
            return dict(context)
        _, takes_any = _function_needs(runner)
        if takes_any:
            return dict(context)
        names = inspect.signature(runner).parameters
        return {k: v for k, v in context.items() if k in names}

    async def execute(
        self,
        context: Mapping[str, Any],
        *,
        index: int | None,
        hooks: Sequence[Hook],
        enclosing: Enclosing = OWN,
    ) -> StepRecord:
        start = now()
        args = self.arguments(context)
        runner = self.runner
        calls: tuple[CallRecord[Any], ...] = ()
        if isinstance(runner, Skill):
            got = await runner.execute(
                args, index=index, label=self.name, hooks=hooks, enclosing=enclosing
            )
            status, value, error, calls = got.status, got.value, got.error, got.calls
        elif isinstance(runner, Chain | Flow):
            sub = await runner.execute(args, index=index, hooks=hooks, enclosing=enclosing)
            status, value, error, calls = sub.status, sub.output, sub.error, sub.records
        else:
            try:
                value = await _call_kw(runner, args)
                status, error = Status.SUCCEEDED, None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status, value, error = Status.FAILED, None, exc
        if status is not Status.SUCCEEDED:
            value = None
        return StepRecord(self.name, self.output, status, value, error, calls, start, now())


async def _call_kw(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    # A step may do blocking work (fetch a URL with requests, parse a PDF): a sync
    # function runs in a worker thread so the other items' steps keep going meanwhile.
    if is_async_callable(fn):
        return await fn(**kwargs)
    result = await asyncio.to_thread(functools.partial(fn, **kwargs))
    if inspect.isawaitable(result):
        result = await result
    return result


@option_attributes("budget", "prices")
class _Graph(ABC):
    """Steps with dependencies, run as soon as their dependencies are done."""

    kind = "flow"

    def __init__(
        self,
        steps: Sequence[Step],
        **options: Unpack[Options],
    ) -> None:
        self.options: Resolved = resolve(self.kind.capitalize(), options)
        _unique_outputs(steps, self.kind)
        self.steps = tuple(steps)
        self.deps = self._dependencies(self.steps)
        produced = {s.output for s in self.steps}
        self.required_keys: list[str] = []
        for s in self.steps:
            for _, key in s.needs():
                if key not in produced and key not in self.required_keys:
                    self.required_keys.append(key)

    @abstractmethod
    def _dependencies(self, steps: tuple[Step, ...]) -> list[set[int]]:
        """Each step's dependencies (indexes of steps), once the steps are checked."""

    def check(self, keys: Collection[str], index: int | None) -> StepInputError | None:
        """The first step input that the given input keys cannot provide, or None."""
        missing = [k for k in self.required_keys if k not in keys]
        if not missing:
            return None
        for step in self.steps:
            for param, key in step.needs():
                if key in missing:
                    return _missing(self.kind, step, param, key, sorted(keys), index)
        return None  # pragma: no cover - every required key is needed by some step

    def __repr__(self) -> str:
        names = [s.name for s in self.steps]
        return f"fanflow.{type(self).__name__}({names})"

    async def arun(
        self, inputs: Mapping[str, Any] | None = None, /, *, progress: bool = False, **kwargs: Any
    ) -> FlowResult:
        """Run the steps over one input dict (and/or keyword inputs); failures are data.

        ``progress=True`` shows its calls live (an input named ``progress`` goes in the
        ``inputs`` mapping).
        """
        run = self.execute({**(inputs or {}), **kwargs}, index=None, hooks=())
        return await shown(run, progress=progress)

    run = blocking(arun)

    @observed("flow")
    async def execute(
        self,
        inputs: Mapping[str, Any],
        *,
        index: int | None,
        hooks: Sequence[Hook],
        on_step: OnStep | None = None,
        enclosing: Enclosing = OWN,
    ) -> FlowResult:
        """Run the steps over ``inputs``.

        ``enclosing``'s ``store``/``cache``/``budget``/``prices`` (an enclosing pool's or
        flow's) apply to its skills, else the graph's own; without ``budget``, the
        graph's own (a number: a new cap for this run) caps every step. The graph's
        timing options (its own, else ``enclosing.shared``'s) apply to every skill that
        sets none: one deadline and one concurrency gate for the whole run.
        """
        started = now()
        own, outer = self.options, enclosing
        run = own.run()
        given_cache = own.cache if "cache" in own.given else None
        steps_within = replace(
            outer,
            budget=outer.budget if outer.budget is not None else run.budget,
            prices=outer.prices if outer.prices is not None else own.call.prices,
            store=outer.store if outer.store is not None else own.store,
            cache=outer.cache if outer.cache is not None else given_cache,
            shared=run.within(outer.shared, own.given),
        )
        hooks = (*hooks, *own.call.hooks)
        context = dict(inputs)
        problem = self.check(context.keys(), index)
        if problem is not None:
            return FlowResult(
                status=Status.FAILED,
                error=problem,
                failed_step=problem.step,
                context=context,
                index=index,
                start=started,
                end=now(),
            )
        done: dict[int, StepRecord] = {}
        running: dict[asyncio.Task[StepRecord], int] = {}
        loop = asyncio.get_running_loop()

        def launch(i: int) -> None:
            if on_step is not None:
                on_step(self.steps[i].name, True)
            step = self.steps[i].execute(context, index=index, hooks=hooks, enclosing=steps_within)
            running[loop.create_task(step)] = i

        def start_ready() -> None:
            for i in self._ready(done, set(running.values())):
                launch(i)

        try:
            start_ready()
            while running:
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(finished, key=lambda t: running[t]):
                    i = running.pop(task)
                    record = task.result()
                    done[i] = record
                    if on_step is not None:
                        on_step(record.name, False)
                    if record.ok:
                        context[record.output] = record.value
                start_ready()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        steps = tuple(done[i] for i in range(len(self.steps)))
        return self._result(steps, context, index=index, started=started)

    def _ready(self, done: dict[int, StepRecord], running: set[int]) -> list[int]:
        """The steps whose dependencies are all done and succeeded, to start now.

        A step with a dependency that did not succeed is recorded as skipped instead;
        that may make its dependents skippable too, so this repeats until stable.
        """
        ready: list[int] = []
        changed = True
        while changed:
            changed = False
            for i, step in enumerate(self.steps):
                if i in done or i in running or i in ready:
                    continue
                if any(d not in done for d in self.deps[i]):
                    continue
                failed = [self.steps[d].name for d in sorted(self.deps[i]) if not done[d].ok]
                if not failed:
                    ready.append(i)
                    continue
                error = Skipped(
                    f"step {step.name!r} was skipped: step {failed[0]!r}, which it "
                    "depends on, did not succeed"
                )
                done[i] = StepRecord(step.name, step.output, Status.SKIPPED, error=error)
                changed = True
        return ready

    def _result(
        self,
        steps: tuple[StepRecord, ...],
        context: dict[str, Any],
        *,
        index: int | None,
        started: float,
    ) -> FlowResult:
        # A step skipped because a step it needs did not succeed is not the cause; one
        # skipped for its own reason (the budget) is.
        bad = [s for s in steps if not s.ok and not _skipped_for_upstream(s)]
        first_bad = bad[0] if bad else None
        return FlowResult(
            status=Status.SUCCEEDED if first_bad is None else first_bad.status,
            output=self._output(steps) if first_bad is None else None,
            error=first_bad.error if first_bad is not None else None,
            failed_step=first_bad.name if first_bad is not None else None,
            context=context,
            steps=steps,
            index=index,
            start=started,
            end=now(),
            records=tuple(c for s in steps for c in s.calls),
            makespan=now() - started,
        )

    def _output(self, steps: Sequence[StepRecord]) -> Any:
        return {s.output: s.value for s in steps}


def _skipped_for_upstream(step: StepRecord) -> bool:
    return step.status is Status.SKIPPED and type(step.error) is Skipped


def _missing(
    kind: str, step: Step, param: str, key: str, have: list[str], index: int | None
) -> StepInputError:
    where = f"item {index}: " if index is not None else ""
    via = f" (for its input {param!r})" if param != key else ""
    return StepInputError(
        f"{where}{kind} step {step.name!r} needs key {key!r}{via}, but it is neither in "
        f"the input (which has {have}) nor the output of an earlier step; add it to the "
        f"input, or map an available key with inputs={{{param!r}: '<key>'}}",
        step=step.name,
        field=key,
        index=index,
    )


def _unique_outputs(steps: Sequence[Step], kind: str) -> None:
    if not steps:
        raise ConfigError(f"a {kind} needs at least one step")
    seen: set[str] = set()
    for s in steps:
        if s.output in seen:
            raise ConfigError(
                f"two steps of the {kind} write the output key {s.output!r}; give each its own"
            )
        seen.add(s.output)


class Chain(_Graph):
    """Steps run one after another; each step's output is available to later steps.

    Args:
        steps: the :class:`Step` objects, in order.
        **options: the call options (:class:`fanflow.Options`) of one run: ``budget``
            caps every step's calls together (a number: a new cap for each run) and,
            with ``prices``, ``store`` and ``cache``, overrides the skills' own; the
            other options apply to every skill that sets none (one ``deadline`` and one
            ``concurrency`` limit for the whole run).

    ``await chain.arun({"url": ...})`` (or ``chain.run(...)`` from sync code) returns
    a :class:`FlowResult` whose ``output`` is the last step's value.
    """

    kind = "chain"

    def _dependencies(self, steps: tuple[Step, ...]) -> list[set[int]]:
        for i, s in enumerate(steps):
            if s.after:
                raise ConfigError(
                    f"chain step {s.name!r}: after= is for Flow; chain steps run in order"
                )
            later = {t.output for t in steps[i:]}
            for param, key in s.needs():
                if key in later:
                    raise StepInputError(
                        f"chain step {s.name!r} needs key {key!r}"
                        + (f" (for its input {param!r})" if param != key else "")
                        + f", which is only produced by step {key!r} at or after it; "
                        "reorder the steps, or use a Flow",
                        step=s.name,
                        field=key,
                    )
        return [{i - 1} if i else set() for i in range(len(steps))]

    def _output(self, steps: Sequence[StepRecord]) -> Any:
        return steps[-1].value


class Flow(_Graph):
    """A DAG of steps: independent steps run at once, dependent ones wait.

    A step depends on every step whose ``output`` it reads and on the output keys named
    in its ``after=``. ``output`` of the result is ``{output key: value}`` for every step.

    Args:
        steps: the :class:`Step` objects (any order).
        **options: the call options (:class:`fanflow.Options`) of one run: ``budget``
            caps every step's calls together (a number: a new cap for each run) and,
            with ``prices``, ``store`` and ``cache``, overrides the skills' own; the
            other options apply to every skill that sets none (one ``deadline`` and one
            ``concurrency`` limit for the whole run).

    Raises:
        ConfigError: two steps share an output key, ``after=`` names an unknown key, or
            the dependencies form a cycle (the message names it).
    """

    kind = "flow"

    def _dependencies(self, steps: tuple[Step, ...]) -> list[set[int]]:
        producer = {s.output: i for i, s in enumerate(steps)}
        deps: list[set[int]] = []
        for s in steps:
            wanted = {producer[k] for _, k in s.needs() if k in producer}
            for key in s.after:
                if key not in producer:
                    raise ConfigError(
                        f"flow step {s.name!r}: after={key!r} names no step's output; "
                        f"outputs are {sorted(producer)}"
                    )
                wanted.add(producer[key])
            deps.append(wanted)
        _no_cycle(steps, deps)
        return deps


def _no_cycle(steps: Sequence[Step], deps: list[set[int]]) -> None:
    state = [0] * len(steps)  # 0 new, 1 on the path, 2 finished

    def visit(i: int, path: list[int]) -> None:
        state[i] = 1
        for d in sorted(deps[i]):
            if state[d] == 1:
                cycle = [*path[path.index(d) :], d] if d in path else [i, d]
                names = " -> ".join(steps[j].name for j in cycle)
                raise ConfigError(f"the flow's steps depend on each other in a cycle: {names}")
            if state[d] == 0:
                visit(d, [*path, d])
        state[i] = 2

    for i in range(len(steps)):
        if state[i] == 0:
            visit(i, [i])
