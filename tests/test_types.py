from __future__ import annotations

import dataclasses
import pickle

import pytest

import fanflow
from fanflow import CallRecord, MapResult, Message, Request, Response, Status, Usage


def test_request_of_builds_system_and_user_messages() -> None:
    r = Request.of("hi", system="be brief", temperature=0.2, stop=["\n"])
    assert r.messages == (Message("system", "be brief"), Message("user", "hi"))
    assert r.prompt == "hi"
    assert r.system == "be brief"
    assert r.stop == ("\n",)


def test_key_is_stable_and_ignores_metadata() -> None:
    a = Request.of("hi", temperature=0.5, metadata={"trace": 1})
    b = Request.of("hi", temperature=0.5, metadata={"trace": 2})
    assert a.key == b.key
    assert len(a.key) == 64
    # The same request built twice in another process gives the same key: it is a hash
    # of the canonical form, not of object identity.
    assert pickle.loads(pickle.dumps(a)).key == a.key


def test_key_differs_by_sample_salt_and_by_content() -> None:
    base = Request.of("hi")
    assert base.key != Request.of("hi", sample=1).key
    assert base.key != Request.of("hi!").key
    assert base.key != Request.of("hi", temperature=0.1).key
    assert base.key != Request.of("hi", model="m").key
    # A retry of sample 1 is the same call as sample 1.
    assert Request.of("hi", sample=1).key == Request.of("hi", sample=1).key


def test_key_is_independent_of_mapping_order() -> None:
    a = Request.of("x", response_format={"type": "json", "schema": {"a": 1, "b": 2}})
    b = Request.of("x", response_format={"schema": {"b": 2, "a": 1}, "type": "json"})
    assert a.key == b.key


def test_with_options_is_dataclasses_replace() -> None:
    # The slot copy (decision 0265) must give what replace gives, key included.
    r = Request.of("hi", system="s", temperature=0.5, metadata={"m": 1})
    r.key  # noqa: B018 - caches the key on r
    copy = r.with_options(temperature=0.9, max_tokens=7)
    assert copy == dataclasses.replace(r, temperature=0.9, max_tokens=7)
    assert copy.key == dataclasses.replace(r, temperature=0.9, max_tokens=7).key != r.key
    assert copy.metadata == {"m": 1}
    with pytest.raises(TypeError, match="no field"):
        r.with_options(temprature=1)


def test_usage_adds_up() -> None:
    total = Usage(3, 4) + Usage(1, 2, estimated=True)
    assert total == Usage(4, 6, estimated=True)
    assert total.total_tokens == 10


def test_batch_result_views_and_summary() -> None:
    ok = CallRecord(
        status=Status.SUCCEEDED,
        value="a",
        start=0.0,
        end=2.0,
        usage=Usage(1, 1),
        cost=0.5,
        attempts=(fanflow.results.Attempt(1, 0.0, 2.0, Status.SUCCEEDED, service=2.0),),
    )
    bad = CallRecord(
        status=Status.FAILED,
        error=fanflow.errors.BadRequest("no"),
        start=0.0,
        end=1.0,
        attempts=(
            fanflow.results.Attempt(1, 0.0, 0.5, Status.FAILED, service=0.5),
            fanflow.results.Attempt(2, 0.5, 1.0, Status.FAILED, service=0.5),
        ),
    )
    result: MapResult[str] = MapResult([ok, bad], makespan=2.0)
    assert result.outputs == ["a", None]
    assert result.status == {0: Status.SUCCEEDED, 1: Status.FAILED}
    assert set(result.errors) == {1}
    assert not result.ok
    s = result.summary
    assert (s.items, s.succeeded, s.failed, s.calls, s.retries) == (2, 1, 1, 3, 1)
    assert s.busy_time == 3.0
    assert s.speedup == 1.5
    # One record with unknown cost makes the total unknown, never a guess.
    assert s.cost is None
    assert "fanflow.MapResult" in repr(result)
    with pytest.raises(fanflow.errors.BatchError, match=r"1 of 2 items failed; first: item 1"):
        result.raise_for_errors()


def test_status_is_a_string() -> None:
    assert Status.TIMED_OUT == "timed_out"
    assert repr(Status.FAILED) == "failed"


def test_response_equality_ignores_raw() -> None:
    assert Response("x", raw={"a": 1}) == Response("x", raw=None)
