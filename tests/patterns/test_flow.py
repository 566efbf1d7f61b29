from __future__ import annotations

import asyncio
from typing import Any

import pytest

import fanflow
from fanflow import Chain, Flow, Pool, Request, Skill, Status, Step
from fanflow.errors import BadRequest, StepInputError
from fanflow.testing import Fault, ScriptedLLM

pytestmark = pytest.mark.looptime


def url_chain(llm: ScriptedLLM, fetch_latency: dict[str, float] | None = None) -> Chain:
    async def fetch(url: str) -> str:
        await asyncio.sleep((fetch_latency or {}).get(url, 1.0))
        return f"<html>{url}</html>"

    return Chain(
        [
            Step(fetch, output="html", inputs={"url": "url"}),
            Step(Skill(llm, "Markdown of: {html}"), output="markdown"),
            Step(Skill(llm, "Summarize: {text}"), output="summary", inputs={"text": "markdown"}),
        ]
    )


def echo(request: Request) -> str:
    return f"<{request.prompt}>"


async def test_chain_maps_outputs_into_later_inputs(looptime: float) -> None:
    llm = ScriptedLLM(echo, latency=1.0)
    result = await url_chain(llm).arun({"url": "a.com"})
    assert result.ok
    assert result.output == "<Summarize: <Markdown of: <html>a.com</html>>>"
    assert result.context["html"] == "<html>a.com</html>"
    assert [s.name for s in result.steps] == ["html", "markdown", "summary"]
    assert [(s.start, s.end) for s in result.steps] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    assert looptime == 3.0
    assert len(result.records) == 2  # the two model calls


async def test_chain_input_mapping_error_names_step_and_key() -> None:
    llm = ScriptedLLM(echo)
    result = await url_chain(llm).arun({"link": "a.com"})
    assert result.status is Status.FAILED
    assert isinstance(result.error, StepInputError)
    assert result.error.step == "html"
    assert result.error.field == "url"
    assert "chain step 'html' needs key 'url'" in str(result.error)
    assert "which has ['link']" in str(result.error)
    assert result.failed_step == "html"
    assert llm.calls == 0  # checked before anything ran

    skill_needs = Chain([Step(Skill(llm, "{a} {b}"), output="x")])
    bad = await skill_needs.arun(a=1)
    assert isinstance(bad.error, StepInputError)
    assert "needs key 'b'" in str(bad.error)


def test_chain_refuses_keys_only_produced_later() -> None:
    llm = ScriptedLLM()
    with pytest.raises(StepInputError, match=r"chain step 'first' needs key 'later'"):
        Chain(
            [
                Step(Skill(llm, "{later}"), output="first"),
                Step(Skill(llm, "{x}"), output="later"),
            ]
        )
    with pytest.raises(fanflow.ConfigError, match="write the output key 'x'"):
        Chain([Step(Skill(llm, "a"), output="x"), Step(Skill(llm, "b"), output="x")])


async def test_chain_step_failure_skips_the_rest() -> None:
    llm = ScriptedLLM(echo, fail_on={"Markdown": Fault.raises(BadRequest("nope"))})
    result = await url_chain(llm).arun(url="a.com")
    assert [s.status for s in result.steps] == [Status.SUCCEEDED, Status.FAILED, Status.SKIPPED]
    assert result.failed_step == "markdown"
    assert isinstance(result.error, BadRequest)
    assert "step 'summary' was skipped: step 'markdown'" in str(result.steps[2].error)


def test_chain_run_from_sync_code() -> None:
    result = url_chain(ScriptedLLM(echo), {"a": 0.0}).run(url="a")
    assert result.output == "<Summarize: <Markdown of: <html>a</html>>>"


# ------------------------------------------------------------------------------ Pool


async def test_pool_items_move_independently_and_come_back_in_order(looptime: float) -> None:
    llm = ScriptedLLM(echo, latency=1.0)
    urls = [f"u{i}" for i in range(4)]
    chain = url_chain(llm, {"u0": 10.0})  # item 0 is slow to fetch
    pool = Pool(chain, inputs=[{"url": u} for u in urls], max_flows=10)
    result = await pool.arun()
    assert result.outputs == [f"<Summarize: <Markdown of: <html>{u}</html>>>" for u in urls]
    first, second = result[0], result[1]
    # Item 1 finished all three steps before item 0 finished its first.
    assert second.steps[2].end == 3.0
    assert first.steps[0].end == 10.0
    assert looptime == 12.0
    assert pool.status.succeeded == 4


async def test_pool_max_flows_bounds_items_in_progress(looptime: float) -> None:
    llm = ScriptedLLM(echo, latency=1.0)
    pool = Pool(Skill(llm, "Say {x}"), [{"x": i} for i in range(6)], max_flows=2)
    result = await pool.arun()
    assert result.outputs == [f"<Say {i}>" for i in range(6)]
    assert llm.max_in_flight == 2
    assert looptime == 3.0


async def test_pool_status_while_running_and_after(looptime: float) -> None:
    llm = ScriptedLLM(echo, latency=1.0)
    pool = Pool(url_chain(llm), [{"url": "a"}, {"url": "b"}, {"url": "c"}], max_flows=2)
    seen: list[fanflow.results.PoolStatus] = []

    async def watch() -> None:
        await asyncio.sleep(1.5)
        seen.append(pool.status)

    watcher = asyncio.create_task(watch())
    await pool.arun()
    await watcher
    during = seen[0]
    assert (during.pending, during.running, during.succeeded) == (1, 2, 0)
    assert [it.steps for it in during.items[:2]] == [("markdown",), ("markdown",)]
    after = pool.status
    assert (after.total, after.succeeded, after.failed, after.completed) == (3, 3, 0, 3)
    assert repr(after).startswith("fanflow.results.PoolStatus(total=3")


async def test_pool_only_failed_reruns_only_failed_items() -> None:
    broken = {"b", "d"}

    def reply(request: Request) -> str:
        word = request.prompt.split()[-1]
        if word in broken:
            raise BadRequest(f"cannot do {word}")
        return word.upper()

    llm = ScriptedLLM(reply)
    pool = Pool(Skill(llm, "Upper {w}"), [{"w": w} for w in "abcde"], max_flows=3)
    first = await pool.arun()
    assert first.outputs == ["A", None, "C", None, "E"]
    assert list(first.errors) == [1, 3]
    status = pool.status
    assert (status.succeeded, status.failed) == (3, 2)
    assert [it.state for it in status.items] == [
        "succeeded",
        "failed",
        "succeeded",
        "failed",
        "succeeded",
    ]
    assert isinstance(status.items[1].error, BadRequest)
    broken.clear()
    calls = llm.calls
    again = await pool.arun(only_failed=True)
    assert llm.calls == calls + 2
    assert again.outputs == ["A", "B", "C", "D", "E"]
    assert again.ok
    assert pool.status.succeeded == 5


async def test_pool_refuses_non_dict_inputs_and_accepts_functions() -> None:
    with pytest.raises(fanflow.ConfigError, match="pool input 1 is a str"):
        Pool(Skill(ScriptedLLM(), "{x}"), [{"x": 1}, "oops"])  # type: ignore[list-item]

    def double(x: int) -> int:
        return 2 * x

    result = await Pool(double, [{"x": 1}, {"x": 2, "y": 0}]).arun()
    assert result.outputs == [2, 4]


def test_pool_run_from_sync_code() -> None:
    pool = Pool(Skill(ScriptedLLM(echo), "Hi {name}"), [{"name": "a"}, {"name": "b"}])
    assert pool.run().outputs == ["<Hi a>", "<Hi b>"]


async def test_pool_of_a_chain_missing_a_key_fails_that_item_without_calls() -> None:
    llm = ScriptedLLM(echo)
    result = await Pool(url_chain(llm, {"a": 0.0}), [{"url": "a"}, {"href": "b"}]).arun()
    assert result.status == {0: Status.SUCCEEDED, 1: Status.FAILED}
    assert "item 1: chain step 'html' needs key 'url'" in str(result.errors[1])
    assert llm.calls == 2


# ------------------------------------------------------------------------------ Flow


def timed_flow(llm: ScriptedLLM, *, fail: str | None = None) -> Flow:
    def skill(name: str, template: str) -> Skill:
        return Skill(llm, f"{name}: {template}", name=name)

    steps = [
        Step(skill("extract", "{doc}"), output="facts"),
        Step(skill("sentiment", "{facts}"), output="sentiment"),
        Step(skill("entities", "{facts}"), output="entities"),
        Step(skill("summary", "{facts}"), output="summary"),
        Step(skill("combine", "{sentiment} {entities} {summary}"), output="combined"),
        Step(skill("report", "{combined}"), output="report"),
        Step(skill("email", "{combined}"), output="email"),
        Step(skill("slack", "{combined}"), output="slack"),
    ]
    return Flow(steps)


LATENCY = {"extract": 1.0, "sentiment": 2.0, "entities": 3.0, "summary": 1.0, "combine": 1.0}


def flow_llm(**kwargs: Any) -> ScriptedLLM:
    return ScriptedLLM(
        lambda r: r.prompt.split(":")[0],
        latency=lambda rng, r: LATENCY.get(r.prompt.split(":")[0], 1.0),
        **kwargs,
    )


async def test_flow_overlaps_independent_steps_and_waits_for_dependencies(
    looptime: float,
) -> None:
    llm = flow_llm()
    result = await timed_flow(llm).arun(doc="text")
    assert result.ok
    starts = {s.name: s.start for s in result.steps}
    assert starts == {
        "facts": 0.0,
        "sentiment": 1.0,
        "entities": 1.0,
        "summary": 1.0,
        "combined": 4.0,  # waits for the slowest of the three (entities, 3 s)
        "report": 5.0,
        "email": 5.0,
        "slack": 5.0,
    }
    assert looptime == 6.0
    assert llm.max_in_flight == 3
    assert result.output["combined"] == "combine"
    assert result.busy_time == 1 + 2 + 3 + 1 + 1 + 3


async def test_flow_failure_skips_dependents_only(looptime: float) -> None:
    llm = flow_llm(fail_on={"^entities": Fault.raises(BadRequest("no entities"))})
    result = await timed_flow(llm).arun(doc="text")
    status = {s.name: s.status for s in result.steps}
    assert status == {
        "facts": Status.SUCCEEDED,
        "sentiment": Status.SUCCEEDED,
        "entities": Status.FAILED,
        "summary": Status.SUCCEEDED,
        "combined": Status.SKIPPED,
        "report": Status.SKIPPED,
        "email": Status.SKIPPED,
        "slack": Status.SKIPPED,
    }
    assert result.failed_step == "entities"
    assert result.status is Status.FAILED
    assert looptime == 3.0  # sentiment (1 + 2) still ran to the end


def test_flow_validates_its_graph() -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.ConfigError, match="cycle: a -> b -> a"):
        Flow([Step(Skill(llm, "{b}"), output="a"), Step(Skill(llm, "{a}"), output="b")])
    with pytest.raises(fanflow.ConfigError, match="after='nope' names no step's output"):
        Flow([Step(Skill(llm, "x"), output="a", after=["nope"])])


async def test_flow_after_orders_steps_without_data(looptime: float) -> None:
    order: list[str] = []

    async def first() -> str:
        await asyncio.sleep(2.0)
        order.append("first")
        return "1"

    async def second() -> str:
        order.append("second")
        return "2"

    result = await Flow([Step(second, output="b", after=["a"]), Step(first, output="a")]).arun()
    assert order == ["first", "second"]
    assert result.output == {"b": "2", "a": "1"}
    assert looptime == 2.0


async def test_flow_missing_input_is_named_before_running() -> None:
    llm = flow_llm()
    result = await timed_flow(llm).arun(text="x")
    assert isinstance(result.error, StepInputError)
    assert "flow step 'facts' needs key 'doc'" in str(result.error)
    assert llm.calls == 0


async def test_pool_over_a_flow(looptime: float) -> None:
    llm = flow_llm()
    result = await Pool(timed_flow(llm), [{"doc": "a"}, {"doc": "b"}], max_flows=2).arun()
    assert result.ok
    assert looptime == 6.0
    assert len(result.records) == 16
