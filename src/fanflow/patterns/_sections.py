"""Sectioning and ``ParallelCalls``: task-parallel branches, then one combining call.

``sections`` runs several prompts over the same input at once (one per section), then
optionally one synthesis call over every section that succeeded. ``ParallelCalls`` is
the class form from the pattern literature: one branch prompt over many chunks, then an
aggregate prompt over the branch outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._budget import Budget, as_budget
from .._engine import make_options
from .._events import Hook
from .._exceptions import ConfigError
from .._llm import LLM
from .._pricing import Price
from .._retry import RetryPolicy
from .._sync import run as run_sync
from .._types import BatchResult, CallRecord, Request
from ..store import Store
from ._common import PatternResult, now, options_with, run_calls
from ._map import map as map_items
from ._prompt import check_fields, fill, render

__all__ = [
    "DEFAULT_SYNTHESIS_PROMPT",
    "ParallelCalls",
    "ParallelCallsResult",
    "SectionsResult",
    "sections",
]

DEFAULT_SYNTHESIS_PROMPT = (
    "Combine the sections below into one coherent, well-organised document. Keep every "
    "fact; remove repetition.\n\n{sections}"
)


@dataclass(frozen=True, kw_only=True, repr=False)
class SectionsResult(PatternResult):
    """Each section's output by name, and the synthesis.

    Attributes:
        sections: output per section name, in the order given (None where it failed).
        section_records: each section's record, by name.
        synthesis: the synthesis call's output (None without one, or if it failed).
        synthesis_record: its record.
    """

    sections: dict[str, str | None]
    section_records: dict[str, CallRecord[str]] = field(repr=False)
    synthesis: str | None = None
    synthesis_record: CallRecord[str] | None = field(default=None, repr=False)

    @property
    def errors(self) -> dict[str, BaseException]:
        """Failed sections by name."""
        return {k: r.error for k, r in self.section_records.items() if r.error is not None}

    @property
    def output(self) -> str:
        """The synthesis, else the successful sections joined under their names."""
        if self.synthesis is not None:
            return self.synthesis
        return _joined(self.sections)


def _joined(outputs: Mapping[str, str | None]) -> str:
    return "\n\n".join(f"## {name}\n{text}" for name, text in outputs.items() if text is not None)


async def sections(
    llm: LLM,
    prompts_or_sections: Sequence[str] | Mapping[str, str],
    *,
    input: str | Mapping[str, Any] | None = None,
    synthesize: LLM | None = None,
    synthesis_prompt: str = DEFAULT_SYNTHESIS_PROMPT,
    system: str | None = None,
    temperature: float | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int | None = None,
    hooks: Sequence[Hook] = (),
    store: Store | None = None,
    cache: bool = True,
    budget: float | Budget | None = None,
    prices: Mapping[str, Price] | None = None,
) -> SectionsResult:
    """Run one prompt per section at once, then optionally synthesise them.

    Args:
        llm: the sections' model.
        prompts_or_sections: prompts (named ``"section 0"``, ...) or ``{name: prompt}``.
        input: the shared input, filled into each prompt's fields (``{input}`` for a
            string; a mapping's keys by name). None leaves the prompts as written.
        synthesize: a model that combines the sections (None: no synthesis call).
        synthesis_prompt: its prompt; ``{sections}`` is every successful section under
            a ``## name`` heading.
        system: a system prompt. temperature: the sections' temperature.
        timeout: seconds per attempt. retry: the retry policy.
        concurrency: the most sections in flight. hooks: receive every call's events.
        store: a :class:`fanflow.Store` for every call it makes: a call stored before
            is served from it (``cached=True``, costing nothing), a new one is committed
            before it counts.
        cache: serve calls found in the store (False: ask the model again and store
            the new replies).
        budget: the most its calls may spend together: dollars (a number) or a
            :class:`fanflow.Budget` (share one to cap several patterns at once). Each
            attempt reserves its expected cost first; calls the budget cannot cover end
            ``skipped`` with ``BudgetExceeded`` (a skipped synthesis leaves ``synthesis``
            None; ``output`` joins the sections).
        prices: model prices beyond the built-in table, ``{model: fanflow.Price}``.

    Returns:
        A :class:`SectionsResult`; failed sections are data there.
    """
    if isinstance(prompts_or_sections, Mapping):
        named = dict(prompts_or_sections)
    else:
        named = {f"section {i}": p for i, p in enumerate(prompts_or_sections)}
    if not named:
        raise ConfigError("sections needs at least one prompt")
    if synthesize is not None:
        check_fields(synthesis_prompt, ("sections",), "synthesis_prompt")
    started = now()
    options = options_with(budget, prices)
    opts = options(concurrency=concurrency, timeout=timeout, retry=retry, hooks=hooks)
    requests = [
        Request.of(
            prompt if input is None else render(prompt, input, None),
            system=system,
            temperature=temperature,
            metadata={"pattern": "sections", "section": name},
        )
        for name, prompt in named.items()
    ]
    records = await run_calls(llm, requests, opts, labels=list(named), store=store, cache=cache)
    by_name = dict(zip(named, records, strict=True))
    outputs = {name: r.value for name, r in by_name.items()}
    synthesis_record: CallRecord[str] | None = None
    if synthesize is not None and any(r.ok for r in records):
        request = Request.of(
            fill(synthesis_prompt, {"sections": _joined(outputs)}, "synthesis_prompt"),
            metadata={"pattern": "sections", "role": "synthesis"},
        )
        [synthesis_record] = await run_calls(
            synthesize,
            [request],
            options(timeout=timeout, retry=retry, hooks=hooks),
            labels=["synthesis"],
            store=store,
            cache=cache,
        )
    return SectionsResult(
        sections=outputs,
        section_records=by_name,
        synthesis=synthesis_record.value if synthesis_record is not None else None,
        synthesis_record=synthesis_record,
        records=tuple(records) + ((synthesis_record,) if synthesis_record is not None else ()),
        makespan=now() - started,
    )


@dataclass(frozen=True, kw_only=True, repr=False)
class ParallelCallsResult(PatternResult):
    """Branch outputs in input order, the aggregate, and the failed branches.

    Attributes:
        outputs: each chunk's branch output, by input index (None where it failed).
        aggregated: the aggregate call's output (None without one, or if it failed).
        errors: failed branches by input index.
        branches: the branches' :class:`fanflow.BatchResult`.
        aggregate_record: the aggregate call's record.
    """

    outputs: list[str | None]
    aggregated: str | None
    errors: dict[int, BaseException]
    branches: BatchResult[str] = field(repr=False)
    aggregate_record: CallRecord[str] | None = field(default=None, repr=False)


class ParallelCalls:
    """Run one branch prompt over many chunks at once, then aggregate the outputs.

    Args:
        llm: the model.
        max_workers: the most branches in flight at once.
        system: a system prompt for every call.
        timeout: seconds per attempt. retry: the retry policy. hooks: receive events.
        store: a :class:`fanflow.Store` for every call it makes: a call stored before
            is served from it (``cached=True``, costing nothing), a new one is committed
            before it counts.
        cache: serve calls found in the store (False: ask the model again and store
            the new replies).
        budget: the most one run may spend, branches and aggregate together: dollars
            (a new cap for each run) or a :class:`fanflow.Budget` (shared by every run
            and whatever else is given it). Branches it cannot cover end ``skipped``
            with ``BudgetExceeded``; so does an aggregate call (``aggregated`` is None).
        prices: model prices beyond the built-in table, ``{model: fanflow.Price}``.

    ``run`` is for synchronous code (it works inside a running loop too, as
    :func:`fanflow.run` does); ``arun`` is the async form.
    """

    def __init__(
        self,
        llm: LLM,
        max_workers: int = 4,
        *,
        system: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        hooks: Sequence[Hook] = (),
        store: Store | None = None,
        cache: bool = True,
        budget: float | Budget | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        if max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        self.llm = llm
        self.max_workers = max_workers
        self.system = system
        self.timeout = timeout
        self.retry = retry
        self.hooks = tuple(hooks)
        self.store = store
        self.cache = cache
        as_budget(budget)  # a bad value fails here rather than at the first run
        self.budget = budget
        self.prices = prices

    def __repr__(self) -> str:
        return f"fanflow.ParallelCalls(llm={self.llm!r}, max_workers={self.max_workers})"

    def run(
        self,
        chunks: Sequence[Any],
        branch_prompt: str = "{input}",
        aggregate_prompt: str | None = None,
    ) -> ParallelCallsResult:
        """Synchronous :meth:`arun`."""
        return run_sync(lambda: self.arun(chunks, branch_prompt, aggregate_prompt))

    async def arun(
        self,
        chunks: Sequence[Any],
        branch_prompt: str = "{input}",
        aggregate_prompt: str | None = None,
    ) -> ParallelCallsResult:
        """Run ``branch_prompt`` over every chunk, then ``aggregate_prompt`` once.

        Args:
            chunks: strings (``{input}`` in the prompt) or dicts (their keys by name).
            branch_prompt: the template for each chunk.
            aggregate_prompt: the template for the aggregate call; ``{input}`` is every
                successful output as ``[index] output`` blocks, in input order. None: no
                aggregate call.

        Returns:
            A :class:`ParallelCallsResult`.
        """
        if aggregate_prompt is not None:
            check_fields(aggregate_prompt, ("input",), "aggregate_prompt")
        started = now()
        cap = as_budget(self.budget)
        branches = await map_items(
            self.llm,
            branch_prompt,
            chunks,
            concurrency=self.max_workers,
            system=self.system,
            timeout=self.timeout,
            retry=self.retry,
            hooks=self.hooks,
            label="branch",
            store=self.store,
            cache=self.cache,
            budget=cap,
            prices=self.prices,
        )
        outputs: list[str | None] = list(branches.outputs)
        record: CallRecord[str] | None = None
        if aggregate_prompt is not None and any(o is not None for o in outputs):
            listing = "\n\n".join(f"[{i}]\n{o}" for i, o in enumerate(outputs) if o is not None)
            request = Request.of(
                render(aggregate_prompt, listing, None),
                system=self.system,
                metadata={"pattern": "parallel_calls", "role": "aggregate"},
            )
            opts = make_options(
                timeout=self.timeout,
                retry=self.retry,
                hooks=self.hooks,
                budget=cap,
                prices=self.prices,
            )
            [record] = await run_calls(
                self.llm,
                [request],
                opts,
                labels=["aggregate"],
                store=self.store,
                cache=self.cache,
            )
        return ParallelCallsResult(
            outputs=outputs,
            aggregated=record.value if record is not None else None,
            errors=branches.errors,
            branches=branches,
            aggregate_record=record,
            records=branches.records + ((record,) if record is not None else ()),
            makespan=now() - started,
        )
