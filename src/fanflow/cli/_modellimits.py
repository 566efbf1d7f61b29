"""Limits per model on the command line: ``--model-limits`` (repeated), or a
``[model-limits]`` table in the config file, for request files whose lines name several
models (decision 0290).

``--model-limits gpt-4o:rpm=500,tpm=30000`` gives ``gpt-4o``'s calls their own limits;
the keys are ``rpm``, ``tpm`` and ``concurrency``. In the config file::

    [model-limits]
    "gpt-4o" = { rpm = 500 }
    "gpt-4o-mini" = { rpm = 5000, concurrency = 64 }

A model's limits are the command's (``--rpm``, ``--tpm``, ``--concurrency``,
``--shared-limits``) with the keys it names replaced; models not named keep the
command's. The model is what comes before the last ``:`` ahead of the first key, so a
name with a colon (``llama3:8b:rpm=60``) reads as written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .._exceptions import ConfigError
from .._limits import Limits

__all__ = ["MODEL_LIMITS_EXAMPLE", "ModelLimits", "by_model", "from_table", "parse_model_limits"]

MODEL_LIMITS_EXAMPLE = "gpt-4o:rpm=500,tpm=30000"

_KEYS = ("rpm", "tpm", "concurrency")

#: One model's limits as given: (model, {key: value}).
ModelLimits = tuple[str, Mapping[str, int]]


def _numbers(pairs: Mapping[str, Any], where: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, raw in pairs.items():
        name = str(key).strip()
        if name not in _KEYS:
            raise ConfigError(f"{where}: unknown key {name!r}; use {', '.join(_KEYS)}")
        try:
            value = int(raw) if not isinstance(raw, bool) else 0
        except (TypeError, ValueError):
            value = 0
        if value < 1 or (isinstance(raw, float) and not raw.is_integer()):
            raise ConfigError(f"{where}: {name} must be a whole number >= 1, got {raw!r}")
        out[name] = value
    if not out:
        raise ConfigError(f"{where}: give at least one of {', '.join(_KEYS)}")
    return out


def parse_model_limits(text: str) -> ModelLimits:
    """``MODEL:key=value,...`` (``--model-limits``) as (model, {key: value})."""
    where = f"--model-limits {text!r}"
    head, sep, _ = text.partition("=")
    model, colon, _ = head.rpartition(":")
    if not sep or not colon or not model.strip():
        raise ConfigError(f"{where}: write MODEL:key=value,..., e.g. {MODEL_LIMITS_EXAMPLE}")
    pairs: dict[str, str] = {}
    for part in text[len(model) + 1 :].split(","):
        key, sep, raw = part.partition("=")
        if not sep:
            raise ConfigError(f"{where}: cannot read {part!r}; e.g. {MODEL_LIMITS_EXAMPLE}")
        pairs[key] = raw.strip()
    return model.strip(), _numbers(pairs, where)


def from_table(table: Any, where: str) -> tuple[ModelLimits, ...]:
    """A config file's ``[model-limits]`` table: one inline table per model."""
    if not isinstance(table, Mapping):
        raise ConfigError(f'{where}: must be a table of models, e.g. "gpt-4o" = {{ rpm = 500 }}')
    out: list[ModelLimits] = []
    for model, limits in table.items():
        if not isinstance(limits, Mapping):
            raise ConfigError(f"{where}: {model!r} must be a table, e.g. {{ rpm = 500 }}")
        out.append((str(model), _numbers(limits, f"{where}: {model!r}")))
    return tuple(out)


def by_model(base: Limits, given: tuple[ModelLimits, ...]) -> dict[str, Limits]:
    """The handle's ``limits=`` mapping: each model given its own, ``"*"`` the rest."""
    out: dict[str, Limits] = {"*": base}
    for model, numbers in given:
        changes: dict[str, Any] = dict(numbers)
        if "concurrency" in numbers:
            changes["controller"] = None  # a fixed concurrency, as --concurrency is
        out[model] = dataclasses.replace(out.get(model, base), **changes)
    return out
