"""Live progress and the end-of-run summary, driven only by the engine's events; the
same display for the command line and for ``progress=True`` in the library.

A :class:`Tracker` is a hook: it folds each event (``CallStarted``, ``AttemptStarted``,
``AttemptFailed``, ``CallEnded``) into counters and hands out frozen
:class:`ProgressStats` snapshots. The displays only read snapshots: a rich ``Live`` panel
on a terminal, a log line every few seconds elsewhere (CI, pipes), nothing with
``--quiet``. Time comes from an injected clock (the event loop's), so the rendering is
tested with a fake clock and a fixed-width console, as rich's own ``tests/test_progress.py``
does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sized
from dataclasses import dataclass, field
from typing import IO, Any, ParamSpec, TypeVar

from ._batchinfo import batch_info
from ._events import AMBIENT_HOOKS, AttemptFailed, AttemptStarted, CallEnded, CallStarted, Event
from ._exceptions import RateLimited
from ._types import CallRecord, Status, add_work, speedup_of

__all__ = [
    "PLAIN_INTERVAL",
    "CacheCounts",
    "LiveDisplay",
    "PlainDisplay",
    "ProgressStats",
    "Tracker",
    "cache_rows",
    "cost_cell",
    "displaying",
    "format_duration",
    "plain_line",
    "render_live",
    "render_summary",
    "show_progress",
    "shown",
    "size_of",
    "with_progress",
]

_QUEUED, _SENDING, _BACKOFF = 0, 1, 2


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheCounts:
    """What the prompt cache did for a call or a run (tokens read from it, written to
    it, written to it for an hour; the dollars it saved) and whether the cost is an
    estimate. The shared fields of the progress snapshot and of the report's rows and
    summary; keyword-only, so each of those keeps its own fields' positions."""

    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    cache_write_1h_input_tokens: int = 0
    cache_saved: float | None = None
    cost_estimated: bool = False


@dataclass(frozen=True, slots=True)
class ProgressStats(CacheCounts):
    """A snapshot of a run, as the displays see it."""

    total: int | None
    elapsed: float
    started: int = 0
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    queued: int = 0
    in_flight: int = 0
    retrying: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    busy_time: float | None = 0.0
    failures: Mapping[str, int] = field(default_factory=dict)
    bad_lines: int = 0
    batched: int = 0
    saved: float | None = None
    answered_by: Mapping[str, int] = field(default_factory=dict)
    cascade_saved: float | None = None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds until every item is done at the rate so far (None: unknown)."""
        if self.total is None or self.done == 0 or self.elapsed <= 0:
            return None
        return max(self.total - self.done, 0) * self.elapsed / self.done

    @property
    def speedup(self) -> float | None:
        """The model's time on the calls over the elapsed time: against the same calls
        one after another (None: unknown, decision 0170)."""
        return speedup_of(self.busy_time, self.elapsed)


def _is_429(error: BaseException) -> bool:
    return isinstance(error, RateLimited) or getattr(error, "status_code", None) == 429


class Tracker:
    """A hook that counts what the engine reports.

    Args:
        total: the number of items, when known (for the ETA).
        clock: the time source (the event loop's ``time``); read for ``elapsed``.
    """

    def __init__(self, total: int | None, *, clock: Callable[[], float]) -> None:
        self.total = total
        self._clock = clock
        self._start = clock()
        self._end: float | None = None
        self._state: dict[int, int] = {}
        self._counts = Counter[str]()
        self._failures = Counter[str]()
        self._cost: float | None = None
        self._saved: float | None = None
        self._cache_saved: float | None = None
        self._estimated = False
        self._answered_by = Counter[str]()  # items per deployment of a router or cascade
        self._cascade_saved: float | None = None
        self._busy: float | None = 0.0
        self.bad_lines = 0

    def __repr__(self) -> str:
        return f"fanflow.Tracker(done={self._counts['done']}, total={self.total})"

    def __call__(self, event: Event) -> None:
        counts = self._counts
        if isinstance(event, CallStarted):
            counts["started"] += 1
            self._state[id(event.request)] = _QUEUED
        elif isinstance(event, AttemptStarted):
            counts["requests"] += 1
            self._state[id(event.request)] = _SENDING
        elif isinstance(event, AttemptFailed):
            if event.wait is not None:
                counts["retries"] += 1
                self._state[id(event.request)] = _BACKOFF
            else:
                self._state[id(event.request)] = _QUEUED  # about to end
            if _is_429(event.error):
                counts["rate_limited"] += 1
        elif isinstance(event, CallEnded):
            record = event.record
            if record.request is not None:
                self._state.pop(id(record.request), None)
            counts["done"] += 1
            if record.status is Status.SUCCEEDED:
                counts["succeeded"] += 1
            else:
                if record.status is Status.CANCELLED or record.error is None:
                    reason = str(record.status)
                else:
                    reason = type(record.error).__name__
                self._failures[reason] += 1
            self._tokens(record)
            if record.cost is not None and not record.cached:  # a store hit costs nothing
                self._cost = (self._cost or 0.0) + record.cost
                self._cache(record)
            response = record.response
            batch = batch_info(response.extra) if response is not None else None
            if batch is not None and not record.cached:
                counts["batched"] += 1
                if batch.saved is not None:
                    self._saved = (self._saved or 0.0) + batch.saved
            self._busy = add_work(self._busy, record.busy_time)  # queueing is not work
            self._routed(record)

    def _routed(self, record: CallRecord[Any]) -> None:
        """Count what a router's deployment or a cascade's tier answered."""
        deployment = record.deployment
        if deployment is not None and record.status is Status.SUCCEEDED:
            self._answered_by[deployment.name] += 1
        if record.cascade_saved is not None:
            self._cascade_saved = (self._cascade_saved or 0.0) + record.cascade_saved

    def _tokens(self, record: CallRecord[Any]) -> None:
        """Count the call's tokens, the prompt cache's among them, as ``Summary.usage``
        does (a store hit's too: its stored counts)."""
        usage, counts = record.usage, self._counts
        counts["input_tokens"] += usage.input_tokens
        counts["output_tokens"] += usage.output_tokens
        counts["cached_input_tokens"] += usage.cached_input_tokens
        counts["cache_write_input_tokens"] += usage.cache_write_input_tokens
        counts["cache_write_1h_input_tokens"] += usage.cache_write_1h_input_tokens

    def _cache(self, record: CallRecord[Any]) -> None:
        """Count what the provider's prompt cache saved on this call (made this run)."""
        if record.cache_saved is not None:
            self._cache_saved = (self._cache_saved or 0.0) + record.cache_saved
        self._estimated = self._estimated or record.cost_estimated

    def stop(self) -> None:
        """Freeze the elapsed time (the makespan) at now."""
        if self._end is None:
            self._end = self._clock()

    def snapshot(self) -> ProgressStats:
        """The counts now."""
        c = self._counts
        states = Counter(self._state.values())
        end = self._end if self._end is not None else self._clock()
        return ProgressStats(
            total=self.total,
            elapsed=end - self._start,
            started=c["started"],
            done=c["done"],
            succeeded=c["succeeded"],
            failed=c["done"] - c["succeeded"],
            queued=states[_QUEUED],
            in_flight=states[_SENDING],
            retrying=states[_BACKOFF],
            requests=c["requests"],
            retries=c["retries"],
            rate_limited=c["rate_limited"],
            input_tokens=c["input_tokens"],
            output_tokens=c["output_tokens"],
            cost=self._cost,
            busy_time=self._busy,
            failures=dict(self._failures.most_common()),
            bad_lines=self.bad_lines,
            batched=c["batched"],
            saved=self._saved,
            cached_input_tokens=c["cached_input_tokens"],
            cache_write_input_tokens=c["cache_write_input_tokens"],
            cache_write_1h_input_tokens=c["cache_write_1h_input_tokens"],
            cache_saved=self._cache_saved,
            cost_estimated=self._estimated,
            answered_by=dict(self._answered_by),
            cascade_saved=self._cascade_saved,
        )


# -- formatting -----------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``42.0s``, ``3m05s``, ``2h01m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _cost(cost: float | None) -> str:
    if cost is None:
        return "n/a"
    return f"${cost:,.4f}" if cost >= 0.01 or cost == 0 else f"${cost:.6f}"


def cost_cell(cost: float | None, estimated: bool) -> str:
    """A summary table's cost: ``n/a`` when unknown, marked when a cache price was
    unknown (its tokens charged as plain input, so the cost is an upper bound)."""
    return _cost(cost) + (" (estimated: a cache price is unknown)" if estimated else "")


def _signed_cost(cost: float) -> str:
    return "-" + _cost(-cost) if cost < 0 else _cost(cost)


def cache_rows(
    read: int, written: int, written_1h: int, saved: float | None, *, estimated: bool = False
) -> list[tuple[str, str]]:
    """The prompt cache's rows of a summary table (the end-of-run summary and ``fanflow
    report``): tokens read, tokens written (for 5 minutes and for an hour), and what the
    cache saved against the same tokens uncached, as ``Summary.cache_saved`` counts it
    (negative: the writes cost more than the reads saved; ``estimated``: a cache price
    was unknown, its tokens counted as plain input). None when no call used it."""
    if not read and not written and saved is None:
        return []
    hour, five = written_1h, written - written_1h
    if hour and five:
        ttl = f" ({five:,} for 5 minutes, {hour:,} for 1 hour)"
    else:
        ttl = ", for 1 hour" if hour else ", for 5 minutes" if five else ""
    if saved is None:
        net = "n/a (no price, or no call made this run)"
    else:
        net = _signed_cost(saved) + (" (writes cost more than reads saved)" if saved < 0 else "")
        net += " (estimated: a cache price is unknown)" if estimated else ""
    return [
        ("cache reads", f"{read:,} input tokens"),
        ("cache writes", f"{written:,} input tokens{ttl}"),
        ("cache saved", net),
    ]


def _done(s: ProgressStats) -> str:
    return f"{s.done}/{s.total}" if s.total is not None else f"{s.done}"


def plain_line(s: ProgressStats) -> str:
    """One log line for non-terminal output."""
    return (
        f"fanflow: {_done(s)} done, {s.failed} failed, {s.retrying} retrying, "
        f"{s.in_flight} in flight | {s.requests_per_second:.1f} req/s, "
        f"{s.tokens_per_second:,.0f} tok/s, cost {_cost(s.cost)} | "
        f"elapsed {format_duration(s.elapsed)}, ETA {format_duration(s.eta)}"
    )


def render_live(s: ProgressStats) -> Any:
    """The rich renderable of the live panel."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column()
    pct = f"{100 * s.done / s.total:.0f}%" if s.total else ""
    grid.add_row(
        ProgressBar(total=s.total or None, completed=s.done, width=30),
        Text(f"{_done(s)} {pct}  ETA {format_duration(s.eta)}"),
    )
    line = Text()
    line.append(f"done {s.succeeded}", style="green")
    line.append("  ")
    line.append(f"failed {s.failed}", style="red" if s.failed else "")
    line.append("  ")
    line.append(f"retrying {s.retrying}", style="yellow" if s.retrying else "")
    line.append(f"  in flight {s.in_flight}  queued {s.queued}")
    rates = Text(
        f"{s.requests_per_second:.1f} req/s  {s.tokens_per_second:,.0f} tok/s  "
        f"cost {_cost(s.cost)}  elapsed {format_duration(s.elapsed)}"
    )
    outer = Table.grid()
    outer.add_row(grid)
    outer.add_row(line)
    outer.add_row(rates)
    return outer


def render_summary(s: ProgressStats, *, title: str = "fanflow summary", unit: str = "items") -> Any:
    """The end-of-run table: items, outcomes, retries, 429s, tokens, cost, speed-up."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    of = f" of {s.total}" if s.total not in (None, s.done) else ""
    table.add_row(unit, f"{s.done}{of}")
    table.add_row("succeeded", f"{s.succeeded}")
    table.add_row("failed", f"{s.failed}")
    for reason, n in s.failures.items():
        table.add_row(f"  {reason}", f"{n}")
    if s.bad_lines:
        table.add_row("input lines skipped", f"{s.bad_lines}")
    table.add_row("requests", f"{s.requests}")
    table.add_row("retries", f"{s.retries}")
    table.add_row("429s", f"{s.rate_limited}")
    table.add_row("tokens", f"{s.tokens:,} ({s.input_tokens:,} in, {s.output_tokens:,} out)")
    table.add_row("cost", cost_cell(s.cost, s.cost_estimated))
    cache = cache_rows(
        s.cached_input_tokens, s.cache_write_input_tokens, s.cache_write_1h_input_tokens,
        s.cache_saved, estimated=s.cost_estimated,
    )  # fmt: skip
    for name, value in cache:
        table.add_row(name, value)
    if s.batched:
        table.add_row("batched", f"{s.batched} ({s.done - s.batched} other)")
        if s.saved is not None:
            table.add_row("saved vs real time", _cost(s.saved))
    for name, n in sorted(s.answered_by.items()):
        table.add_row(f"answered by {name}", f"{n}")
    if s.cascade_saved is not None:
        table.add_row("saved vs the last tier", _cost(s.cascade_saved))
    table.add_row("makespan", format_duration(s.elapsed))
    speedup = s.speedup if s.requests else None  # nothing was sent: no speed-up to show
    table.add_row("speed-up", "n/a" if speedup is None else f"{speedup:.1f}x")
    return table


# -- displays ----------------------------------------------------------------------------


class LiveDisplay:
    """A rich ``Live`` panel, refreshed by :func:`drive` from the event loop."""

    interval = 0.1

    def __init__(self, console: Any, tracker: Tracker, *, redirect_stdout: bool = False) -> None:
        from rich.live import Live

        self.tracker = tracker
        # Results go to stdout: only route them above the panel when stdout is this same
        # terminal; a redirected stdout (``> out.jsonl``) must get the bare rows.
        self._live = Live(
            console=console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=redirect_stdout,
            redirect_stderr=False,
        )

    def start(self) -> None:
        self._live.start()
        self.refresh()

    def refresh(self) -> None:
        self._live.update(render_live(self.tracker.snapshot()), refresh=True)

    def stop(self) -> None:
        self.refresh()
        self._live.stop()


class PlainDisplay:
    """A log line every ``interval`` seconds (for CI logs and pipes); with ``final``, one
    more when the run ends (the library's ``progress=True`` has no summary of its own)."""

    def __init__(
        self, stream: IO[str], tracker: Tracker, *, interval: float = 10.0, final: bool = False
    ) -> None:
        self.tracker = tracker
        self.stream = stream
        self.interval = interval
        self.final = final

    def start(self) -> None:
        pass

    def refresh(self) -> None:
        self.stream.write(plain_line(self.tracker.snapshot()) + "\n")
        self.stream.flush()

    def stop(self) -> None:
        if self.final:
            self.refresh()


class QuietDisplay:
    """Nothing at all (``--quiet``)."""

    interval = 3600.0

    def start(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def stop(self) -> None:
        pass


async def drive(display: LiveDisplay | PlainDisplay | QuietDisplay) -> None:
    """Refresh ``display`` periodically until cancelled."""
    display.start()
    try:
        while True:
            await asyncio.sleep(display.interval)
            display.refresh()
    finally:
        display.stop()


# -- progress=True in the library ----------------------------------------------------------

#: Seconds between plain progress lines of ``progress=True`` (when rich or a terminal is
#: missing).
PLAIN_INTERVAL = 10.0


def _library_display(tracker: Tracker, stream: IO[str] | None) -> LiveDisplay | PlainDisplay:
    """rich's live panel on a terminal or in Jupyter when rich is installed; plain lines
    on ``stream`` (standard error) otherwise."""
    out = stream if stream is not None else sys.stderr
    try:
        from rich.console import Console
    except ImportError:
        return PlainDisplay(out, tracker, interval=PLAIN_INTERVAL, final=True)
    console = Console(file=out, highlight=False)
    if console.is_jupyter or (console.is_terminal and os.environ.get("TERM") != "dumb"):
        return LiveDisplay(console, tracker)
    return PlainDisplay(out, tracker, interval=PLAIN_INTERVAL, final=True)


@contextlib.asynccontextmanager
async def show_progress(
    *, total: int | None = None, stream: IO[str] | None = None
) -> AsyncIterator[Tracker | None]:
    """Show the progress of every call made inside the block, as the CLI does.

    The engine adds the tracker to the hooks of every pattern started in the block (it
    reads :data:`fanflow._events.AMBIENT_HOOKS`), so nothing needs to be passed down. A
    block inside another shows nothing more (the outer display counts its calls).

    Args:
        total: the number of calls expected, when known (for the bar and the ETA).
        stream: where to draw (default: standard error).
    """
    if AMBIENT_HOOKS.get():
        yield None
        return
    async with displaying(total=total, stream=stream) as tracker:
        token = AMBIENT_HOOKS.set((tracker,))
        try:
            yield tracker
        finally:
            AMBIENT_HOOKS.reset(token)


@contextlib.asynccontextmanager
async def displaying(
    *, total: int | None = None, stream: IO[str] | None = None
) -> AsyncIterator[Tracker]:
    """Draw a tracker's progress for the block's lifetime; the caller decides which
    calls report to it (:func:`show_progress`: every call made inside the block)."""
    tracker = Tracker(total, clock=asyncio.get_running_loop().time)
    display = _library_display(tracker, stream)
    driver = asyncio.ensure_future(drive(display))
    # Let it start: a block that never yields (one call to a model that answers at
    # once) would cancel it before it ran, and the final line would never be drawn.
    await asyncio.sleep(0)
    try:
        yield tracker
    finally:
        tracker.stop()
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)


P = ParamSpec("P")
R = TypeVar("R")

# Arguments that say how many calls a pattern will make, for the bar and the ETA.
_SIZES = ("items", "calls", "inputs")


async def shown(awaitable: Awaitable[R], *, progress: bool, total: int | None = None) -> R:
    """Await ``awaitable``, inside :func:`show_progress` when ``progress`` is true (for
    the methods and objects that take ``progress=`` but are not wrapped patterns)."""
    if not progress:
        return await awaitable
    async with show_progress(total=total):
        return await awaitable


def size_of(items: object) -> int | None:
    """How many calls ``items`` will make, when it says (a list does; an iterator not)."""
    if isinstance(items, Sized) and not isinstance(items, str | Mapping):
        return len(items)
    return None


def with_progress(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Give a pattern ``progress=True``: its calls are shown live while it runs.

    The pattern declares ``progress: bool = False`` (for its signature and docs); this
    wrapper takes it and runs the pattern inside :func:`show_progress`.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not kwargs.pop("progress", False):
            return await fn(*args, **kwargs)
        total = None
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # a wrong call: let the pattern raise its own error
            bound = {}
        for name in _SIZES:
            if (size := size_of(bound.get(name))) is not None:
                total = size
        async with show_progress(total=total):
            return await fn(*args, **kwargs)

    return wrapper
