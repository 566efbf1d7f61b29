"""``Skill``: one LLM step, a prompt template over an input dict, optionally structured.

With ``output=`` a pydantic model, the model's JSON schema goes into the system prompt
and ``response_format``; the reply is parsed and validated, and an invalid reply is
retried with the validation error appended to the conversation (up to
``validation_retries`` more calls). The value is then the model instance. pydantic is
not a dependency of fanflow: a model class is recognised by its ``model_validate_json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Unpack

from .._durable import execute_stored
from .._engine import Run
from .._events import Hook
from .._exceptions import ConfigError, ParseError
from .._llm import LLM
from .._progress import shown
from .._sync import blocking
from .._types import CallRecord, Message, Request, Response, Status
from .._util import given
from ..backends._base import OWN, Enclosing
from ..store import ResultStore
from ._common import check_model
from ._options import Options, option_attributes, resolve
from ._parsing import find_json
from ._priming import primed_step
from ._prompt import constant_metadata, parse_template, render

__all__ = ["Skill", "SkillResult", "template_fields"]


def template_fields(template: str) -> list[str]:
    """The field names a template uses, in order, unique.

    Raises:
        TemplateError: it is not a valid template (see :func:`parse_template`).
    """
    return list(parse_template(template).fields)


def _is_model(output: Any) -> bool:
    return isinstance(output, type) and callable(getattr(output, "model_validate_json", None))


def _model_parser(model: Any) -> Callable[[Response], Any]:
    def parse(response: Response) -> Any:
        data = find_json(response.text)
        if data is None:
            raise ValueError("the reply contains no JSON object")
        return model.model_validate_json(json.dumps(data))

    return parse


@dataclass(frozen=True, repr=False)
class SkillResult:
    """One run of a skill: its value or error, and every call it made.

    ``calls`` has more than one record when a reply failed validation and was retried.
    """

    status: Status
    value: Any = None
    error: BaseException | None = None
    calls: tuple[CallRecord[Any], ...] = field(default=())

    def __repr__(self) -> str:
        return f"fanflow.results.SkillResult(status={self.status.value}, calls={len(self.calls)})"

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED


@option_attributes("timeout", "retry", "hooks", "store", "cache", "budget", "prices")
class Skill:
    """One LLM step: a prompt template filled from an input dict.

    Args:
        llm: the model.
        prompt: a template over the input's keys (``"Summarize: {text}"``).
        system: a system prompt.
        output: how to read the reply: None (the text), a pydantic model class (parsed,
            validated, retried with the error; the value is the instance) or a function
            ``fn(text) -> value`` (retried the same way if it raises).
        name: a label for records (default: the prompt's first words).
        temperature, max_tokens, seed: request parameters.
        validation_retries: further calls allowed after an invalid reply.
        **options: the call options (:class:`fanflow.Options`). A budget given as a
            number is a new cap for each run (validation retries included). A chain,
            flow or pool given ``store``, ``cache``, ``budget`` or ``prices`` uses its own
            instead; its other options apply where the skill sets none.

    Call it: ``await skill({"text": ...})`` or ``await skill(text=...)`` returns the
    value or raises the error; :meth:`arun` returns a :class:`SkillResult` instead.
    """

    def __init__(
        self,
        llm: LLM,
        prompt: str,
        *,
        system: str | None = None,
        output: Any = None,
        name: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        validation_retries: int = 2,
        **options: Unpack[Options],
    ) -> None:
        self.options = resolve("Skill", options)
        check_model(llm, "Skill")
        if validation_retries < 0:
            raise ConfigError(f"validation_retries must be >= 0, got {validation_retries}")
        if output is not None and not callable(output):
            raise ConfigError(
                f"output must be a pydantic model class or a function, got {output!r}"
            )
        self.llm = llm
        self.prompt = prompt
        self.output = output
        self.name = name or " ".join(prompt.split()[:3])
        self.fields = list(parse_template(prompt, f"the prompt of skill {self.name!r}").fields)
        self.validation_retries = validation_retries
        self.params: dict[str, Any] = given(
            temperature=temperature, max_tokens=max_tokens, seed=seed
        )
        self._parse: Callable[[Response], Any] | None = None
        self._again = "Reply again with the corrected answer only."
        if _is_model(output):
            schema = json.dumps(output.model_json_schema(), separators=(",", ":"))
            instruction = f"Reply with one JSON object only, matching this JSON schema: {schema}"
            system = f"{system}\n\n{instruction}" if system else instruction
            self.params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": output.__name__, "schema": output.model_json_schema()},
            }
            self._parse = _model_parser(output)
            self._again = "Reply again with only the corrected JSON object."
        elif output is not None:
            user_parse = output

            def parse(response: Response) -> Any:
                return user_parse(response.text)

            self._parse = parse
        self.system = system

    def __repr__(self) -> str:
        return f"fanflow.Skill({self.name!r}, fields={self.fields})"

    async def __call__(self, inputs: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
        result = await self.arun(inputs, **kwargs)
        if result.error is not None:
            raise result.error
        return result.value

    async def arun(
        self, inputs: Mapping[str, Any] | None = None, /, *, progress: bool = False, **kwargs: Any
    ) -> SkillResult:
        """Run the skill on ``inputs`` (and/or keyword inputs); failures are data.

        ``progress=True`` shows its calls live (an input named ``progress`` goes in the
        ``inputs`` mapping).
        """
        merged = {**(inputs or {}), **kwargs}
        return await shown(
            self.execute(merged, index=None, label=self.name, hooks=()), progress=progress
        )

    run = blocking(arun)

    async def execute(
        self,
        inputs: Mapping[str, Any],
        *,
        index: int | None,
        label: str | None,
        hooks: Sequence[Hook],
        enclosing: Enclosing = OWN,
    ) -> SkillResult:
        """Run once on ``inputs`` (used by chains, flows and pools), within what
        ``enclosing`` (a pool's, chain's or flow's) sets in place of the skill's own."""
        try:
            prompt = render(self.prompt, inputs, index)
        except Exception as exc:
            return SkillResult(Status.FAILED, error=exc)
        metadata = {"pattern": "skill", "skill": self.name}
        metadata.update(constant_metadata(self.prompt, self.system))  # for prompt caches
        request = Request.of(prompt, system=self.system, metadata=metadata, **self.params)
        own, outer = self.options, enclosing
        llm = outer.handle_for(self.llm) if outer.handle_for is not None else self.llm
        call = replace(
            own.call,
            hooks=own.call.hooks + tuple(hooks),
            prices=outer.prices if outer.prices is not None else own.call.prices,
        )
        opts = call.start(budget=outer.budget).within(outer.shared, own.given)
        if llm is not self.llm:  # a batched attempt waits for its batch: no attempt timeout
            opts = replace(opts, timeout=None)
        store = outer.store if outer.store is not None else own.store
        reuse = outer.cache if outer.cache is not None else own.cache
        async with primed_step(self, llm, self.system, self.prompt):
            return await self._calls(llm, request, opts, store, reuse, index, label)

    async def _calls(
        self,
        llm: LLM,
        request: Request,
        opts: Run,
        store: ResultStore | None,
        reuse: bool,
        index: int | None,
        label: str | None,
    ) -> SkillResult:
        """The skill's call, and its retries when a reply fails validation."""
        calls: list[CallRecord[Any]] = []
        for _ in range(1 + (self.validation_retries if self._parse is not None else 0)):
            record: CallRecord[Any] = await execute_stored(
                llm,
                request,
                opts,
                store=store,
                reuse=reuse,
                index=index,
                label=label,
                parse=self._parse or _text,
            )
            calls.append(record)
            if record.ok:
                return SkillResult(Status.SUCCEEDED, value=record.value, calls=tuple(calls))
            if not isinstance(record.error, ParseError) or record.response is None:
                break
            # Show the model its own reply and what was wrong with it, then ask again.
            cause = record.error.__cause__ or record.error
            request = request.with_options(
                messages=(
                    *request.messages,
                    Message("assistant", record.response.text),
                    Message(
                        "user",
                        f"That reply could not be used: {cause}\n{self._again}",
                    ),
                )
            )
        last = calls[-1]
        return SkillResult(last.status, error=last.error, calls=tuple(calls))


def _text(response: Response) -> str:
    return response.text
