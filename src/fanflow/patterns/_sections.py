"""Sectioning and ``ParallelCalls``: task-parallel branches, then one combining call.

``sections`` runs several prompts over the same input at once (one per section), then
one synthesis call over every section that succeeded (``synthesize=False``: none).
``ParallelCalls`` is the class form from the pattern literature: one branch prompt over
many chunks (or a long text split into chunks), then an aggregate over the branch
outputs: a model's aggregate prompt, or code (``"concatenate"``, ``"merge"``, ``"vote"``
or a function).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Unpack

from .._engine import Run
from .._events import observed
from .._exceptions import ConfigError
from .._llm import LLM
from .._progress import with_progress
from .._sync import blocking
from .._types import CallRecord, MapResult, Request
from ._combine import CodeAggregator, Splitter, aggregator, chunks_of
from ._common import PatternResult, check_model, now, run_calls, run_function, run_items
from ._map import map as map_items
from ._options import Options, Resolved, option_attributes, resolve
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


@with_progress
@observed("sections")
async def sections(
    llm: LLM,
    prompts_or_sections: Sequence[str] | Mapping[str, str],
    *,
    input: str | Mapping[str, Any] | None = None,
    synthesize: LLM | bool | None = True,
    synthesis_prompt: str = DEFAULT_SYNTHESIS_PROMPT,
    system: str | None = None,
    temperature: float | None = None,
    progress: bool = False,
    **options: Unpack[Options],
) -> SectionsResult:
    """Run one prompt per section at once, then synthesise them into one answer.

    Args:
        llm: the sections' model.
        prompts_or_sections: prompts (named ``"section 0"``, ...) or ``{name: prompt}``.
        input: the shared input, filled into each prompt's fields (``{input}`` for a
            string; a mapping's keys by name). None leaves the prompts as written.
        synthesize: who combines the sections: True (the default: ``llm`` itself),
            another model, or False for no synthesis call (``output`` then joins the
            sections). ``None`` is the old spelling of False (deprecated).
        synthesis_prompt: its prompt; ``{sections}`` is every successful section under
            a ``## name`` heading.
        system: a system prompt. temperature: the sections' temperature.
        **options: the call options (:class:`fanflow.Options`); ``concurrency`` is the
            most sections in flight. A synthesis the budget cannot cover leaves
            ``synthesis`` None (``output`` joins the sections).

    Returns:
        A :class:`SectionsResult`; failed sections are data there.
    """
    o = resolve("sections", options)
    check_model(llm, "sections")
    if synthesize is None:
        warnings.warn(
            "sections(synthesize=None) is deprecated and will be removed in the next "
            "release: sections now synthesise by default; use synthesize=False for no "
            "synthesis call",
            DeprecationWarning,
            stacklevel=2,
        )
        synthesize = False
    synthesizer: LLM | None = llm if synthesize is True else synthesize or None
    if synthesizer is not None:
        check_model(synthesizer, "sections", "synthesize")
    if isinstance(prompts_or_sections, Mapping):
        named = dict(prompts_or_sections)
    else:
        named = {f"section {i}": p for i, p in enumerate(prompts_or_sections)}
    if not named:
        raise ConfigError("sections needs at least one prompt")
    if synthesize is not None:
        check_fields(synthesis_prompt, ("sections",), "synthesis_prompt")
    started = now()
    opts = o.run()
    requests = [
        Request.of(
            prompt if input is None else render(prompt, input, None),
            system=system,
            temperature=temperature,
            metadata={"pattern": "sections", "section": name},
        )
        for name, prompt in named.items()
    ]
    records = await run_items(llm, requests, opts, o, labels=list(named))
    by_name = dict(zip(named, records, strict=True))
    outputs = {name: r.value for name, r in by_name.items()}
    synthesis_record: CallRecord[str] | None = None
    if synthesizer is not None and any(r.ok for r in records):
        request = Request.of(
            fill(synthesis_prompt, {"sections": _joined(outputs)}, "synthesis_prompt"),
            metadata={"pattern": "sections", "role": "synthesis"},
        )
        synthesis_record = await _one_call(synthesizer, request, opts, o, "synthesis")
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
        aggregated: the aggregate: the aggregate call's output, or what the code
            aggregator returned (None without one, or if it failed).
        errors: failed branches by input index.
        branches: the branches' :class:`fanflow.MapResult`.
        aggregate_record: the aggregate's record (a model call, or the function).
        chunks: the chunks the branches ran on (the split text, with ``text=``).
    """

    outputs: list[str | None]
    aggregated: Any
    errors: dict[int, BaseException]
    branches: MapResult[str] = field(repr=False)
    aggregate_record: CallRecord[Any] | None = field(default=None, repr=False)
    chunks: tuple[Any, ...] = field(default=(), repr=False)


@option_attributes("timeout", "retry", "hooks", "store", "cache", "budget", "prices")
class ParallelCalls:
    """Run one branch prompt over many chunks at once, then aggregate the outputs.

    Args:
        llm: the model.
        max_workers: the most branches in flight at once (``concurrency`` in the other
            patterns; either spelling works).
        system: a system prompt for every call.
        **options: the call options (:class:`fanflow.Options`). A budget given as a
            number is a new cap for each run; a :class:`fanflow.Budget` is shared by
            every run. An aggregate call the budget cannot cover leaves ``aggregated``
            None.

    ``run`` is for synchronous code (scripts and notebook cells, the rule of
    :func:`fanflow.run`); ``arun`` is the async form.
    """

    def __init__(
        self,
        llm: LLM,
        max_workers: int | None = None,
        *,
        system: str | None = None,
        **options: Unpack[Options],
    ) -> None:
        check_model(llm, "ParallelCalls")
        if max_workers is not None and options.get("concurrency") not in (None, max_workers):
            raise ConfigError(
                "ParallelCalls: max_workers and concurrency are the same option; pass one"
            )
        limit = max_workers if max_workers is not None else options.get("concurrency") or 4
        if limit < 1:
            raise ConfigError(f"max_workers must be >= 1, got {limit}")
        self.llm = llm
        self.max_workers = limit
        self.system = system
        self.options = resolve("ParallelCalls", {**options, "concurrency": limit})

    def __repr__(self) -> str:
        return f"fanflow.ParallelCalls(llm={self.llm!r}, max_workers={self.max_workers})"

    @with_progress
    async def arun(
        self,
        chunks: Sequence[Any] | None = None,
        branch_prompt: str = "{input}",
        aggregate_prompt: str | None = None,
        *,
        aggregate: CodeAggregator | Callable[..., Any] | None = None,
        text: str | None = None,
        split: Splitter | None = None,
        progress: bool = False,
    ) -> ParallelCallsResult:
        """Run ``branch_prompt`` over every chunk, then aggregate the outputs once.

        Args:
            chunks: strings (``{input}`` in the prompt) or dicts (their keys by name).
            branch_prompt: the template for each chunk.
            aggregate_prompt: the template for a model's aggregate call; ``{input}`` is
                every successful output as ``[index] output`` blocks, in input order.
            aggregate: aggregate by code instead: ``"concatenate"``, ``"merge"``,
                ``"vote"`` (see :mod:`fanflow.patterns._combine`) or a function
                ``fn(outputs) -> value`` (sync or async) of the successful outputs.
                None and no ``aggregate_prompt``: no aggregate.
            text: a long text to divide into chunks instead of ``chunks``.
            split: how to divide ``text``: ``"paragraphs"`` (the default), a size in
                characters (paragraphs packed up to it), or a function
                ``fn(text) -> chunks``. :func:`fanflow.split_text` does the same alone.

        Returns:
            A :class:`ParallelCallsResult`.
        """
        if (chunks is None) == (text is None):
            raise ConfigError(
                "ParallelCalls.run: pass either chunks or text= (a text to split), not "
                + ("both" if chunks is not None else "neither")
            )
        if split is not None and text is None:
            raise ConfigError("ParallelCalls.run: split= divides text=; pass text=")
        if aggregate is not None and aggregate_prompt is not None:
            raise ConfigError(
                "ParallelCalls.run: pass aggregate= (code) or aggregate_prompt= (a model), not both"
            )
        combine = aggregator(aggregate) if aggregate is not None else None
        items = list(chunks) if chunks is not None else chunks_of(text or "", split)
        if aggregate_prompt is not None:
            check_fields(aggregate_prompt, ("input",), "aggregate_prompt")
        started = now()
        o = self.options
        opts = o.run()
        branches = await map_items(
            self.llm,
            branch_prompt,
            items,
            system=self.system,
            label="branch",
            **o.as_kwargs(budget=opts.budget),  # one cap for the branches and the aggregate
        )
        outputs: list[str | None] = list(branches.outputs)
        done = [out for out in outputs if out is not None]
        record: CallRecord[Any] | None = None
        if combine is not None and done:
            record = await run_function(combine, done, label="aggregate")
        elif aggregate_prompt is not None and done:
            listing = "\n\n".join(f"[{i}]\n{o}" for i, o in enumerate(outputs) if o is not None)
            request = Request.of(
                render(aggregate_prompt, listing, None),
                system=self.system,
                metadata={"pattern": "parallel_calls", "role": "aggregate"},
            )
            record = await _one_call(self.llm, request, opts, o, "aggregate")
        return ParallelCallsResult(
            outputs=outputs,
            aggregated=record.value if record is not None else None,
            errors=branches.errors,
            branches=branches,
            aggregate_record=record,
            chunks=tuple(items),
            records=branches.records + ((record,) if record is not None else ()),
            makespan=now() - started,
        )

    run = blocking(arun)


async def _one_call(
    llm: LLM, request: Request, opts: Run, o: Resolved, label: str
) -> CallRecord[Any]:
    """One call (a synthesis, an aggregation) through the pattern's store."""
    [record] = await run_calls(llm, [request], opts, labels=[label], store=o.store, cache=o.cache)
    return record
