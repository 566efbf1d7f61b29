"""What the batch backend adds to a record travels in the core types' extension fields.

``Response`` and the errors have no batch fields of their own: a batched answer carries a
:class:`fanflow.backends.BatchInfo` in ``Response.extra``, a batched failure in
``ProviderError.extra`` (given to its constructor or to a copy, never set afterwards), and
the summary's batch counts are derived from them. A Pool's model steps get their batching
handle as an argument, not from a context variable.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest

import fanflow
from fanflow.backends import BatchInfo, Enclosing, batch_info
from fanflow.errors import BadRequest, ServerError
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

PRICES = {"gpt-sim": fanflow.Price(input=2.0, output=8.0)}


def test_core_types_have_no_batch_fields() -> None:
    names = {f.name for f in dataclasses.fields(fanflow.Response)}
    assert not names & {"batch_id", "saved"}
    assert "extra" in names
    assert not hasattr(fanflow.Response("x"), "batch_id")


def test_an_error_takes_its_extension_in_its_constructor_and_keeps_it_through_pickle() -> None:
    error = BadRequest("no", extra={"fanflow.batch": BatchInfo("b1")})
    again = pickle.loads(pickle.dumps(error))
    assert batch_info(again.extra) == BatchInfo("b1")
    assert batch_info(ServerError("x").extra) is None


async def test_a_batched_answer_and_a_batched_failure_carry_batch_info() -> None:
    async with SimServer(fault_on={"broke": "quota"}) as server:
        llm = fanflow.openai("gpt-sim", base_url=server.url, api_key="sk-test")
        result = await fanflow.map(llm, "{input}", ["ok", "broke"], mode="batch", prices=PRICES)
        await llm.aclose()
    ok, broke = result.records
    assert ok.response is not None
    info = batch_info(ok.response.extra)
    assert info is not None
    assert info.batch_id == ok.batch_id
    assert info.saved is not None
    assert info.saved > 0
    assert broke.error is not None
    assert isinstance(broke.error, fanflow.errors.ProviderError)
    assert batch_info(broke.error.extra) == BatchInfo(info.batch_id)
    assert broke.batch_id == info.batch_id
    assert (result.summary.batched, result.summary.saved) == (1, info.saved)


async def test_a_skill_calls_the_handle_its_pool_passes_it() -> None:
    """A Pool with mode="batch" gives its steps their batching handle explicitly
    (``Enclosing.handle_for``); without one a skill calls its own handle."""
    own = fanflow.function(lambda request: "own")
    other = fanflow.function(lambda request: "other")
    skill = fanflow.Skill(own, "say {x}")
    swapped = await skill.execute(
        {"x": 1},
        index=None,
        label=None,
        hooks=(),
        enclosing=Enclosing(handle_for=lambda llm: other if llm is own else llm),
    )
    assert swapped.value == "other"
    plain = await skill.execute({"x": 1}, index=None, label=None, hooks=())
    assert plain.value == "own"
