"""Choosing and opening the model handles of a command (a thin adapter over fanflow's
handles).

With ``--provider`` the choice is explicit. Without it: ``--base-url`` (or
``OPENAI_BASE_URL``) always means an OpenAI-compatible server, whatever keys are set
(``--provider anthropic --base-url URL`` for an Anthropic-compatible one); then an API key
(``--api-key``/``FANFLOW_API_KEY`` or ``OPENAI_API_KEY``: OpenAI; ``ANTHROPIC_API_KEY``:
Anthropic), then the embedded local model, else an error that says how to configure one.
``sim`` starts :class:`fanflow.testing.SimServer` on loopback inside the
command and talks to it with :func:`fanflow.openai` over real HTTP, so demos and tests
run offline through the same code path as a hosted API.

API keys are never settings (never in a config file, never printed): ``--api-key`` or
``FANFLOW_API_KEY`` is handed to the handle, which keeps it as a ``Secret``; otherwise the
provider's own variable is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fanflow

from .._exceptions import ConfigError
from .._limits import DEFAULT_LIMITS, Limits
from .._llm import BaseLLM
from .._retry import RetryPolicy
from ._deployments import build_router, check_routing
from ._modellimits import by_model
from ._settings import Settings

__all__ = [
    "SIM_EXAMPLE",
    "ProviderPlan",
    "SimSpec",
    "open_llms",
    "parse_sim_spec",
    "plan_llm",
    "sim_keys",
]

NO_PROVIDER = (
    "no model is configured; pass --api-key (or set OPENAI_API_KEY or ANTHROPIC_API_KEY), "
    "or pass --base-url URL for an OpenAI-compatible server (or set OPENAI_BASE_URL), or "
    "install the local model (pip install 'fanflow[local]'), or use --provider sim for a "
    "simulated model"
)

# Where each provider reads its key and base URL when the command line gives none.
_KEY_VARIABLES = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
_URL_VARIABLES = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}

_SIM_NUMBERS = {
    "latency": float,
    "per_token": float,
    "jitter": float,
    "seed": int,
    "rpm": int,
    "tpm": int,
    "max_in_flight": int,
    "batch_time": float,
}


@dataclass(frozen=True)
class SimSpec:
    """Knobs of the simulated server: ``--sim latency=0.05,rpm=600,500=0.1,reply=ok``.

    Keys are SimServer's arguments (latency, per_token, jitter, seed, rpm, tpm,
    max_in_flight, reply), ``batch_time`` (seconds a batch takes, for ``--batch``) and
    fault kinds with their probability (``500=0.1``,
    ``429=0.05``, ``hang=0.01``, ...).
    """

    options: Mapping[str, Any] = field(default_factory=lambda: {"latency": 0.05})
    faults: Mapping[str, float] = field(default_factory=dict)


def sim_keys() -> str:
    """The keys ``--sim`` accepts, for its help and its errors (one list for both)."""
    from ..testing import FAULTS

    return (
        f"{', '.join([*_SIM_NUMBERS, 'reply'])}, or a fault kind with its probability "
        f"({', '.join(FAULTS)})"
    )


SIM_EXAMPLE = "latency=0.05,500=0.1,429=0.05,seed=0"


def parse_sim_spec(spec: str | None) -> SimSpec:
    """Parse ``key=value,key=value`` into a :class:`SimSpec`."""
    from ..testing import FAULTS

    if not spec:
        return SimSpec()
    options: dict[str, Any] = {"latency": 0.05}
    faults: dict[str, float] = {}
    for part in spec.split(","):
        key, sep, raw = part.partition("=")
        key, raw = key.strip().replace("-", "_"), raw.strip()
        if not sep:
            raise ConfigError(
                f"--sim: cannot read {part!r}; write key=value pairs separated by commas "
                f"(keys: {sim_keys()})"
            )
        if key == "reply":
            options[key] = raw
            continue
        if key in _SIM_NUMBERS:
            kind: Any = _SIM_NUMBERS[key]
        elif key in FAULTS:
            kind = float
        else:
            raise ConfigError(f"--sim: unknown key {key!r}; use {sim_keys()}")
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"--sim: {key} must be a number, got {raw!r}") from None
        if key in FAULTS:
            faults[key] = value
        else:
            options[key] = value
    return SimSpec(options, faults)


@dataclass(frozen=True)
class ProviderPlan:
    """A checked choice of handle, opened later on the command's event loop."""

    provider: str
    settings: Settings
    max_tokens: int | None = None
    sim: SimSpec | None = None
    # Never shown: kept out of repr, handed to the handle (which keeps it as a Secret).
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    api_version: str | None = None
    # The deployments' keys are read from it (``key-env``) when the router is built.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def build(self, sim_url: str | None) -> BaseLLM:
        s = self.settings
        if self.provider == "router":
            return build_router(s, self.env, self.max_tokens)
        kwargs: dict[str, Any] = {"limits": _limits(s)}
        if s.model_limits:
            kwargs["limits"] = by_model(kwargs["limits"], s.model_limits)
        if s.timeout is not None:
            kwargs["timeout"] = s.timeout
        if s.retries is not None:
            kwargs["retry"] = RetryPolicy(attempts=s.retries + 1)
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.provider == "sim":
            assert sim_url is not None
            sim = fanflow.openai(s.model or "sim", base_url=sim_url, **kwargs)
            # Each run's server listens on a new port, but answers the same: one cache
            # (so --job resumes). Its reply is all that changes what it answers.
            reply = (self.sim or SimSpec()).options.get("reply")
            sim.cache_endpoint = f"fanflow-sim(reply={reply!r})"
            return sim
        if self.provider in ("openai", "anthropic"):
            assert s.model is not None
            if self.base_url is not None:
                kwargs["base_url"] = self.base_url
            if self.api_key is not None:
                kwargs["api_key"] = self.api_key
            llm: BaseLLM
            if self.provider == "anthropic":
                llm = fanflow.anthropic(s.model, **kwargs)
            else:
                llm = fanflow.openai(s.model, api_version=self.api_version, **kwargs)
            return llm
        # The embedded model: --model, when given, is the path of a GGUF file.
        if "max_tokens" in kwargs:
            kwargs["defaults"] = {"max_tokens": kwargs.pop("max_tokens")}
        if s.concurrency is None and s.rpm is None and s.tpm is None and not s.model_limits:
            # Its own default, one call per instance, as in the library (decision 0158):
            # more would wait in its pool, where per-attempt timeouts run too.
            del kwargs["limits"]
        built: BaseLLM = fanflow.local(s.model, **kwargs)
        return built


def _local_model_installed() -> bool:
    """Whether ``fanflow.local()`` can run: llama.cpp and the default model are installed."""
    import importlib.metadata
    import importlib.util

    from ..providers._local import DEFAULT_PACKAGE

    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _limits(s: Settings) -> Limits:
    """The handle's limits: ``--concurrency`` fixes the calls in flight; without it, the
    library's default (``fanflow.limits.DEFAULT_LIMITS``: adaptive, up to
    ``DEFAULT_CONCURRENCY``). ``--rpm``/``--tpm`` are paced either way, and
    ``--shared-limits`` shares all of them with the other processes naming its store."""
    shared = s.shared_limits
    if s.concurrency is None:
        return Limits(rpm=s.rpm, tpm=s.tpm, controller=DEFAULT_LIMITS.controller, shared=shared)
    return Limits(concurrency=s.concurrency, rpm=s.rpm, tpm=s.tpm, shared=shared)


_EXAMPLE_MODEL = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5"}


def plan_llm(
    settings: Settings,
    env: Mapping[str, str],
    *,
    sim: SimSpec | None = None,
    max_tokens: int | None = None,
    api_key: str | None = None,
) -> ProviderPlan:
    """Choose the handle the settings ask for (nothing is opened yet).

    Args:
        settings: the resolved settings.
        env: the environment (provider keys and base URLs are read from it).
        sim: the simulated server's knobs (``--provider sim``).
        max_tokens: the output token limit per call.
        api_key: ``--api-key`` (else ``FANFLOW_API_KEY``, else the provider's variable).

    Raises:
        ConfigError: no provider could be chosen, or it lacks what it needs.
    """
    api_key = api_key or env.get("FANFLOW_API_KEY") or None
    provider = settings.provider
    check_routing(settings)
    if settings.deployments:
        if provider not in (None, "openai", "anthropic"):
            raise ConfigError(
                f"--deployment makes a router over the deployments given; --provider "
                f"{provider} cannot go with it (give each deployment's provider= instead)"
            )
        if settings.model_limits:
            raise ConfigError(
                "--model-limits gives one handle's models their own limits; with "
                "--deployment give each deployment its own rpm=N, tpm=N or concurrency=N"
            )
        return ProviderPlan("router", settings, max_tokens, env=dict(env))
    if settings.route is not None:
        raise ConfigError(
            "--route says how calls go to the deployments; give them with --deployment"
        )
    if provider is None:
        if settings.base_url or env.get("OPENAI_BASE_URL"):
            provider = "openai"  # --base-url means an OpenAI-compatible server
        elif api_key or env.get("OPENAI_API_KEY"):
            provider = "openai"
        elif env.get("ANTHROPIC_API_KEY"):
            provider = "anthropic"
        elif _local_model_installed():
            provider = "local"
        else:
            raise ConfigError(NO_PROVIDER)
    if provider in _EXAMPLE_MODEL and settings.model is None:
        raise ConfigError(
            f"--model is needed for {provider} (e.g. --model {_EXAMPLE_MODEL[provider]}, "
            "or FANFLOW_MODEL)"
        )
    base_url = settings.base_url
    if provider in _KEY_VARIABLES:
        api_key = api_key or env.get(_KEY_VARIABLES[provider]) or None
        base_url = base_url or env.get(_URL_VARIABLES[provider]) or None
        if api_key is None:
            api_key = ""  # never the process environment's: this command's env decides
    return ProviderPlan(
        provider,
        settings,
        max_tokens,
        sim if provider == "sim" else None,
        api_key=api_key,
        base_url=base_url,
        api_version=settings.api_version,
    )


@contextlib.asynccontextmanager
async def open_llms(plans: Sequence[ProviderPlan]) -> AsyncIterator[list[BaseLLM]]:
    """Open the handles of ``plans`` (one SimServer for all ``sim`` plans); close them."""
    async with contextlib.AsyncExitStack() as stack:
        sim_url: str | None = None
        sims = [p.sim for p in plans if p.provider == "sim"]
        if sims:
            from ..testing import SimBatches, SimServer

            spec = sims[0] or SimSpec()
            options = dict(spec.options)
            batches = SimBatches(time=options.pop("batch_time", 1.0))
            server = SimServer(**options, faults=spec.faults, keep_requests=False, batches=batches)
            await stack.enter_async_context(server)
            sim_url = server.url
        llms = []
        for plan in plans:
            llm = plan.build(sim_url)
            stack.push_async_callback(llm.aclose)
            llms.append(llm)
        yield llms
