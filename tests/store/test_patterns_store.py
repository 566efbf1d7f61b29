"""Patterns with ``store=``: every call they make is looked up and committed; ``job=`` on
fan_out and Pool records each worker's / input's terminal status, so a second process
(here: a second Store object on the same file) re-runs only what did not succeed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import fanflow
from fanflow import Chain, Flow, Pool, QuorumNotMet, Request, Skill, Status, Step, Store
from fanflow.errors import BadRequest
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(db: Path) -> Any:
    with Store(db) as s:
        yield s


def numbered(request: Request) -> str:
    """A reply every pattern can use: a score, a choice, a verdict and the prompt."""
    return f'{{"score": 7, "best": 2, "safe": true}} about {request.prompt[:40]}'


async def _chain(llm: ScriptedLLM, store: Store) -> Any:
    chain = Chain(
        [
            Step(Skill(llm, "Draft: {topic}", store=store), output="draft"),
            Step(Skill(llm, "Polish: {draft}", store=store), output="final"),
        ]
    )
    return await chain.arun(topic="tides")


async def _flow(llm: ScriptedLLM, store: Store) -> Any:
    flow = Flow(
        [
            Step(Skill(llm, "Extract: {text}", store=store), output="facts"),
            Step(Skill(llm, "Sentiment: {facts}", store=store), output="sentiment"),
            Step(Skill(llm, "Entities: {facts}", store=store), output="entities"),
        ]
    )
    return await flow.arun(text="a text")


PATTERNS: dict[str, Callable[[ScriptedLLM, Store], Awaitable[Any]]] = {
    "fan_out": lambda llm, s: fanflow.fan_out(llm, "task", workers=3, store=s),
    "vote": lambda llm, s: fanflow.vote(llm, "q", n=5, store=s),
    "vote_early_stop": lambda llm, s: fanflow.vote(llm, "q", n=9, early_stop=True, store=s),
    "best_of_n": lambda llm, s: fanflow.best_of_n(llm, "task", n=3, store=s),
    "guarded": lambda llm, s: fanflow.guarded(llm, "hello", store=s),
    "evaluate": lambda llm, s: fanflow.evaluate(llm, "content", store=s),
    "sections": lambda llm, s: fanflow.sections(llm, ["a", "b"], synthesize=llm, store=s),
    "parallel_calls": lambda llm, s: fanflow.ParallelCalls(llm, store=s).arun(
        ["x", "y", "z"], "Rate {input}", "Rank {input}"
    ),
    "skill": lambda llm, s: Skill(llm, "Summarize: {text}", store=s).arun(text="t"),
    "chain": _chain,
    "flow": _flow,
    "pool": lambda llm, s: Pool(
        Skill(llm, "Summarize: {text}"), [{"text": str(i)} for i in range(4)], store=s
    ).arun(),
}


def calls_of(result: Any) -> tuple[fanflow.CallRecord[Any], ...]:
    """A pattern result's call records (a SkillResult names them ``calls``)."""
    return tuple(
        result.calls if isinstance(result, fanflow.results.SkillResult) else result.records
    )


@pytest.mark.parametrize("name", list(PATTERNS))
async def test_every_pattern_serves_its_calls_from_the_store_the_second_time(
    name: str, store: Store
) -> None:
    llm = ScriptedLLM(numbered, latency=1.0)
    first = calls_of(await PATTERNS[name](llm, store))
    calls = llm.calls
    assert calls >= 1
    assert len(first) == calls
    assert not any(r.cached for r in first)
    assert store.statistics().rows_written == calls  # every call was committed
    started = asyncio.get_running_loop().time()
    second = calls_of(await PATTERNS[name](llm, store))
    assert asyncio.get_running_loop().time() == started  # served at once, in virtual time
    assert llm.calls == calls  # nothing was asked again
    assert len(second) == len(first)
    assert all(r.cached and not r.attempts and r.usage.total_tokens == 0 for r in second)
    assert [r.value for r in second] == [r.value for r in first]


async def test_call_gather_and_race_go_through_the_store(store: Store) -> None:
    llm = ScriptedLLM(latency=1.0)
    first = await fanflow.gather(
        fanflow.call(llm, "a", store=store), fanflow.call(llm, "b", store=store), settled=True
    )
    assert not any(r.cached for r in first)
    again = await fanflow.gather(
        fanflow.call(llm, "a", store=store), fanflow.call(llm, "b", store=store), settled=True
    )
    assert [(r.index, r.cached, r.value.text) for r in again] == [
        (0, True, "echo: a"),
        (1, True, "echo: b"),
    ]
    won = await fanflow.race(fanflow.call(llm, "c"), fanflow.call(llm, "a", store=store))
    assert won.text == "echo: a"  # served at once, so it won
    assert (await fanflow.call(llm, "a", store=store)).text == "echo: a"
    fresh = await fanflow.call(llm, "a", store=store, cache=False).record()
    assert not fresh.cached
    # The model saw a and b once, then a again for cache=False (c lost the race).
    assert [r.prompt for r in llm.requests if r.prompt != "c"] == ["a", "b", "a"]


async def test_without_a_store_nothing_is_cached() -> None:
    llm = ScriptedLLM(numbered)
    await fanflow.vote(llm, "q", n=3)
    await fanflow.vote(llm, "q", n=3)
    assert llm.calls == 6


async def test_cache_false_asks_again_and_stores_the_new_replies(store: Store) -> None:
    llm = ScriptedLLM(numbered)
    await fanflow.evaluate(llm, "c", ["a", "b"], store=store)
    again = await fanflow.evaluate(llm, "c", ["a", "b"], store=store, cache=False)
    assert llm.calls == 4
    assert not any(r.cached for r in again.records)
    third = await fanflow.evaluate(llm, "c", ["a", "b"], store=store)
    assert llm.calls == 4
    assert all(r.cached for r in third.records)


async def test_a_withheld_answer_is_not_stored_but_the_guard_is(store: Store) -> None:
    async def hang_answer(request: Request) -> str:
        if "safety filter" in request.prompt:
            return "UNSAFE"
        await asyncio.Event().wait()  # the answer never comes: it will be cancelled
        return "never"

    llm = fanflow.function(hang_answer, name="m")
    first = await fanflow.guarded(llm, "bad query", store=store)
    assert first.refused
    assert first.answer.status is Status.CANCELLED
    assert store.statistics().rows_written == 1  # the guard's verdict only
    second = await fanflow.guarded(llm, "bad query", store=store)
    assert second.refused
    assert second.guard.cached
    assert second.first_finished == "guard"


async def test_a_skills_validation_retries_replay_from_the_store(store: Store) -> None:
    replies = iter(["not a number", "still not", "42"])
    llm = ScriptedLLM(lambda r: next(replies))
    skill = Skill(llm, "How many? {q}", output=int, store=store)
    first = await skill.arun(q="x")
    assert (first.value, len(first.calls), llm.calls) == (42, 3, 3)
    again = await skill.arun(q="x")
    assert (again.value, len(again.calls), llm.calls) == (42, 3, 3)
    assert all(c.cached for c in again.calls)


# -- fan_out: idempotent workers across processes -------------------------------------

AREAS = ["cost", "risk", "speed", "scale"]


def failing_on(areas: list[str]) -> dict[str, Fault]:
    return {f"Focus on: {a}$": Fault.raises(BadRequest(f"bad {a}")) for a in areas}


def by_focus(request: Request) -> str:
    return f"out[{request.metadata.get('focus')}]"


async def test_fan_out_in_a_second_process_reruns_only_the_failed_workers(db: Path) -> None:
    # "Process" 1: two of four workers fail; the quorum (2) is met.
    llm1 = ScriptedLLM(by_focus, latency=1.0, fail_on=failing_on(["risk", "scale"]))
    with Store(db) as store:
        first = await fanflow.fan_out(
            llm1, "plan", focus=AREAS, aggregate="concat", store=store, job="plan"
        )
        assert [w.ok for w in first.workers] == [True, False, True, False]
        info = store.job("plan")
        assert info is not None
        assert (info.total, info.succeeded, info.failed) == (4, 2, 2)
        failed = store.items("plan", status=Status.FAILED)
        assert [(i.index, i.error_type) for i in failed] == [(1, "BadRequest"), (3, "BadRequest")]
    # "Process" 2: its own Store object on the same file, a model that now works.
    llm2 = ScriptedLLM(by_focus, latency=1.0)
    with Store(db) as store:
        second = await fanflow.fan_out(
            llm2, "plan", focus=AREAS, aggregate="concat", store=store, job="plan"
        )
        assert sorted(r.prompt.rsplit(": ", 1)[1] for r in llm2.requests) == ["risk", "scale"]
        assert [w.record.cached for w in second.workers] == [True, False, True, False]
        assert second.outputs == [f"out[{a}]" for a in AREAS]
        info = store.job("plan")
        assert info is not None
        assert (info.succeeded, info.failed, info.runs) == (4, 0, 2)
    assert second.makespan == 1.0  # only the re-run workers took time


async def test_fan_out_job_reuses_its_succeeded_workers_even_with_cache_false(
    store: Store,
) -> None:
    llm = ScriptedLLM(by_focus, fail_on=failing_on(["speed"]))
    await fanflow.fan_out(llm, "t", focus=AREAS[:3], store=store, job="j", aggregate="concat")
    assert llm.calls == 3
    fixed = ScriptedLLM(by_focus)
    again = await fanflow.fan_out(
        fixed, "t", focus=AREAS[:3], store=store, job="j", aggregate="concat", cache=False
    )
    assert fixed.calls == 1  # only the failed worker
    assert [w.record.cached for w in again.workers] == [True, True, False]


async def test_fan_out_aggregator_goes_through_the_store(store: Store) -> None:
    llm = ScriptedLLM(by_focus)
    first = await fanflow.fan_out(llm, "t", focus=AREAS[:2], store=store)
    assert first.aggregation == "llm"
    assert llm.calls == 3
    second = await fanflow.fan_out(llm, "t", focus=AREAS[:2], store=store)
    assert llm.calls == 3
    assert second.aggregator is not None
    assert second.aggregator.cached
    assert second.answer == first.answer


async def test_fan_out_quorum_failure_is_recorded_in_the_job(store: Store) -> None:
    llm = ScriptedLLM(by_focus, fail_on=failing_on(AREAS[:3]))
    with pytest.raises(QuorumNotMet):
        await fanflow.fan_out(llm, "t", focus=AREAS, store=store, job="q")
    info = store.job("q")
    assert info is not None
    assert (info.succeeded, info.failed) == (1, 3)


async def test_fan_out_job_needs_a_store() -> None:
    with pytest.raises(fanflow.ConfigError, match="needs a store"):
        await fanflow.fan_out(ScriptedLLM(), "t", job="x")


# -- Pool: jobs, progress, only_failed across processes --------------------------------


def pool_chain(llm: ScriptedLLM, fetched: list[str]) -> Chain:
    async def fetch(url: str) -> str:
        fetched.append(url)
        await asyncio.sleep(1.0)
        return f"<html>{url}</html>"

    return Chain(
        [
            Step(fetch, output="html", inputs={"url": "url"}),
            Step(Skill(llm, "Markdown of: {html}"), output="markdown"),
            Step(Skill(llm, "Summarize: {text}"), output="summary", inputs={"text": "markdown"}),
        ]
    )


URLS = [{"id": f"u{i}", "url": f"site{i}.com"} for i in range(6)]


async def test_pool_job_records_progress_and_failures(store: Store) -> None:
    llm = ScriptedLLM(
        latency=1.0, fail_on={r"site[24]\.com": Fault.raises(BadRequest("no markdown"))}
    )
    fetched: list[str] = []
    pool = Pool(pool_chain(llm, fetched), URLS, max_flows=3, store=store, job="urls")
    result = await pool.arun()
    assert [r.status for r in result.items] == [
        Status.SUCCEEDED,
        Status.SUCCEEDED,
        Status.FAILED,
        Status.SUCCEEDED,
        Status.FAILED,
        Status.SUCCEEDED,
    ]
    info = store.job("urls")
    assert info is not None
    assert (info.total, info.succeeded, info.failed, info.pending) == (6, 4, 2, 0)
    items = store.items("urls")
    assert [i.input_id for i in items] == [u["id"] for u in URLS]
    failed = store.items("urls", status=Status.FAILED)
    assert [(i.index, i.error_type, i.error) for i in failed] == [
        (2, "BadRequest", "no markdown"),
        (4, "BadRequest", "no markdown"),
    ]
    assert items[0].usage.total_tokens > 0  # the input's calls' tokens, added up


async def test_pool_only_failed_in_a_second_process_asks_the_model_only_for_failures(
    db: Path,
) -> None:
    fail = {r"site[24]\.com": Fault.raises(BadRequest("no markdown"))}
    llm1 = ScriptedLLM(latency=1.0, fail_on=fail)
    with Store(db) as store:
        first = await Pool(pool_chain(llm1, []), URLS, max_flows=6, store=store, job="urls").arun()
        assert llm1.calls == 4 * 2 + 2  # two calls per success, one per failure
    llm2 = ScriptedLLM(latency=1.0)
    fetched: list[str] = []
    with Store(db) as store:
        pool = Pool(pool_chain(llm2, fetched), URLS, max_flows=6, store=store, job="urls")
        second = await pool.arun(only_failed=True)
        info = store.job("urls")
        assert info is not None
        assert (info.succeeded, info.failed, info.runs) == (6, 0, 2)
    # Only the two failed inputs reached the model (two calls each); the others were
    # replayed from the store, all their calls cached.
    assert sorted({r.prompt for r in llm2.requests}) == sorted(
        f"Markdown of: <html>site{i}.com</html>" for i in (2, 4)
    ) + sorted(f"Summarize: echo: Markdown of: <html>site{i}.com</html>" for i in (2, 4))
    assert llm2.calls == 4
    assert second.ok
    assert second.outputs[0] == first.outputs[0]
    for i in (0, 1, 3, 5):
        assert all(c.cached for c in second[i].records)
    assert not any(c.cached for c in second[2].records)
    # Plain-function steps are not stored: a replayed input fetches again.
    assert sorted(fetched) == sorted(u["url"] for u in URLS)


async def test_pool_job_reuses_succeeded_inputs_even_with_cache_false(store: Store) -> None:
    llm = ScriptedLLM()
    skill = Skill(llm, "S: {text}")
    inputs = [{"text": str(i)} for i in range(3)]
    await Pool(skill, inputs, store=store, job="p", cache=False).arun()
    assert llm.calls == 3
    again = await Pool(skill, inputs, store=store, job="p", cache=False).arun()
    assert llm.calls == 3
    assert all(c.cached for c in again.records)
    # Without the job, cache=False asks again.
    await Pool(skill, inputs, store=store, cache=False).arun()
    assert llm.calls == 6


async def test_pool_store_overrides_the_skills_own(tmp_path: Path, store: Store) -> None:
    llm = ScriptedLLM()
    with Store(tmp_path / "other.db") as other:
        skill = Skill(llm, "S: {text}", store=other)
        await Pool(skill, [{"text": "a"}], store=store).arun()
        assert store.statistics().rows_written == 1
        assert other.statistics().rows_written == 0


async def test_pool_job_needs_a_store() -> None:
    with pytest.raises(fanflow.ConfigError, match="needs a store"):
        Pool(Skill(ScriptedLLM(), "{x}"), [{"x": 1}], job="p")


async def test_cancelled_pool_job_keeps_finished_inputs_and_says_how_to_resume(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    async def answer(request: Request) -> str:
        if request.prompt.endswith(("0", "1")):
            return "quick"
        await asyncio.Event().wait()
        return "never"

    skill = Skill(fanflow.function(answer, name="hang"), "S: {text}")
    pool = Pool(skill, [{"text": str(i)} for i in range(4)], store=store, job="stop")
    task = asyncio.create_task(pool.arun())
    # Wait on the pool's own state (it has no event to wait on); no time passes.
    while pool.status.succeeded < 2:  # noqa: ASYNC110
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [(i.index, i.status) for i in store.items("stop")] == [
        (0, Status.SUCCEEDED),
        (1, Status.SUCCEEDED),
    ]
    assert "job 'stop' was interrupted; 2 items finished" in caplog.text
