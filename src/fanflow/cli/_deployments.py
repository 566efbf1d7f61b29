"""Deployments on the command line: ``--deployment`` (repeated) and ``--route``, or a
``[[deployment]]`` table per deployment in the config file, make the command's handle a
router (``fanflow.router``) over them.

``--deployment east=https://east.example/v1,model=gpt-4o,key-env=EAST_KEY,rpm=500``: the
first pair is the deployment's name and base URL; the others are ``model``,
``key-env`` (the environment variable holding its key: keys are never written on the
command line or in the file), ``provider`` (``openai``, the default, or ``anthropic``),
``rpm``, ``tpm``, ``concurrency`` and ``weight``. The same keys name a table's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fanflow

from .._exceptions import ConfigError
from .._limits import DEFAULT_LIMITS, Limits
from .._llm import BaseLLM
from .._retry import RetryPolicy

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = ["DEPLOYMENT_EXAMPLE", "DeploymentSpec", "build_router", "parse_deployment"]

DEPLOYMENT_EXAMPLE = "east=https://east.example/v1,model=gpt-4o,key-env=EAST_KEY,rpm=500"

_NUMBERS: Mapping[str, type] = {"rpm": int, "tpm": int, "concurrency": int, "weight": float}
_TEXTS = ("model", "key_env", "provider")
KEYS = ("name", "url", *_TEXTS, *_NUMBERS)


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment as the command line or the config file describes it."""

    name: str
    url: str
    model: str | None = None
    key_env: str | None = None
    provider: str = "openai"
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    weight: float = 1.0


def _fields(pairs: Mapping[str, Any], where: str) -> DeploymentSpec:
    """A spec from ``{key: raw value}``, each key and value checked."""
    values: dict[str, Any] = {}
    for key, raw in pairs.items():
        name = key.strip().replace("-", "_")
        if name not in KEYS:
            known = ", ".join(k.replace("_", "-") for k in KEYS)
            raise ConfigError(f"{where}: unknown key {key!r}; use {known}")
        if name in _NUMBERS:
            try:
                value = _NUMBERS[name](raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {key} must be a number, got {raw!r}") from None
            if value <= 0:
                raise ConfigError(f"{where}: {key} must be > 0, got {raw!r}")
            values[name] = value
        else:
            values[name] = str(raw).strip()
    for needed in ("name", "url"):
        if not values.get(needed):
            raise ConfigError(
                f"{where}: the deployment needs a {needed}; e.g. {DEPLOYMENT_EXAMPLE}"
            )
    if values.get("provider", "openai") not in ("openai", "anthropic"):
        raise ConfigError(
            f"{where}: provider must be openai or anthropic, got {values['provider']!r}"
        )
    return DeploymentSpec(**values)


def parse_deployment(text: str) -> DeploymentSpec:
    """``NAME=URL,key=value,...`` (``--deployment``) as a :class:`DeploymentSpec`."""
    where = f"--deployment {text!r}"
    pairs: dict[str, str] = {}
    for i, part in enumerate(text.split(",")):
        key, sep, raw = part.partition("=")
        if not sep:
            raise ConfigError(
                f"{where}: cannot read {part!r}; write NAME=URL first, then key=value "
                f"pairs separated by commas, e.g. {DEPLOYMENT_EXAMPLE}"
            )
        if i == 0:
            pairs["name"], pairs["url"] = key.strip(), raw.strip()
        else:
            pairs[key] = raw
    return _fields(pairs, where)


def from_table(table: Any, where: str) -> DeploymentSpec:
    """A config file's ``[[deployment]]`` table as a :class:`DeploymentSpec`."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: each deployment must be a table ([[deployment]])")
    return _fields(dict(table), where)


def build_router(settings: Settings, env: Mapping[str, str], max_tokens: int | None) -> BaseLLM:
    """The router over the settings' deployments (``--model``: for those that name none;
    ``--retries`` and ``--timeout``: for each)."""
    specs = settings.deployments
    retries, timeout = settings.retries, settings.timeout
    handles: list[BaseLLM] = []
    for spec in specs:
        where = f"deployment {spec.name!r}"
        chosen = spec.model or settings.model
        if chosen is None:
            raise ConfigError(f"{where}: needs a model (model=M, or --model for all)")
        key = ""
        if spec.key_env is not None:
            key = env.get(spec.key_env, "")
            if not key:
                raise ConfigError(
                    f"{where}: the environment variable {spec.key_env} (key-env) is not set; "
                    "export the deployment's API key there"
                )
        limits = Limits(
            concurrency=spec.concurrency,
            rpm=spec.rpm,
            tpm=spec.tpm,
            controller=None if spec.concurrency is not None else DEFAULT_LIMITS.controller,
        )
        kwargs: dict[str, Any] = {"base_url": spec.url, "api_key": key, "limits": limits}
        if retries is not None:
            kwargs["retry"] = RetryPolicy(attempts=retries + 1)
        if timeout is not None:
            kwargs["timeout"] = timeout
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        make = fanflow.anthropic if spec.provider == "anthropic" else fanflow.openai
        handles.append(make(chosen, **kwargs))
    strategy = settings.route or "spread"
    return fanflow.router(
        *handles,
        strategy=strategy,  # type: ignore[arg-type]
        names=[s.name for s in specs],
        weights=[s.weight for s in specs],
    )
