from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, RootModel

import fanflow
from fanflow import Skill, Status
from fanflow.errors import BadRequest, ParseError
from fanflow.testing import ScriptedLLM

pytestmark = pytest.mark.looptime


class Person(BaseModel):
    name: str
    age: int


async def test_skill_fills_its_template_and_is_callable() -> None:
    llm = ScriptedLLM(lambda r: f"{r.system}|{r.prompt}|{r.temperature}")
    skill = Skill(llm, "Summarize: {text}", system="be brief", temperature=0.1)
    assert await skill({"text": "a"}) == "be brief|Summarize: a|0.1"
    assert await skill(text="b") == "be brief|Summarize: b|0.1"
    assert skill.fields == ["text"]
    assert repr(skill) == "fanflow.Skill('Summarize: {text}', fields=['text'])"
    with pytest.raises(fanflow.errors.TemplateError, match="no field 'text'"):
        await skill(other="x")


async def test_structured_output_is_validated_and_retried_with_the_error(
    looptime: float,
) -> None:
    replies = ['{"name": "Ann"}', 'Sure! ```json\n{"name": "Ann", "age": 3}\n```']
    llm = ScriptedLLM(lambda r: replies[(len(r.messages) - 2) // 2], latency=1.0)
    skill = Skill(llm, "Who is in {text}?", output=Person, system="Extract.")
    result = await skill.arun(text="the story")
    assert result.ok
    assert result.value == Person(name="Ann", age=3)
    assert len(result.calls) == 2
    assert [c.status for c in result.calls] == [Status.FAILED, Status.SUCCEEDED]
    first, second = llm.requests
    assert first.system is not None
    assert first.system.startswith("Extract.\n\nReply with one JSON object only")
    assert '"age"' in first.system
    assert first.response_format is not None
    assert first.response_format["json_schema"]["name"] == "Person"
    assert second.messages[-2] == fanflow.Message("assistant", '{"name": "Ann"}')
    assert second.messages[-1].role == "user"
    assert "age" in second.messages[-1].content
    assert "Field required" in second.messages[-1].content
    assert looptime == 2.0


async def test_structured_output_gives_up_after_validation_retries() -> None:
    llm = ScriptedLLM("not json at all")
    skill = Skill(llm, "x", output=Person, validation_retries=1)
    result = await skill.arun()
    assert result.status is Status.FAILED
    assert isinstance(result.error, ParseError)
    assert "no JSON object" in str(result.error)
    assert len(result.calls) == 2
    with pytest.raises(ParseError):
        await skill()


async def test_parse_function_output_and_provider_errors_are_not_revalidated() -> None:
    skill = Skill(ScriptedLLM("41"), "x", output=lambda text: int(text) + 1)
    assert await skill() == 42
    failing = ScriptedLLM(failures={0: BadRequest("bad")})
    result = await Skill(failing, "x", output=Person).arun()
    assert isinstance(result.error, BadRequest)
    assert failing.calls == 1


def test_skill_options_are_checked() -> None:
    with pytest.raises(fanflow.ConfigError, match="validation_retries"):
        Skill(ScriptedLLM(), "x", validation_retries=-1)
    with pytest.raises(fanflow.ConfigError, match="output must be"):
        Skill(ScriptedLLM(), "x", output=3)


def test_skill_run_from_sync_code() -> None:
    result = Skill(ScriptedLLM('{"name": "B", "age": 1}'), "x", output=Person).run()
    assert result.value == Person(name="B", age=1)


class AnyJSON(RootModel[Any]):
    """Any JSON value: what a skill with a structured output finds in a reply."""


async def json_in(reply: str) -> Any:
    """The JSON a skill with a structured output reads from ``reply`` (None: none)."""
    result = await Skill(ScriptedLLM(reply), "x", output=AnyJSON, validation_retries=0).arun()
    if not result.ok:
        assert isinstance(result.error, ParseError)
        assert "no JSON object" in str(result.error)
        return None
    return result.value.root


async def test_template_fields_and_find_json() -> None:
    assert Skill(ScriptedLLM(), "{a} {b} {a} {d} {{lit}}").fields == ["a", "b", "d"]
    with pytest.raises(fanflow.errors.TemplateError, match="attribute or index access"):
        Skill(ScriptedLLM(), "{a} {b.c}")  # field names only (issue 13.7)
    assert await json_in('x {"a": [1, 2]} y') == {"a": [1, 2]}
    assert await json_in("```json\n[1]\n```") == [1]
    assert await json_in("{bad") is None
    assert json.dumps(await json_in('{"k": "v"} {"other": 1}')) == '{"k": "v"}'
