"""Every public type pickles (the Ray backend sends them between processes).

Errors are covered by tests/test_exceptions.py; this covers the other public classes and
the model handles, whose copies must work in the other process without showing the key.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
from typing import Any

import pytest

import fanflow
from fanflow import CallRecord, Request, Response, Status, Usage
from fanflow.testing import ScriptedLLM, SimServer

KEY = "sk-live-DO-NOT-PRINT"


def _record(index: int = 0, error: BaseException | None = None) -> CallRecord[Any]:
    request = Request.of("hi", system="be brief", temperature=0.2, metadata={"k": [1]})
    attempt = fanflow.results.Attempt(
        1, 0.0, 1.5, Status.SUCCEEDED if error is None else Status.FAILED
    )
    return CallRecord(
        status=Status.SUCCEEDED if error is None else Status.FAILED,
        request=request,
        value="out" if error is None else None,
        error=error,
        attempts=(attempt,),
        start=0.0,
        end=1.5,
        usage=Usage(3, 4),
        index=index,
        response=Response("out", usage=Usage(3, 4), model="m") if error is None else None,
    )


def _ok(request: Request) -> str:
    return "ok"


def _llm() -> ScriptedLLM:
    return ScriptedLLM(_ok, limits=fanflow.Limits(concurrency=2))


def _step_record() -> fanflow.results.StepRecord:
    return fanflow.results.StepRecord("s", "out", Status.SUCCEEDED, "v", calls=(_record(),))


def _run_result() -> fanflow.results.FlowResult:
    return fanflow.results.FlowResult(
        records=(_record(),), status=Status.SUCCEEDED, output="v", steps=(_step_record(),)
    )


SAMPLES: dict[str, Callable[[], Any]] = {
    "Adaptive": lambda: fanflow.limits.Adaptive(initial=4, max=64),
    "Budget": lambda: fanflow.Budget(usd=1.5, prices={"m": fanflow.Price(1.0, 2.0)}),
    "EstimateResult": lambda: fanflow.results.EstimateResult(10, 200, 100, 0.01, ("x",)),
    "Price": lambda: fanflow.Price(input=0.5, output=1.5),
    "Attempt": lambda: fanflow.results.Attempt(
        2, 1.0, 2.0, Status.FAILED, fanflow.errors.ServerError("x")
    ),
    "BaseLLM": _llm,
    "Deployment": lambda: fanflow.results.Deployment("east", "m", "https://east.example/v1"),
    "BatchBackend": lambda: fanflow.backends.BatchBackend(
        "auto", fanflow.backends.BatchOptions(poll=2.0)
    ),
    "BatchOptions": lambda: fanflow.backends.BatchOptions(poll=2.0, max_requests=10),
    "MapResult": lambda: fanflow.MapResult(
        [_record(0), _record(1, fanflow.errors.BadRequest("no"))], makespan=2.0
    ),
    "BestOfNResult": lambda: fanflow.results.BestOfNResult(
        records=(_record(),), best="out", index=0, selection="judge", candidates=(_record(),)
    ),
    "Call": lambda: fanflow.call(_llm(), "hi"),
    "CallRecord": lambda: _record(3, fanflow.errors.RateLimited("slow", retry_after=2.0)),
    "Chain": lambda: fanflow.Chain([fanflow.Step(fanflow.Skill(_llm(), "Say {x}"), output="y")]),
    "EvaluateResult": lambda: fanflow.results.EvaluateResult(
        criteria=(fanflow.results.Score("clarity", _record()),), records=(_record(),)
    ),
    "FanOutResult": lambda: fanflow.results.FanOutResult(
        answer="a",
        aggregation="concat",
        workers=(fanflow.results.Worker(0, 0.5, "focus", _record()),),
        required=1,
    ),
    "Flow": lambda: fanflow.Flow([fanflow.Step(fanflow.Skill(_llm(), "Say {x}"), output="y")]),
    "GuardedResult": lambda: fanflow.results.GuardedResult(
        output="o",
        allowed=True,
        flagged=False,
        first_finished="guard",
        time_saved=0.5,
        guard=_record(),
        answer=_record(),
    ),
    "ItemStatus": lambda: fanflow.results.ItemStatus(
        1, "failed", (), fanflow.errors.ServerError("x")
    ),
    "JsonlSink": lambda: fanflow.JsonlSink("out.jsonl", ordered=True),
    "Limits": lambda: fanflow.Limits(concurrency=3, rpm=600, tpm=10_000, period=30.0),
    "Message": lambda: fanflow.Message("user", "hi"),
    "ParallelCalls": lambda: fanflow.ParallelCalls(_llm(), 3, system="s"),
    "ParallelCallsResult": lambda: fanflow.results.ParallelCallsResult(
        outputs=["a", None],
        aggregated=None,
        errors={1: fanflow.errors.ServerError("x")},
        branches=fanflow.MapResult([_record()]),
    ),
    "ParquetSink": lambda: fanflow.ParquetSink("out.parquet"),
    "Pool": lambda: fanflow.Pool(fanflow.Skill(_llm(), "Say {x}"), [{"x": 1}], max_flows=2),
    "PoolResult": lambda: fanflow.results.PoolResult(items=(_run_result(),), records=(_record(),)),
    "PoolStatus": lambda: fanflow.results.PoolStatus(
        2, 1, 0, 1, 0, (fanflow.results.ItemStatus(0, "pending"),)
    ),
    "RateLimitState": lambda: fanflow.results.RateLimitState(100, 5, 1.5, 1000, 10, 2.0, 7.0),
    "RayBackend": lambda: fanflow.backends.RayBackend(address="auto", workers=4, shard_size=32),
    "Request": lambda: Request.of("hi", system="s", seed=3, stop=["x"], sample=2),
    "Response": lambda: Response("t", usage=Usage(1, 2), model="m", cost=0.5, latency=1.0),
    "RetryPolicy": lambda: fanflow.RetryPolicy(attempts=3, seed=1),
    "FlowResult": _run_result,
    "Score": lambda: fanflow.results.Score("clarity", _record()),
    "SectionsResult": lambda: fanflow.results.SectionsResult(
        sections={"a": "x"}, section_records={"a": _record()}
    ),
    "Skill": lambda: fanflow.Skill(_llm(), "Say {x}", name="say"),
    "SkillResult": lambda: fanflow.results.SkillResult(Status.SUCCEEDED, "v", calls=(_record(),)),
    "Status": lambda: Status.TIMED_OUT,
    "Step": lambda: fanflow.Step(_upper, output="y", name="up"),
    "StepRecord": _step_record,
    "Summary": lambda: fanflow.MapResult([_record()], makespan=1.0).summary,
    "Usage": lambda: Usage(5, 6, estimated=True),
    "VoteResult": lambda: fanflow.results.VoteResult(
        winner="a",
        confidence=0.6,
        count=3,
        n_counted=5,
        distribution={"a": 3, "b": 2},
        tied=(),
        samples_used=5,
    ),
    "Worker": lambda: fanflow.results.Worker(0, 0.5, "focus", _record()),
    "Pacing": lambda: fanflow.limits.Pacing(initial=0.5, min=0.1, max=8.0),
}

# Not values but live objects: a stream belongs to its event loop, a store to its file
# (a Store pickles as "the same file", tested below), LLM is a protocol.
LIVE = {"ResultStream", "Store", "LLM"}
# Types of keyword arguments (TypedDicts), never instantiated as such.
KWARG_TYPES = {"Options"}
# Values that hold no error, handle or function, so their copies compare equal.
VALUES = {
    "Adaptive",
    "Deployment",
    "EstimateResult",
    "Limits",
    "Pacing",
    "Price",
    "Message",
    "PoolStatus",
    "RateLimitState",
    "RayBackend",
    "Request",
    "Response",
    "RetryPolicy",
    "Status",
    "Summary",
    "Usage",
    "VoteResult",
}


def _upper(x: str) -> str:
    return x.upper()


HOMES = (fanflow, fanflow.results, fanflow.limits, fanflow.backends)
# The backends users construct themselves (the rest of fanflow.backends is the protocol).
BACKENDS = {"BatchBackend", "BatchOptions", "RayBackend"}


def _public(name: str) -> Any:
    """The public object ``name``: top-level, or in the submodule that holds it."""
    home = next(m for m in HOMES if name in m.__all__)
    return getattr(home, name)


def test_every_public_type_has_a_sample() -> None:
    public = {
        name
        for home in HOMES[:-1]
        for name in home.__all__
        if inspect.isclass(_public(name)) and not issubclass(_public(name), BaseException)
    }
    assert (public | BACKENDS) - LIVE - KWARG_TYPES == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_public_types_round_trip_through_pickle(name: str) -> None:
    obj = SAMPLES[name]()
    assert isinstance(obj, _public(name))
    copy = pickle.loads(pickle.dumps(obj))
    assert type(copy) is type(obj)
    assert repr(copy) == repr(obj)
    # Errors, handles and patterns compare by identity: for those the repr is the check.
    if name in VALUES:
        assert copy == obj


def test_a_store_pickles_as_the_same_file(tmp_path: Any) -> None:
    with fanflow.Store(tmp_path / "s.db") as store:
        copy = pickle.loads(pickle.dumps(store))
        try:
            assert copy.path == store.path
            assert repr(copy) == repr(store)
        finally:
            copy.close()


@pytest.mark.parametrize("make", [fanflow.openai, fanflow.anthropic])
async def test_handles_work_after_pickling_and_never_show_the_key(
    make: Callable[..., fanflow.BaseLLM],
) -> None:
    async with SimServer(api_key=KEY) as server:
        llm = make("m", base_url=server.url, api_key=KEY, limits=fanflow.Limits(concurrency=2))
        async with llm:
            assert (await fanflow.call(llm, "hi")).text == "echo: hi"  # it has a live lane now
            copy = pickle.loads(pickle.dumps(llm))
        async with copy:
            assert (await fanflow.call(copy, "again")).text == "echo: again"
            record = await fanflow.call(copy, "again").record()
        assert copy.limit_id == llm.limit_id  # one limit, whichever process holds it
        assert copy.limits == llm.limits
        shown = repr(copy) + str(copy) + repr(record) + repr(vars(copy))
        assert KEY not in shown
