"""Every deprecated spelling still served warns, names its replacement and says it
goes in the next release (issue 22: deprecated aliases kept for exactly one release);
none is served from the top level but ``fanflow.BatchResult``, renamed ``MapResult``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import fanflow
import fanflow.backends
from fanflow.backends import CallOptions, MapSpec
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime

NEXT_RELEASE = "deprecated and will be removed in the next release"


def _spec() -> MapSpec:
    return MapSpec(llm=ScriptedLLM(), build=lambda i, n: fanflow.Request.of(str(i)), items=[],
                   parse=str, options=CallOptions(timeout=2.0))  # fmt: skip


async def _race() -> Any:
    return await fanflow.race(fanflow.call(ScriptedLLM(), "q"), timeout=5.0)  # type: ignore[call-arg]


async def _sections() -> Any:
    return await fanflow.sections(ScriptedLLM(), {"a": "A"}, synthesize=None)


async def _stream() -> Any:
    return aiter(fanflow.as_completed(ScriptedLLM(), "{input}", ["a"]))


async def _spec_field() -> Any:
    return _spec().timeout  # type: ignore[attr-defined]


async def _protocol() -> Any:
    return fanflow.backends.BatchRun  # type: ignore[attr-defined]


async def _old_result() -> Any:
    return fanflow.BatchResult  # type: ignore[attr-defined]


async def _old_result_in_results() -> Any:
    import fanflow.results

    return fanflow.results.BatchResult  # type: ignore[attr-defined]


USES: dict[str, tuple[Callable[[], Awaitable[Any]], str]] = {
    "race(timeout=)": (_race, "use deadline="),
    "sections(synthesize=None)": (_sections, "use synthesize=False"),
    "as_completed without async with": (_stream, "write 'async with"),
    "MapSpec.timeout": (_spec_field, "spec.options.timeout"),
    "backends.BatchRun": (_protocol, "fanflow.backends.MapRun"),
    "fanflow.BatchResult": (_old_result, "use fanflow.MapResult"),
    "fanflow.results.BatchResult": (_old_result_in_results, "use fanflow.MapResult"),
}


@pytest.mark.parametrize("use", list(USES))
async def test_each_deprecated_spelling_warns_for_one_release(use: str) -> None:
    run, replacement = USES[use]
    with pytest.warns(DeprecationWarning, match=NEXT_RELEASE) as caught:
        await run()
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any(replacement in m for m in messages), messages


def test_no_deprecated_name_is_served_from_the_top_level() -> None:
    for name in ("BatchRun", "MapRun", "RunResult", "Estimate", "Evaluation", "DEFAULT_WINDOW"):
        with pytest.raises(AttributeError):
            getattr(fanflow, name)


def test_the_old_result_name_is_the_new_class() -> None:
    with pytest.warns(DeprecationWarning, match=NEXT_RELEASE):
        old = fanflow.BatchResult  # type: ignore[attr-defined]
    assert old is fanflow.MapResult
