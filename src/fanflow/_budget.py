"""Budgets: a cap on the money or tokens a pattern call (or a whole job) may spend.

Every attempt reserves its expected cost (estimated prompt tokens plus ``max_tokens``)
before it is sent, so calls running at once cannot overshoot the budget together. When
the reply comes, the reservation is settled against the reported usage and what was not
used goes back. An attempt that failed still counts: its estimated prompt is charged
(the server read it), and an attempt cut off by a timeout or a cancellation keeps its
whole reservation (the server may have produced the reply anyway).

The budget holds as long as estimates are upper bounds (replies never exceed
``max_tokens``); a prompt the estimate undercounts is charged in full, so the spend can
pass the cap by at most the undercount of the calls in flight.

When the budget cannot cover an attempt and no other reservation is pending (none can
give anything back), the attempt is refused with :class:`fanflow.BudgetExceeded` and
its item ends as ``skipped``. If reservations are pending, the attempt waits for them
to settle first: a budget that only looks spent because of generous reservations does
not skip work it could pay for.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from ._exceptions import BudgetExceeded, ConfigError
from ._pricing import Price, price_of

__all__ = ["UNPRICED_FIX", "Budget", "BudgetStatistics"]

# The fix an unpriced model's BudgetExceeded gives; the CLI swaps in its own flag.
UNPRICED_FIX = (
    "pass prices={...: fanflow.Price(input=, output=)} or a budget in tokens: "
    "fanflow.Budget(tokens=...)"
)


@dataclass(frozen=True, slots=True)
class BudgetStatistics:
    """A snapshot of a budget."""

    limit: float
    unit: str
    spent: float
    reserved: float
    skipped: int

    @property
    def remaining(self) -> float:
        return self.limit - self.spent - self.reserved


class Budget:
    """A spending cap shared by every call that is given it.

    Pass ``budget=0.50`` (dollars) or ``budget=fanflow.Budget(tokens=100_000)`` to a
    pattern; pass the same ``Budget`` object to several patterns to cap a whole job.

    Args:
        usd: the most dollars to spend (needs a known price for each model).
        tokens: the most tokens (input + output) to spend.
        prices: prices for models missing from the built-in table.
    """

    __slots__ = ("_prices", "_reserved", "_skipped", "_spent", "_waiters", "limit", "unit")

    def __init__(
        self,
        usd: float | None = None,
        *,
        tokens: int | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        if (usd is None) == (tokens is None):
            raise ConfigError(
                "give a budget in exactly one unit: Budget(usd=1.5) or Budget(tokens=100_000)"
            )
        limit = float(usd if usd is not None else tokens)  # type: ignore[arg-type]
        if limit < 0:
            raise ConfigError(f"a budget must be >= 0, got {limit:g}")
        self.limit = limit
        self.unit = "usd" if usd is not None else "tokens"
        self._prices = dict(prices) if prices else None
        self._spent = 0.0
        self._reserved = 0.0
        self._skipped = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return (
            f"fanflow.Budget({self.unit}={self.limit:g}, spent={self._spent:g}, "
            f"reserved={self._reserved:g})"
        )

    @property
    def spent(self) -> float:
        return self._spent

    @property
    def prices(self) -> Mapping[str, Price] | None:
        """The prices this budget knows beyond the built-in table."""
        return self._prices

    def with_prices(self, prices: Mapping[str, Price] | None) -> Budget:
        """Use ``prices`` for models the budget has no price for (a pattern's prices=)."""
        if prices:
            merged = dict(prices)
            merged.update(self._prices or {})
            self._prices = merged
        return self

    def amount(
        self,
        model: str | None,
        input_tokens: float,
        output_tokens: float,
        *,
        batch: bool = False,
        cached: float = 0,
        written: float = 0,
        written_1h: float = 0,
    ) -> float:
        """What ``input_tokens`` + ``output_tokens`` on ``model`` cost in this budget's unit
        (``batch``: at the batch price of the provider's batch API; ``cached`` and
        ``written``: input tokens read from and written to the prompt cache, ``written_1h``
        of them for an hour, at the cache's prices when known, else as plain input).

        Raises:
            BudgetExceeded: a money budget and a model with no known price.
        """
        if self.unit == "tokens":
            return input_tokens + output_tokens
        price = price_of(model, self._prices)
        if price is None:
            raise BudgetExceeded(
                f"the price of model {model!r} is unknown, so a budget in dollars cannot "
                f"cover it; {UNPRICED_FIX}"
            )
        dollars = price.cost(
            input_tokens, output_tokens, cached=cached, written=written, written_1h=written_1h
        )
        return dollars * price.batch if batch else dollars

    async def reserve(self, amount: float, who: str, output_tokens: int | None = None) -> float:
        """Reserve ``amount`` before an attempt; wait while pending reservations may
        still give something back.

        ``output_tokens`` is the reply length the estimate assumed (the call's
        ``max_tokens``); the message names it, as lowering it is often the fix.

        Raises:
            BudgetExceeded: the budget cannot cover it (the item is to be skipped).
        """
        while self._spent + self._reserved + amount > self.limit:
            if self._reserved <= 0 or self._spent + amount > self.limit:
                self._skipped += 1
                assumed = (
                    ""
                    if output_tokens is None
                    else f" (its prompt plus {output_tokens:,} output tokens, the max_tokens "
                    "assumed per call)"
                )
                fix = (
                    "raise budget="
                    if output_tokens is None
                    else "raise budget= or lower max_tokens="
                )
                raise BudgetExceeded(
                    f"{who} was skipped: it needs an estimated {self._fmt(amount)}{assumed} but "
                    f"the budget of {self._fmt(self.limit)} has {self._fmt(self._left())} left "
                    f"({self._fmt(self._spent)} spent); {fix} to run it"
                )
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
        self._reserved += amount
        return amount

    def settle(self, reserved: float, actual: float) -> None:
        """Replace a reservation by what was actually spent; wake waiters."""
        self._reserved -= reserved
        if self._reserved < 1e-12:
            self._reserved = max(self._reserved, 0.0)
        self._spent += actual
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def absorb(self, spent: float, skipped: int) -> None:
        """Count what calls elsewhere spent and skipped against a copy of this budget
        (the Ray backend's workers draw on one kept by its broker), so this budget's
        statistics show the whole batch."""
        self.settle(0.0, spent)
        self._skipped += skipped

    def _left(self) -> float:
        return max(self.limit - self._spent - self._reserved, 0.0)

    def _fmt(self, amount: float) -> str:
        if self.unit == "usd":
            return f"${amount:.6f}"
        return f"{amount:,.0f} tokens"

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            limit=self.limit,
            unit=self.unit,
            spent=self._spent,
            reserved=self._reserved,
            skipped=self._skipped,
        )


def as_budget(budget: float | Budget | None) -> Budget | None:
    """A pattern's ``budget=``: a number is dollars; a Budget is used as given."""
    if budget is None or isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ConfigError(f"budget= must be dollars (a number) or a fanflow.Budget, got {budget!r}")
    return Budget(usd=float(budget))
