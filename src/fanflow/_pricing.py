"""Prices of models, and the cost of a call.

A built-in table covers current models of OpenAI, Anthropic and Google (list prices in US
dollars per million tokens, standard tier). It lives in a data file, ``prices.toml`` in
the package, with the date it was checked and where each vendor publishes its prices:
update that file, not code. Users add or override prices with
``prices={"model": fanflow.Price(input=..., output=...)}`` (or a file of their own in the
same format, :func:`load_prices`; on the command line ``--price``).

Each price carries the batch APIs' rate (``Price.batch``, 0.5 for every model in the
table: OpenAI's Batch API and Anthropic's Message Batches both charge half), and the
prompt cache's: ``cached_input`` for tokens read from the cache, ``cache_write`` for
tokens written to it (Anthropic's five-minute writes; OpenAI charges writes as plain
input) and ``cache_write_1h`` for Anthropic's one-hour writes. A model whose cache price
is unknown has its cached tokens charged at the full input price (an hour's writes at
the five-minute price when only that is known), and the cost is marked estimated
(:class:`Cost`).

A model is priced only when its name is in the table exactly, or is a dated snapshot of
a name in it (``gpt-4o-2024-08-06``, ``claude-3-5-haiku-20241022``, ``...-latest``).
Anything else (``gpt-4o-audio-preview``, a fine-tune, a local model) costs ``None``:
"unknown", never a guessed number.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from ._exceptions import ConfigError
from ._types import Usage

__all__ = ["PRICES", "Cost", "Price", "cost_of", "load_prices", "price_of", "priced"]


@dataclass(frozen=True, slots=True)
class Price:
    """The price of a model in US dollars per million tokens.

    Args:
        input: dollars per million input (prompt) tokens.
        output: dollars per million output (completion) tokens.
        batch: the batch APIs' price as a share of the real-time one (0.5: half price,
            as OpenAI's Batch API and Anthropic's Message Batches charge).
        cached_input: dollars per million input tokens read from the prompt cache
            (None: unknown).
        cache_write: dollars per million input tokens written to the prompt cache
            (None: unknown; OpenAI's writes are plain input, give ``input``).
        cache_write_1h: dollars per million input tokens written for an hour
            (Anthropic's ``"ttl": "1h"``, 2x input; None: unknown, charged as
            ``cache_write``).
    """

    input: float
    output: float
    batch: float = 0.5
    cached_input: float | None = None
    cache_write: float | None = None
    cache_write_1h: float | None = None

    def __post_init__(self) -> None:
        cache = (self.cached_input, self.cache_write, self.cache_write_1h)
        if min(self.input, self.output, *(n or 0 for n in cache)) < 0:
            raise ConfigError(
                f"prices must be >= 0 dollars per million tokens, got input={self.input}, "
                f"output={self.output}, cached_input={self.cached_input}, "
                f"cache_write={self.cache_write}, cache_write_1h={self.cache_write_1h}"
            )
        if not 0 <= self.batch <= 1:
            raise ConfigError(
                f"batch must be a share of the real-time price in [0, 1], got {self.batch}"
            )

    def __repr__(self) -> str:
        extra = f", batch={self.batch:g}" if self.batch != 0.5 else ""
        if self.cached_input is not None:
            extra += f", cached_input={self.cached_input:g}"
        if self.cache_write is not None:
            extra += f", cache_write={self.cache_write:g}"
        if self.cache_write_1h is not None:
            extra += f", cache_write_1h={self.cache_write_1h:g}"
        return f"fanflow.Price(input={self.input:g}, output={self.output:g}{extra})"

    def cost(
        self,
        input_tokens: float,
        output_tokens: float,
        *,
        cached: float = 0,
        written: float = 0,
        written_1h: float = 0,
    ) -> float:
        """Dollars for the given token counts; ``cached`` and ``written`` are the input
        tokens read from and written to the prompt cache, ``written_1h`` the part of
        ``written`` cached for an hour (an unknown cache price counts them as plain
        input; an unknown hour price, at the five-minute one)."""
        read = self.input if self.cached_input is None else self.cached_input
        write = self.input if self.cache_write is None else self.cache_write
        hour = write if self.cache_write_1h is None else self.cache_write_1h
        plain = input_tokens - cached - written
        cache = cached * read + (written - written_1h) * write + written_1h * hour
        return (plain * self.input + cache + output_tokens * self.output) / 1_000_000

    def batch_cost(
        self, input_tokens: float, output_tokens: float, *, cached: float = 0, written: float = 0
    ) -> float:
        """Dollars for the given token counts through a provider's batch API."""
        return self.cost(input_tokens, output_tokens, cached=cached, written=written) * self.batch

    def knows(self, usage: Usage) -> bool:
        """Whether every token of ``usage`` has a known price (its cache tokens too)."""
        read_known = self.cached_input is not None or not usage.cached_input_tokens
        write_known = self.cache_write is not None or not usage.cache_write_input_tokens
        hour_known = self.cache_write_1h is not None or not usage.cache_write_1h_input_tokens
        return read_known and write_known and hour_known


@dataclass(frozen=True, slots=True)
class Cost:
    """What one call cost: ``dollars``; ``cache_saved``, what the prompt cache saved
    against the same tokens uncached (negative when writes cost more than reads saved);
    ``estimated``, a cache price was unknown and its tokens were counted as plain input."""

    dollars: float
    cache_saved: float = 0.0
    estimated: bool = False


def priced(usage: Usage, price: Price, *, batch: bool = False) -> Cost:
    """The :class:`Cost` of ``usage`` at ``price`` (``batch``: through a batch API)."""
    share = price.batch if batch else 1.0
    dollars = price.cost(
        usage.input_tokens,
        usage.output_tokens,
        cached=usage.cached_input_tokens,
        written=usage.cache_write_input_tokens,
        written_1h=usage.cache_write_1h_input_tokens,
    )
    uncached = price.cost(usage.input_tokens, usage.output_tokens)
    return Cost(dollars * share, (uncached - dollars) * share, not price.knows(usage))


def load_prices(source: str | Path | None = None) -> dict[str, Price]:
    """Read a prices file (the format of fanflow's own ``prices.toml``).

    Args:
        source: a TOML file; None reads the table that ships with fanflow.

    Raises:
        ConfigError: the file cannot be read, or a price is not two numbers >= 0.
    """
    where = str(source) if source is not None else "fanflow/prices.toml"
    try:
        if source is None:
            text = resources.files("fanflow").joinpath("prices.toml").read_text("utf-8")
        else:
            text = Path(source).read_text("utf-8")
        data = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"prices file {where} cannot be read: {exc}") from None
    table = data.get("models")
    if not isinstance(table, dict):
        raise ConfigError(
            f'{where}: no [models] table; write [models] then "model" = {{ input = 1.25, '
            "output = 10.0 }} (dollars per million tokens)"
        )
    out: dict[str, Price] = {}
    for model, entry in table.items():
        try:
            out[model] = Price(
                float(entry["input"]),
                float(entry["output"]),
                cached_input=_optional(entry, "cached_input"),
                cache_write=_optional(entry, "cache_write"),
                cache_write_1h=_optional(entry, "cache_write_1h"),
            )
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{where}: the price of {model!r} must be {{ input = <number>, output = "
                "<number> }, optionally with cached_input =, cache_write = and cache_write_1h = "
                "<number> "
                f"(dollars per million tokens), got {entry!r}"
            ) from None
    return out


def _optional(entry: Mapping[str, object], name: str) -> float | None:
    value = entry.get(name)
    return None if value is None else float(value)  # type: ignore[arg-type]


#: The built-in table, read from ``prices.toml`` (in the package) at import.
PRICES: Mapping[str, Price] = MappingProxyType(load_prices())

# A dated snapshot or alias of a base name: -2024-08-06, -20241022, -0125, -latest.
_SNAPSHOT = re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)$")


def price_of(model: str | None, prices: Mapping[str, Price] | None = None) -> Price | None:
    """The price of ``model``: the user's ``prices`` first, then the built-in table.

    Returns None when the model is unknown (its cost is unknown, never guessed).
    """
    if model is None:
        return None
    for table in (prices, PRICES):
        if not table:
            continue
        price = table.get(model)
        if price is not None:
            return price
        match = _SNAPSHOT.match(model)
        if match is not None:
            price = table.get(match["base"])
            if price is not None:
                return price
    return None


def cost_of(
    model: str | None, usage: Usage, prices: Mapping[str, Price] | None = None
) -> float | None:
    """Dollars for ``usage`` on ``model``, or None when the model's price is unknown."""
    price = price_of(model, prices)
    if price is None:
        return None
    return priced(usage, price).dollars
