"""Running a validated pipeline: ``Skill`` per step, ``Chain`` or ``Flow``, over the items
with ``Pool`` (a thin adapter: the patterns do the work)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._llm import BaseLLM
from .._types import Status
from ._io import Item, OutputWriter
from ._pipeline import Pipeline
from ._progress import Tracker, drive

__all__ = ["PipelineOutcome", "build_runner", "run_pipeline"]


def build_runner(pipe: Pipeline, llms: Mapping[str | None, BaseLLM]) -> Any:
    """The ``Chain``/``Flow`` of ``pipe``; ``llms[None]`` is the default model."""
    from ..patterns import Chain, Flow, Skill, Step

    steps = []
    for spec in pipe.steps:
        skill = Skill(
            llms[spec.model],
            spec.prompt,
            system=spec.system,
            name=spec.name,
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
            seed=spec.seed,
        )
        steps.append(Step(skill, spec.output, spec.inputs, name=spec.name, after=spec.after))
    return Chain(steps) if pipe.kind == "chain" else Flow(steps)


@dataclass
class PipelineOutcome:
    interrupted: bool = False
    items: int = 0
    succeeded: int = 0


def _row(item: Item, index: int, result: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": index,
        "line": item.line,
        "input": item.value,
        "status": str(result.status),
        "output": result.output,
        "steps": {s.output: s.value for s in result.steps if s.status is Status.SUCCEEDED},
    }
    if result.error is not None:
        row["error"] = f"{type(result.error).__name__}: {result.error}"
        row["failed_step"] = result.failed_step
    return row


async def run_pipeline(
    pipe: Pipeline,
    runner: Any,
    items: Sequence[Item],
    *,
    tracker: Tracker,
    display: Any,
    writer: OutputWriter,
    pool_options: Mapping[str, Any] | None = None,
) -> PipelineOutcome:
    """Run every item through ``runner`` with :class:`fanflow.patterns.Pool`; write rows."""
    from ..patterns import Pool

    inputs = [i.value if isinstance(i.value, dict) else {"input": i.value} for i in items]
    pool = Pool(runner, inputs, pipe.max_flows, hooks=[tracker], **(pool_options or {}))
    outcome = PipelineOutcome(items=len(items))
    driver = asyncio.ensure_future(drive(display))
    try:
        result = await pool.arun()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        outcome.interrupted = True
        status = pool.status
        outcome.succeeded = status.succeeded
        return outcome
    finally:
        tracker.stop()
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
    for index, (item, run) in enumerate(zip(items, result.items, strict=True)):
        writer.write(_row(item, index, run))
        outcome.succeeded += run.status is Status.SUCCEEDED
    writer.flush()
    return outcome
