"""Issue 13.7: templates take field names only. Attribute and index access, conversions,
format specs, nested, empty and positional fields are a TemplateError when the pattern
starts (or the Skill is made), naming the template and the field, before any call.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fanflow
from fanflow.patterns import Chain, ParallelCalls, Skill, Step
from fanflow.testing import ScriptedLLM

from .._helpers import run_virtual

pytestmark = pytest.mark.looptime

UNSAFE = [
    ("{text.__class__.__mro__}", "attribute or index access", "{text}"),
    ("{text!r:>99999999}", "the conversion !r", "{text}"),
    ("{text:>99999999}", "the format spec :>99999999", "{text}"),
    ("{text[0]}", "attribute or index access", "{text}"),
    ("{text:{width}}", "the format spec", "{text}"),
    ("{}", "an empty field", "name the field"),
    ("{0}", "a positional field", "name the field"),
    ("{text", "not a valid template (", "write {{ and }}"),
    ("a } b", "not a valid template (", "write {{ and }}"),
]


@pytest.mark.parametrize(("template", "problem", "fix"), UNSAFE)
async def test_unsafe_templates_fail_at_the_start_of_map(
    template: str, problem: str, fix: str
) -> None:
    llm = ScriptedLLM()
    with pytest.raises(fanflow.errors.TemplateError) as info:
        await fanflow.map(llm, f"Summarize: {template}", [{"text": "hello"}])
    message = str(info.value)
    assert problem in message
    assert fix in message
    assert repr(f"Summarize: {template}") in message  # names the template
    with pytest.raises(fanflow.errors.TemplateError):
        fanflow.as_completed(llm, template, [{"text": "hello"}])
    with pytest.raises(fanflow.errors.TemplateError, match="skill"):
        Skill(llm, template)
    assert llm.calls == 0


async def test_every_pattern_template_is_checked_before_any_call() -> None:
    llm = ScriptedLLM()
    bad = "{query.__class__}"
    with pytest.raises(fanflow.errors.TemplateError, match="guard_prompt"):
        await fanflow.guarded(llm, "q", guard_prompt=bad)
    with pytest.raises(fanflow.errors.TemplateError, match="aggregate_prompt"):
        await fanflow.fan_out(llm, "task", workers=2, aggregate=llm, aggregate_prompt=bad)
    with pytest.raises(fanflow.errors.TemplateError, match="judge_prompt"):
        await fanflow.best_of_n(llm, "task", n=2, judge_prompt="{task!r}")
    with pytest.raises(fanflow.errors.TemplateError, match="evaluate's prompt"):
        await fanflow.evaluate(llm, "x", ["clear"], prompt="{content:>999}")
    with pytest.raises(fanflow.errors.TemplateError, match="synthesis_prompt"):
        await fanflow.sections(llm, ["a", "b"], synthesize=llm, synthesis_prompt="{sections[0]}")
    with pytest.raises(fanflow.errors.TemplateError, match="aggregate_prompt"):
        await ParallelCalls(llm).arun(["a"], aggregate_prompt="{input.upper}")
    # A field the pattern does not fill in is found at the start too (it was a KeyError).
    with pytest.raises(fanflow.errors.TemplateError, match=r"uses \{verdict\}.*\{query\}"):
        await fanflow.guarded(llm, "q", guard_prompt="Is {verdict} ok?")
    with pytest.raises(fanflow.errors.TemplateError):
        Chain([Step(Skill(llm, "{a.b}"), output="x")])
    assert llm.calls == 0


async def test_plain_fields_literal_braces_and_odd_names_keep_working() -> None:
    llm = ScriptedLLM(lambda r: r.prompt)
    items = [{"text": "hi", "first name": "Ada", "user-id": 7}]
    result = await fanflow.map(llm, 'JSON: {{"t": "{text}"}} {first name} {user-id} {text}', items)
    assert result.outputs == ['JSON: {"t": "hi"} Ada 7 hi']
    assert (await fanflow.map(llm, "{input}!", ["x"])).outputs == ["x!"]
    assert Skill(llm, "{a} {b} {a} {{c}}").fields == ["a", "b"]


_TEMPLATE_CHARS = st.sampled_from(
    [*"ab{}{}{}[]!:.>0 rsx_", "{a}", "{b}", "{{", "}}", "{a.__class__}", "{a!r}"]
)


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(_TEMPLATE_CHARS, max_size=30),
    a=st.text(max_size=20),
    b=st.integers(),
)
def test_fuzz_templates_fail_only_with_template_error_and_never_grow(
    parts: list[str], a: str, b: int
) -> None:
    template = "".join(parts)
    item: dict[str, Any] = {"a": a, "b": b}
    echo = ScriptedLLM(lambda r: r.prompt)  # the prompt the template made, as sent
    try:
        skill = Skill(echo, template)
        prompt = run_virtual(skill(item))
    except fanflow.errors.TemplateError as exc:
        message = str(exc)
    else:
        message = ""
        assert echo.requests[0].prompt == prompt
    if message:
        assert "{{ and }}" in message or "no field" in message  # says how to fix it
        return
    # Only the template's own text and the values it names, once per use.
    budget = len(template) + sum(
        template.count("{" + f + "}") * len(str(item[f])) for f in skill.fields
    )
    assert len(prompt) <= budget
    assert "<class" not in prompt or "<class" in a + template  # no Python internals


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(_TEMPLATE_CHARS, max_size=12), a=st.text(max_size=10))
def test_fuzz_templates_through_map(parts: list[str], a: str) -> None:
    template = "".join(parts)
    llm = ScriptedLLM(lambda r: r.prompt)

    async def go() -> fanflow.MapResult[Any] | fanflow.errors.TemplateError:
        try:
            return await fanflow.map(llm, template, [{"a": a, "b": 1}, {"a": a}])
        except fanflow.errors.TemplateError as exc:
            return exc

    out = run_virtual(go())
    if isinstance(out, fanflow.errors.TemplateError):
        assert llm.calls == 0
        return
    for record in out.records:
        assert record.ok or isinstance(record.error, fanflow.errors.TemplateError)
        if record.ok:
            assert len(record.value) <= len(template) * (1 + len(a) + 1)
