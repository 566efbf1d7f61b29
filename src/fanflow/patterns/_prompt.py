"""Turning an item into a request: prompt templates and request builders."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from .._exceptions import TemplateError
from .._types import Request

__all__ = ["Prompt", "RequestParams", "build_request"]

# A template string ("Summarize: {text}"; "{input}" for plain items) or a callable
# that builds the request (or the prompt text) from an item.
Prompt: TypeAlias = str | Callable[[Any], Request | str]
RequestParams: TypeAlias = Mapping[str, Any]


def _fields(item: Any) -> Mapping[str, Any]:
    if isinstance(item, Mapping):
        return item
    return {"input": item}


def render(template: str, item: Any, index: int | None) -> str:
    """Fill ``template`` with the item's fields; a missing field fails only this item."""
    fields = _fields(item)
    try:
        return template.format_map(fields)
    except KeyError as exc:
        name = exc.args[0] if exc.args else "?"
        where = f"item {index}" if index is not None else "the item"
        have = sorted(map(str, fields)) if isinstance(fields, Mapping) else []
        raise TemplateError(
            f"{where} has no field {name!r}, which the prompt template needs "
            f"(it has {have}); add the field to the item or change the template "
            "(plain-text items are available as {input}; write {{ and }} for literal braces)",
            field=str(name),
            index=index,
        ) from None
    except (IndexError, AttributeError, ValueError) as exc:
        where = f"item {index}" if index is not None else "the item"
        raise TemplateError(
            f"{where}: the prompt template could not be filled: {exc}; "
            "check the template's fields (write {{ and }} for literal braces)",
            index=index,
        ) from None


def build_request(
    prompt: Prompt,
    item: Any,
    index: int | None,
    *,
    system: str | None = None,
    params: RequestParams | None = None,
) -> Request:
    """Build the request for one item.

    A template is filled with the item's fields. A callable gets the item and returns a
    :class:`Request` (used as is, with unset parameters filled from ``params``) or text.
    """
    if isinstance(prompt, str):
        return Request.of(render(prompt, item, index), system=system, **(params or {}))
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
