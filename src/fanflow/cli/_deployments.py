"""Deployments on the command line: ``--deployment`` (repeated) and ``--route``, or a
``[[deployment]]`` table per deployment in the config file, make the command's handle a
router (``fanflow.router``) over them; ``--cascade small,big`` with ``--accept RULE``
makes them the tiers of a cascade (``fanflow.cascade``) instead.

``--deployment east=https://east.example/v1,model=gpt-4o,key-env=EAST_KEY,rpm=500``: the
first pair is the deployment's name and base URL; the others are ``model``,
``key-env`` (the environment variable holding its key: keys are never written on the
command line or in the file), ``provider`` (``openai``, the default, or ``anthropic``),
``rpm``, ``tpm``, ``concurrency`` and ``weight``. The same keys name a table's fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fanflow

from .._exceptions import ConfigError
from .._limits import DEFAULT_LIMITS, Limits
from .._llm import BaseLLM
from .._retry import RetryPolicy
from ..patterns._cascade import Accept, agreement

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = [
    "DEPLOYMENT_EXAMPLE",
    "AcceptRule",
    "DeploymentSpec",
    "build_router",
    "check_routing",
    "parse_accept",
    "parse_deployment",
    "parse_tiers",
]

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


def _handle(
    spec: DeploymentSpec, settings: Settings, env: Mapping[str, str], max_tokens: int | None
) -> BaseLLM:
    """One deployment's handle (``--model``: when it names none; ``--retries`` and
    ``--timeout``: for each)."""
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
    if settings.retries is not None:
        kwargs["retry"] = RetryPolicy(attempts=settings.retries + 1)
    if settings.timeout is not None:
        kwargs["timeout"] = settings.timeout
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    make = fanflow.anthropic if spec.provider == "anthropic" else fanflow.openai
    return make(chosen, **kwargs)


def build_router(settings: Settings, env: Mapping[str, str], max_tokens: int | None) -> BaseLLM:
    """The router over the settings' deployments, or with ``--cascade`` the cascade of
    their tiers (each tier of several a spread router over them)."""
    specs = settings.deployments
    handles = {s.name: _handle(s, settings, env, max_tokens) for s in specs}
    if settings.cascade is not None:
        accept = parse_accept(settings.accept)
        tiers = parse_tiers(settings.cascade, [s.name for s in specs])
        weights = {s.name: s.weight for s in specs}
        made = [
            handles[t[0]]
            if len(t) == 1
            else fanflow.router(*(handles[n] for n in t), names=t, weights=[weights[n] for n in t])
            for t in tiers
        ]
        return fanflow.cascade(*made, accept=accept, names=["+".join(t) for t in tiers])
    strategy = settings.route or "spread"
    return fanflow.router(
        *handles.values(),
        strategy=strategy,  # type: ignore[arg-type]
        names=[s.name for s in specs],
        weights=[s.weight for s in specs],
    )


# -- --cascade and --accept ---------------------------------------------------------------

ACCEPT_RULES = (
    "agreement (the tier is sampled 3 times and all must agree; agreement:5>=0.8: 5 "
    "samples, at least 80% agreeing), match:REGEX (kept when REGEX is found in the "
    "answer; anchor it with ^...$ for the whole answer), reject:REGEX (kept when it is "
    "not found), json (kept when the answer is valid JSON)"
)
_AGREEMENT = re.compile(r"agreement(?::(?P<samples>\d+))?(?:>=(?P<share>[0-9.]+))?")


@dataclass(frozen=True)
class AcceptRule:
    """A cascade's ``accept`` from ``--accept``: its repr (the rule as written) is part
    of the cascade's cache identity."""

    rule: str
    pattern: re.Pattern[str] | None = None
    found: bool = True  # keep the answer when the pattern is found (False: when it is not)

    def __call__(self, value: Any) -> bool:
        text = value if isinstance(value, str) else json.dumps(value)
        if self.pattern is None:  # json
            try:
                json.loads(text)
            except ValueError:
                return False
            return True
        return (self.pattern.search(text) is not None) == self.found


def parse_accept(text: str | None) -> Accept:
    """``--accept``'s rule as a cascade's ``accept``, or a ConfigError naming the rules."""
    if text is None or not text.strip():
        raise ConfigError(
            f"--cascade needs --accept RULE to say when a tier's answer is kept: {ACCEPT_RULES}"
        )
    rule = text.strip()
    kind, sep, arg = rule.partition(":")
    if rule == "json":
        return AcceptRule(rule)
    if kind in ("match", "reject") and sep:
        if not arg:
            raise ConfigError(f"--accept {rule}: give the regular expression after {kind}:")
        try:
            pattern = re.compile(arg)
        except re.error as exc:
            raise ConfigError(f"--accept {rule}: not a regular expression ({exc})") from None
        return AcceptRule(rule, pattern, found=kind == "match")
    agreed = _AGREEMENT.fullmatch(rule)
    if agreed is None:
        raise ConfigError(f"--accept {rule!r}: not a rule fanflow knows; use {ACCEPT_RULES}")
    samples, share = agreed["samples"], agreed["share"]
    try:
        return agreement(int(samples) if samples else 3, float(share) if share else 1.0)
    except ValueError:
        raise ConfigError(f"--accept {rule}: {share!r} is not a share between 0 and 1") from None
    except ConfigError as exc:
        raise ConfigError(f"--accept {rule}: {exc}") from None


def parse_tiers(text: str, names: list[str]) -> list[list[str]]:
    """``--cascade small,a+b``: the tiers, each a list of deployment names, checked
    against the ``--deployment``'s: every one in exactly one tier, two tiers or more."""
    tiers = [[n.strip() for n in part.split("+")] for part in text.split(",")]
    where = f"--cascade {text!r}"
    listed = [n for tier in tiers for n in tier]
    unknown = [n for n in listed if n not in names]
    if unknown or "" in listed:
        raise ConfigError(
            f"{where}: {', '.join(repr(n) for n in unknown) or 'an empty name'} is no "
            f"--deployment; the deployments are {', '.join(names)} (tiers separated by "
            "commas, cheapest first; deployments in one tier joined by +)"
        )
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if twice:
        raise ConfigError(
            f"{where}: {', '.join(twice)} is in more than one place; name each deployment once"
        )
    unused = [n for n in names if n not in listed]
    if unused:
        raise ConfigError(
            f"{where}: the deployment(s) {', '.join(unused)} are in no tier; add them "
            "to one (a+b spreads a tier over two) or drop the --deployment"
        )
    if len(tiers) < 2:
        raise ConfigError(
            f"{where}: a cascade needs two tiers or more, cheapest first, e.g. small,big"
        )
    return tiers


def check_routing(settings: Settings) -> None:
    """Refuse ``--route``, ``--cascade`` and ``--accept`` that do not go together,
    before anything is opened."""
    if settings.cascade is None:
        if settings.accept is not None:
            raise ConfigError(
                "--accept says when a cascade's tier answer is kept; give the tiers with --cascade"
            )
        return
    if not settings.deployments:
        raise ConfigError("--cascade names --deployment's as tiers; give them with --deployment")
    if settings.route is not None:
        raise ConfigError(
            "--route says how calls are spread over the deployments and --cascade asks "
            "them in tiers; give one (a tier of several is spread: --cascade a+b,big)"
        )
    parse_tiers(settings.cascade, [s.name for s in settings.deployments])
    parse_accept(settings.accept)
