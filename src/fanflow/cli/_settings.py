"""Settings of a run: from flags, then ``FANFLOW_*`` environment variables, then a config
file, then defaults, in that order (the first that sets a value wins).

The config file is TOML (read with the standard library's ``tomllib``): ``--config PATH``,
else ``$FANFLOW_CONFIG``, else ``./fanflow.toml`` when it exists. Keys are the long flag
names (``concurrency = 16``, ``base-url = "http://..."``); a ``[[deployment]]`` table per
deployment makes a router (``cli/_deployments.py``); a ``[model-limits]`` table gives
models their own limits (``cli/_modellimits.py``). API keys are never settings:
they stay in the provider's own environment variables and are never printed.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._budget import UNPRICED_FIX
from .._exceptions import ConfigError
from . import _modellimits
from ._deployments import DeploymentSpec, from_table
from ._modellimits import ModelLimits

__all__ = ["OPTIONS", "Option", "Settings", "for_cli", "resolve_settings"]

PROVIDERS = ("openai", "anthropic", "local", "sim")


@dataclass(frozen=True)
class Option:
    """One setting that may come from a flag, the environment or the config file."""

    name: str
    kind: Callable[[str], Any]
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "FANFLOW_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("provider", str, "openai, anthropic, local or sim (default: from the environment)",
           choices=PROVIDERS),
    Option("model", str, "the model name"),
    Option("base_url", str, "the server's URL; an OpenAI-compatible one unless "
           "--provider anthropic (default: OPENAI_BASE_URL)"),
    Option("api_version", str, "Azure OpenAI's api-version (the key then goes in the "
           "api-key header)"),
    Option("concurrency", int, "the most calls in flight at once (default: adaptive, "
           "up to 1,024, lowered to what the server accepts at its first 429)", minimum=1),
    Option("rpm", int, "requests per minute allowed", minimum=1),
    Option("tpm", int, "tokens per minute allowed", minimum=1),
    Option("shared_limits", str, "share the limits with every process naming this store: "
           "sqlite:///PATH (one machine) or redis://HOST:PORT/DB"),
    Option("timeout", float, "seconds per attempt", minimum=0.001),
    Option("retries", int, "retries after the first attempt (default 3)", minimum=0),
    Option("budget", float, "the most money to spend, in USD", minimum=0.0),
    Option("store", str, "the result store for --job (default .fanflow/store.db)"),
    Option("route", str, "how calls go to the --deployment's: spread (where there is "
           "room now, the default) or fallback (the first while it is healthy)",
           choices=("spread", "fallback")),
    Option("cascade", str, "ask the --deployment's in tiers, cheapest first, e.g. "
           "small,big (a tier of several, spread over them: a+b,big); the next tier gets "
           "what --accept rejects"),
    Option("accept", str, "with --cascade, when a tier's answer is kept: agreement "
           "(its samples agree; agreement:5>=0.8: 4 of 5 samples agree), match:REGEX, "
           "reject:REGEX or json"),
)  # fmt: skip

_BY_NAME = {o.name: o for o in OPTIONS}

# The library's messages name its arguments ("raise timeout=", "pass api_key="); a
# command-line user needs the flag. This is the one table from argument to flag.
FLAG_OF_ARGUMENT: Mapping[str, str] = {
    **{o.name: o.flag for o in OPTIONS},
    "api_key": "--api-key",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "system": "--system",
    "prices": "--price",
    "limits": "--concurrency, --rpm or --tpm",
    "retry": "--retries",
    "shared": "--shared-limits",
}
# ``name=`` used as a name (followed by a space, punctuation or the end), not ``name=3``.
_ARGUMENT = re.compile(
    r"(?<![\w.-])(" + "|".join(map(re.escape, FLAG_OF_ARGUMENT)) + r")=(?![\w'\"{(\[])"
)


# Library advice that names no single argument, as the CLI gives it (--budget is in
# dollars only, so there is no budget in tokens to suggest).
_ADVICE_FOR_CLI: Mapping[str, str] = {
    UNPRICED_FIX: "give its price with --price MODEL=IN/OUT (USD per million tokens, "
    "e.g. --price gpt-5=1.25/10), or --price FILE.toml for a prices file",
}


def for_cli(message: str) -> str:
    """``message`` with the library's argument names (``timeout=``) as flags (``--timeout``)."""
    for library, cli in _ADVICE_FOR_CLI.items():
        message = message.replace(library, cli)
    return _ARGUMENT.sub(lambda m: FLAG_OF_ARGUMENT[m[1]], message)


@dataclass(frozen=True)
class Settings:
    """Resolved settings; ``sources`` says where each set value came from."""

    provider: str | None = None
    model: str | None = None
    base_url: str | None = None
    api_version: str | None = None
    concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    shared_limits: str | None = None
    timeout: float | None = None
    retries: int | None = None
    budget: float | None = None
    store: str | None = None
    route: str | None = None
    cascade: str | None = None
    accept: str | None = None
    #: The config file's ``[[deployment]]`` tables (``--deployment`` flags replace them).
    deployments: tuple[DeploymentSpec, ...] = ()
    #: Limits of the models named (``--model-limits``, the file's ``[model-limits]``).
    model_limits: tuple[ModelLimits, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


def _convert(option: Option, raw: Any, where: str) -> Any:
    fix = f"set {option.flag} to a valid value"
    kind = getattr(option.kind, "__name__", "a value")
    bad = ConfigError(f"{where}: {option.name} must be {kind}, got {raw!r}; {fix}")
    if isinstance(raw, bool) or (option.kind is str and not isinstance(raw, str)):
        raise bad
    if option.kind is int and isinstance(raw, float) and not raw.is_integer():
        raise bad
    try:
        value = option.kind(raw)
    except (TypeError, ValueError):
        raise bad from None
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(
            f"{where}: {option.name} must be >= {option.minimum:g}, got {value!r}; {fix}"
        )
    if option.choices is not None and value not in option.choices:
        raise ConfigError(
            f"{where}: unknown {option.name} {value!r}; use one of {', '.join(option.choices)}"
        )
    return value


def _config_path(explicit: str | None, env: Mapping[str, str], cwd: Path) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {explicit} not found; check the --config path")
        return path
    from_env = env.get("FANFLOW_CONFIG")
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigError(
                f"config file {from_env} (from FANFLOW_CONFIG) not found; fix or unset it"
            )
        return path
    default = cwd / "fanflow.toml"
    return default if default.is_file() else None


def read_config(path: Path) -> dict[str, Any]:
    """Read a config file into ``{option name: value}``, validating every key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}; fix the file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    out: dict[str, Any] = {}
    for key, raw in data.items():
        if key == "deployment":  # [[deployment]] tables: a router over them
            tables = raw if isinstance(raw, list) else [raw]
            out["deployments"] = tuple(
                from_table(t, f"{path}: deployment {i + 1}") for i, t in enumerate(tables)
            )
            continue
        name = key.replace("-", "_")
        if name == "model_limits":
            out[name] = _modellimits.from_table(raw, f"{path}: [{key}]")
            continue
        option = _BY_NAME.get(name)
        if option is None:
            known = ", ".join([*(o.flag[2:] for o in OPTIONS), "deployment", "model-limits"])
            raise ConfigError(f"{path}: unknown setting {key!r}; known settings: {known}")
        out[name] = _convert(option, raw, f"{path}: {key}")
    return out


def resolve_settings(
    flags: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    config: str | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Merge flags, ``FANFLOW_*`` variables and the config file (in that order).

    Args:
        flags: option name to value given on the command line (None: not given).
        env: the environment (default: ``os.environ``).
        config: an explicit config file path (``--config``).
        cwd: where to look for ``fanflow.toml`` (default: the working directory).

    Raises:
        ConfigError: a value is invalid; the message names where it came from.
    """
    env = os.environ if env is None else env
    path = _config_path(config, env, cwd or Path.cwd())
    from_file = read_config(path) if path is not None else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        flag_value = flags.get(option.name)
        if flag_value is not None:
            values[option.name] = _convert(option, flag_value, option.flag)
            sources[option.name] = "flag"
        elif env.get(option.env, "") != "":
            values[option.name] = _convert(option, env[option.env], option.env)
            sources[option.name] = "env"
        elif option.name in from_file:
            values[option.name] = from_file[option.name]
            sources[option.name] = str(path)
    for table in ("deployments", "model_limits"):
        if table in from_file:
            values[table] = from_file[table]
            sources[table] = str(path)
    return Settings(**values, sources=sources)
