"""Prices of models, and the cost of a call.

A small built-in table covers well-known models (list prices in US dollars per million
tokens, standard tier, as published by OpenAI and Anthropic in 2025); users add or
override prices with ``prices={"model": fanflow.Price(input=..., output=...)}``.

Each price carries the batch APIs' rate (``Price.batch``, 0.5 for every model in the
table: OpenAI's Batch API and Anthropic's Message Batches both charge half).

A model is priced only when its name is in the table exactly, or is a dated snapshot of
a name in it (``gpt-4o-2024-08-06``, ``claude-3-5-haiku-20241022``, ``...-latest``).
Anything else (``gpt-4o-audio-preview``, a fine-tune, a local model) costs ``None``:
"unknown", never a guessed number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ._exceptions import ConfigError
from ._types import Usage

__all__ = ["PRICES", "Price", "cost_of", "price_of"]


@dataclass(frozen=True, slots=True)
class Price:
    """The price of a model in US dollars per million tokens.

    Args:
        input: dollars per million input (prompt) tokens.
        output: dollars per million output (completion) tokens.
        batch: the batch APIs' price as a share of the real-time one (0.5: half price,
            as OpenAI's Batch API and Anthropic's Message Batches charge).
    """

    input: float
    output: float
    batch: float = 0.5

    def __post_init__(self) -> None:
        if self.input < 0 or self.output < 0:
            raise ConfigError(
                f"prices must be >= 0 dollars per million tokens, got input={self.input}, "
                f"output={self.output}"
            )
        if not 0 <= self.batch <= 1:
            raise ConfigError(
                f"batch must be a share of the real-time price in [0, 1], got {self.batch}"
            )

    def __repr__(self) -> str:
        extra = f", batch={self.batch:g}" if self.batch != 0.5 else ""
        return f"fanflow.Price(input={self.input:g}, output={self.output:g}{extra})"

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        """Dollars for the given token counts."""
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000

    def batch_cost(self, input_tokens: float, output_tokens: float) -> float:
        """Dollars for the given token counts through a provider's batch API."""
        return self.cost(input_tokens, output_tokens) * self.batch


PRICES: Mapping[str, Price] = {
    # OpenAI
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o1": Price(15.00, 60.00),
    "o3": Price(2.00, 8.00),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    # Anthropic
    "claude-opus-4": Price(15.00, 75.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-3-7-sonnet": Price(3.00, 15.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-opus": Price(15.00, 75.00),
    "claude-3-haiku": Price(0.25, 1.25),
}

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
    return price.cost(usage.input_tokens, usage.output_tokens)
