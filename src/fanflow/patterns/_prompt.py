"""Turning an item into a request: prompt templates and request builders.

Templates are deliberately simple: ``{field}`` is replaced by the field's value as text
(``str(value)``), ``{{`` and ``}}`` are literal braces, and nothing else is allowed: no
attribute or index access (``{text.__class__}``, ``{row[0]}``), no conversions
(``{text!r}``), no format specs (``{score:.2f}``, ``{text:>99999999}``), no nested or
empty fields. A template is checked once, when a pattern starts (or a ``Skill`` is
made), and anything else is a :class:`fanflow.errors.TemplateError` naming the template and
the field, before any call. So a prompt is never larger than its template plus the
values it names, and never shows Python internals. This is the one template parser:
patterns, skills, chains, flows and the command line all use :func:`parse_template`.
"""

from __future__ import annotations

import functools
import hashlib
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

from .._exceptions import TemplateError
from .._promptcache import CONSTANT_CHARS, TEMPLATE_KEY
from .._types import Request

__all__ = [
    "FIRST_ITEMS",
    "Prompt",
    "RequestParams",
    "Template",
    "build_request",
    "check_fields",
    "check_first_items",
    "fill",
    "parse_template",
]

# A template string ("Summarize: {text}"; "{input}" for plain items) or a callable
# that builds the request (or the prompt text) from an item.
Prompt: TypeAlias = str | Callable[[Any], Request | str]
RequestParams: TypeAlias = Mapping[str, Any]

#: How many items a batch looks at before its first call: a template field that none
#: of them has is taken to be a mistake in the template (a TemplateError, nothing sent).
FIRST_ITEMS = 8

_NOT_IN_NAMES = frozenset(".[]{}!:")
_BRACES = "write {{ and }} for literal braces"


@dataclass(frozen=True, slots=True)
class Template:
    """A checked template: its text and the field names it uses (in order, unique)."""

    text: str
    fields: tuple[str, ...]


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _bad(template: str, what: str, field: str, problem: str, fix: str) -> TemplateError:
    return TemplateError(
        f"{what} is not a valid template: {problem} in {{{field}}} of {_short(template)}; "
        f"{fix} (templates take field names only, as {{name}}; {_BRACES})",
        field=field,
    )


@functools.lru_cache(maxsize=512)
def _parse(template: str, what: str) -> Template:
    names: list[str] = []
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(
            f"{what} is not a valid template ({exc}): {_short(template)}; name fields as "
            f"{{name}} and {_BRACES}"
        ) from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue  # literal text only
        written = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
        base = name.split(".", 1)[0].split("[", 1)[0]
        if name == "":
            raise _bad(template, what, written, "an empty field", "name the field, as {text}")
        if conversion:
            raise _bad(template, what, written, f"the conversion !{conversion}",
                       f"write {{{base}}}")  # fmt: skip
        if spec:
            raise _bad(template, what, written, f"the format spec :{spec}",
                       f"write {{{base}}} and format the value in the item itself")  # fmt: skip
        if any(c in _NOT_IN_NAMES for c in name):
            raise _bad(template, what, written, "attribute or index access",
                       f"write {{{base}}} and put the value you need in its own field")  # fmt: skip
        if name.isdigit():
            raise _bad(template, what, written, "a positional field",
                       "name the field, as {text} ({input} for plain-text items)")  # fmt: skip
        if name not in names:
            names.append(name)
    return Template(template, tuple(names))


def parse_template(template: str, what: str = "the prompt") -> Template:
    """Check ``template`` and return its fields.

    Args:
        template: the template text.
        what: how messages name it ("the prompt", "guard_prompt", ...).

    Raises:
        TemplateError: it uses anything but plain ``{name}`` fields and ``{{ }}``.
    """
    if not isinstance(template, str):
        raise TemplateError(f"{what} must be a str, got {type(template).__name__}")
    return _parse(template, what)


def check_fields(template: str, allowed: Iterable[str], what: str) -> Template:
    """Check a pattern's own template (``guard_prompt``, ``judge_prompt``, ...) when the
    pattern starts: valid, and using only the fields the pattern fills in.

    Raises:
        TemplateError: it is not valid, or names a field the pattern does not give.
    """
    parsed = parse_template(template, what)
    names = list(allowed)
    for name in parsed.fields:
        if name not in names:
            raise TemplateError(
                f"{what} {_short(template)} uses {{{name}}}, which it is not given; it may "
                f"use {', '.join('{' + n + '}' for n in names)} ({_BRACES})",
                field=name,
            )
    return parsed


def fill(template: str, values: Mapping[str, Any], what: str = "the prompt") -> str:
    """``template`` with its fields replaced by ``values`` (each as ``str(value)``).

    Raises:
        TemplateError: the template is not valid, or a field has no value.
    """
    parse_template(template, what)
    try:
        # Checked above: only plain {name} fields, so format_map does no attribute or
        # index access, no conversion and no padding: it is the fast, exact fill.
        return template.format_map(values)
    except KeyError as exc:
        name = exc.args[0] if exc.args else "?"
        raise TemplateError(
            f"{what} {_short(template)} needs {{{name}}}, which is not given; "
            f"it may use {sorted(map(str, values))} ({_BRACES})",
            field=str(name),
        ) from None


def _fields(item: Any) -> Mapping[str, Any]:
    kind = type(item)
    if kind is dict:  # the common kinds first: isinstance against Mapping is slow
        return cast(Mapping[str, Any], item)
    if kind not in _SCALARS and isinstance(item, Mapping):
        return item
    return {"input": item}


_SCALARS = (str, int, float)


def render(template: str, item: Any, index: int | None) -> str:
    """Fill ``template`` with the item's fields; a missing field fails only this item."""
    parse_template(template)
    fields = _fields(item)
    try:
        return template.format_map(fields)
    except KeyError as exc:
        name = exc.args[0] if exc.args else "?"
        where = f"item {index}" if index is not None else "the item"
        have = sorted(map(str, fields))
        raise TemplateError(
            f"{where} has no field {name!r}, which the prompt template needs "
            f"(it has {have}); add the field to the item or change the template "
            "(plain-text items are available as {input}; write {{ and }} for literal braces)",
            field=str(name),
            index=index,
        ) from None


def check_first_items(prompt: Prompt, items: Iterable[Any]) -> None:
    """Refuse a template field that none of a batch's first items has, before any call.

    ``items`` are the batch's first :data:`FIRST_ITEMS` items (all of them, if fewer).
    A field that not one of them has is a mistake in the template, not in the data: the
    batch would fail item after item. A field that some have is left to each item (one
    that lacks it fails alone).

    Raises:
        TemplateError: a field is in none of the items (names it, and what they have).
    """
    if not isinstance(prompt, str):
        return
    template = parse_template(prompt)
    first = [_fields(item) for item in items]
    if not first or not template.fields:
        return
    for name in template.fields:
        if not any(name in fields for fields in first):
            have = sorted({str(k) for fields in first for k in fields})
            n = len(first)
            which = "the only item lacks" if n == 1 else f"none of the first {n} items has"
            raise TemplateError(
                f"the prompt template {_short(prompt)} needs {{{name}}}, which {which} "
                f"(they have {have}); nothing was sent. Fix the template's field "
                "name (plain-text items are {input}) or add the field to the items",
                field=name,
            )


def constant_lead(template: str) -> str:
    """The template's text before its first field (all of it if it has none), as the
    filled prompt starts: the same for every item."""
    lead = []
    for literal, name, _, _ in string.Formatter().parse(template):
        lead.append(literal)
        if name is not None:
            break
    return "".join(lead)


def constant_metadata(template: str, system: str | None) -> dict[str, Any]:
    """The metadata a template's requests carry for the providers' prompt caches: how
    many leading characters of the prompt are constant, and a key naming the template."""
    lead = constant_lead(parse_template(template).text)
    digest = hashlib.sha256(f"{system or ''}\x00{lead}".encode()).hexdigest()
    return {CONSTANT_CHARS: len(lead), TEMPLATE_KEY: f"fanflow-{digest[:16]}"}


def build_request(
    prompt: Prompt,
    item: Any,
    index: int | None,
    *,
    system: str | None = None,
    params: RequestParams | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Request:
    """Build the request for one item.

    A template is filled with the item's fields. A callable gets the item and returns a
    :class:`Request` (used as is, with unset parameters filled from ``params``) or text.
    ``metadata`` goes with a template's request.
    """
    if isinstance(prompt, str):
        text = render(prompt, item, index)
        return Request.of(text, system=system, metadata=metadata, **(params or {}))
    built = prompt(item)
    if isinstance(built, Request):
        if params:
            changes = {k: v for k, v in params.items() if getattr(built, k) is None}
            if changes:
                built = built.with_options(**changes)
        return built
    if isinstance(built, str):
        return Request.of(built, system=system, **(params or {}))
    raise TemplateError(
        f"item {index}: the prompt callable returned {type(built).__name__}; "
        "return a str or a fanflow.Request",
        index=index,
    )
