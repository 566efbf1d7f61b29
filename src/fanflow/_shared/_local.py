"""A process's own pacing while its shared store is unreachable: a local share.

When Redis dies mid-run, the processes that shared its limits cannot see each other's
bookings. Each goes on at its share: each limit divided by the most processes it has
seen declared under the identity, booked by the stores' own rule
(:func:`~fanflow._shared._sqlite.earliest`) on this process's clock. Decision 0214.
"""

from __future__ import annotations

import math

from ._sqlite import earliest

__all__ = ["ALONE_AFTER", "RETRY", "LocalShare"]

# While local, the store is tried again at most this often (seconds).
RETRY = 1.0

# A process left no slot of a concurrency smaller than the processes (decision 0309)
# takes one after the store has been lost this long (seconds): the wait is bounded.
ALONE_AFTER = 60.0


class LocalShare:
    """This process's share of one identity's limits, from ``now`` (a monotonic time).

    Args:
        caps: the identity's caps per rate (inf: none), margin taken.
        share: the processes among which the limits are divided.
        window: the stores' booking window (period + lease).
        concurrency: the identity's concurrency limit (None: none).
        now: when the store was lost.
        ttl: the lease time of the store's concurrency slots.
        rank: how many live processes declared under the identity before this one
            (None: unknown, this process's declaration may have lapsed).
        at_most: at most this many slots (a rejoin's cap still in force).
    """

    __slots__ = (
        "_rows",
        "alone_at",
        "caps",
        "retry_at",
        "sent",
        "slots",
        "slots_from",
        "window",
    )

    def __init__(
        self,
        caps: list[float],
        share: int,
        window: float,
        concurrency: int | None,
        now: float,
        ttl: float,
        rank: int | None = None,
        at_most: int | None = None,
    ) -> None:
        self.caps = [c / share for c in caps]
        self.window = window
        # As if this share's window were full when the store was lost: the store's
        # bookings of the last window are still being sent, by every process.
        full = [0 if math.isinf(c) else math.ceil(c) for c in self.caps]
        self._rows: list[tuple[float, ...]] = [(now, *full)]
        self.sent: list[tuple[float, ...]] = []  # the sends booked here: (time, costs)
        # Slots this process may hold, those taken at the store before it was lost too:
        # 1/share of them; when they are fewer than the processes, one each for the
        # first ``concurrency`` by rank and none for the others (decision 0309).
        if not concurrency:
            self.slots = 0
        elif concurrency >= share:
            self.slots = concurrency // share
        else:
            self.slots = 1 if rank is not None and rank < concurrency else 0
        if at_most is not None:
            self.slots = min(self.slots, at_most)
        # A process left no slot takes one after ALONE_AFTER: never stuck for ever.
        self.alone_at = now + ALONE_AFTER if concurrency and not self.slots else math.inf
        # No new slot here for one TTL: another process may still hold more than its
        # share of the store's slots, until it notices the loss (its renewal, every
        # third of the TTL, fails) and sheds the excess as its calls end.
        self.slots_from = now + ttl
        self.retry_at = now + RETRY

    def slots_at(self, now: float) -> int:
        """The slots this process may hold at ``now``."""
        return 1 if now >= self.alone_at else self.slots

    def may_take(self, held: int, now: float) -> bool:
        """Whether a process holding ``held`` slots may take one more here."""
        return held < self.slots_at(now) and now >= self.slots_from

    def book(self, costs: list[list[int]], horizon: float, now: float) -> list[tuple[float, int]]:
        """(delay, grant id) per send, as a store answers: id -1 for one booked here,
        0 for one due more than ``horizon`` away."""
        cut = now - self.window
        self._rows = [row for row in self._rows if row[0] > cut]
        self.sent = [row for row in self.sent if row[0] > cut]
        answers: list[tuple[float, int]] = []
        for cost in costs:
            t = max(now, earliest(self._rows, cost, self.caps, self.window))
            if t - now > horizon:
                answers.append((t - now, 0))
                continue
            row = (t, *cost)
            self._rows.append(row)
            self.sent.append(row)
            answers.append((t - now, -1))
        return answers

    def recent(self, now: float) -> list[int]:
        """The summed costs of the sends booked here in the last window."""
        rows = [row for row in self.sent if row[0] > now - self.window]
        return [int(sum(row[k] for row in rows)) for k in range(1, 5)]
