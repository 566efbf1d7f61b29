"""``fanflow report``: one self-contained HTML page about a run, plots embedded.

The page holds a summary table, a timeline (one row per call, one bar per attempt,
coloured by status; retries hatched, 429s marked with a cross), calls in flight and
throughput over time, the latency distribution, tokens and cost over time, and a table of
failures. Plots are made with matplotlib (the ``report`` extra; docs/decisions/
0062-report-matplotlib.md) on its non-interactive Agg backend and embedded as base64 PNG,
so the file opens anywhere with no network.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from ._progress import format_duration
from ._records import CallRow, read_records

__all__ = ["TIMELINE_SIZE", "ReportSummary", "summarize_rows", "write_report"]

# Size of the timeline PNG in pixels (width, height): figsize x dpi.
TIMELINE_SIZE = (1200, 600)
_DPI = 100

STATUS_COLOURS = {
    "succeeded": "#2e9e44",
    "failed": "#d62728",
    "timed_out": "#ff7f0e",
    "cancelled": "#8c8c8c",
    "skipped": "#bcbd22",
}


@dataclass(frozen=True)
class ReportSummary:
    """Totals of a run, from its call rows."""

    items: int
    succeeded: int
    failures: dict[str, int]
    attempts: int
    retries: int
    rate_limited: int
    input_tokens: int
    output_tokens: int
    cost: float | None
    makespan: float
    busy_time: float

    @property
    def failed(self) -> int:
        return self.items - self.succeeded

    @property
    def speedup(self) -> float | None:
        return self.busy_time / self.makespan if self.makespan > 0 else None


def summarize_rows(rows: Sequence[CallRow]) -> ReportSummary:
    """Add up the rows of a run."""
    starts = [r.start for r in rows if r.start is not None]
    ends = [r.end for r in rows if r.end is not None]
    failures = Counter(r.error or r.status for r in rows if r.status != "succeeded")
    costs = [r.cost for r in rows if r.cost is not None]
    return ReportSummary(
        items=len(rows),
        succeeded=sum(r.status == "succeeded" for r in rows),
        failures=dict(failures.most_common()),
        attempts=sum(len(r.attempts) for r in rows),
        retries=sum(sum(1 for a in r.attempts[1:] if not a.hedge) for r in rows),
        rate_limited=sum(a.rate_limited for r in rows for a in r.attempts),
        input_tokens=sum(r.input_tokens for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        cost=sum(costs) if costs else None,
        makespan=(max(ends) - min(starts)) if starts and ends else 0.0,
        busy_time=sum(r.busy_time for r in rows),
    )


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "fanflow report needs matplotlib: pip install 'fanflow[report]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _timeline(plt: Any, rows: Sequence[CallRow], t0: float) -> Any:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(TIMELINE_SIZE[0] / _DPI, TIMELINE_SIZE[1] / _DPI))
    ordered = sorted((r for r in rows if r.start is not None), key=lambda r: r.start or 0.0)
    bars: dict[tuple[str, bool], list[tuple[float, float, int]]] = {}
    crosses_x: list[float] = []
    crosses_y: list[int] = []
    waits: list[tuple[float, float, int]] = []
    for y, row in enumerate(ordered):
        previous_end: float | None = None
        for a in row.attempts:
            retry = previous_end is not None and not a.hedge
            bars.setdefault((a.status, retry), []).append((a.start - t0, a.end - a.start, y))
            if a.rate_limited:
                crosses_x.append(a.end - t0)
                crosses_y.append(y)
            if previous_end is not None and a.start > previous_end:
                waits.append((previous_end - t0, a.start - t0, y))
            previous_end = a.end
        if not row.attempts and row.start is not None:  # never sent (e.g. a template error)
            crosses_x.append(row.start - t0)
            crosses_y.append(y)
    height = 0.8 if len(ordered) < 200 else 1.0
    ends = [r.end for r in ordered if r.end is not None]
    # An attempt that failed at once has no length: give every bar a visible minimum.
    min_width = max((max(ends) - t0) if ends else 0.0, 1e-6) / 300
    for (status, retry), spans in sorted(bars.items()):
        for start, width, y in spans:
            ax.broken_barh(
                [(start, max(width, min_width))],
                (y - height / 2, height),
                facecolors=STATUS_COLOURS.get(status, "#1f77b4"),
                edgecolor="black" if retry else "none",
                hatch="///" if retry else None,
                linewidth=0.3,
            )
    for start, end, y in waits:
        ax.plot([start, end], [y, y], color="#555555", linewidth=0.6, linestyle=":")
    if crosses_x:
        ax.scatter(crosses_x, crosses_y, marker="x", color="black", s=18, zorder=3)
    ax.set_xlabel("seconds since the first call")
    ax.set_ylabel("call (by start time)")
    ax.set_title(f"Timeline: {len(ordered)} calls")
    ax.set_ylim(-1, max(len(ordered), 1))
    ax.invert_yaxis()
    legend: list[Any] = [
        Patch(color=c, label=s) for s, c in STATUS_COLOURS.items() if any(k[0] == s for k in bars)
    ]
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="retry"))
    legend.append(
        Line2D([], [], color="black", marker="x", linestyle="none", label="429 / not sent")
    )
    ax.legend(handles=legend, loc="upper right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _steps(rows: Sequence[CallRow], t0: float, span: float) -> tuple[list[float], list[int]]:
    """Attempts in flight over time, as a step function."""
    changes: list[tuple[float, int]] = []
    for r in rows:
        for a in r.attempts:
            changes.append((a.start - t0, 1))
            changes.append((a.end - t0, -1))
    changes.sort()
    xs, ys, level = [0.0], [0], 0
    for x, d in changes:
        level += d
        xs.append(x)
        ys.append(level)
    xs.append(span)
    ys.append(level)
    return xs, ys


def _activity(plt: Any, rows: Sequence[CallRow], t0: float, span: float) -> Any:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    xs, ys = _steps(rows, t0, span)
    top.step(xs, ys, where="post", color="#1f77b4")
    top.set_ylabel("requests in flight")
    top.set_title("Concurrency and throughput")
    top.grid(alpha=0.3)
    bins = max(10, min(120, len(rows) // 5))
    width = span / bins if span > 0 else 1.0
    ends = [r.end - t0 for r in rows if r.end is not None and r.status == "succeeded"]
    failed = [r.end - t0 for r in rows if r.end is not None and r.status != "succeeded"]
    edges = [i * width for i in range(bins + 1)]
    bottom.hist(
        [ends, failed],
        bins=edges,
        stacked=True,
        color=["#2e9e44", "#d62728"],
        label=["succeeded", "not succeeded"],
        weights=[[1 / width] * len(ends), [1 / width] * len(failed)],
    )
    bottom.set_ylabel("calls finished per second")
    bottom.set_xlabel("seconds since the first call")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _latency(plt: Any, rows: Sequence[CallRow]) -> Any:
    fig, ax = plt.subplots(figsize=(6, 4))
    lat = sorted(r.latency for r in rows if r.latency is not None and r.status == "succeeded")
    if lat:
        ax.hist(lat, bins=min(40, max(len(lat) // 3, 5)), color="#1f77b4")
        for q, style in ((0.5, "--"), (0.95, ":")):
            v = lat[min(int(q * len(lat)), len(lat) - 1)]
            ax.axvline(v, color="black", linestyle=style, label=f"p{int(q * 100)} {v:.3f}s")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful calls", ha="center", va="center")
    ax.set_xlabel("call latency, seconds (retries and waits included)")
    ax.set_ylabel("calls")
    ax.set_title("Latency of successful calls")
    fig.tight_layout()
    return fig


def _tokens(plt: Any, rows: Sequence[CallRow], t0: float) -> Any:
    fig, ax = plt.subplots(figsize=(6, 4))
    done = sorted((r for r in rows if r.end is not None), key=lambda r: r.end or 0.0)
    xs = [(r.end or t0) - t0 for r in done]
    total_in = total_out = 0
    ins, outs = [], []
    for r in done:
        total_in += r.input_tokens
        total_out += r.output_tokens
        ins.append(total_in)
        outs.append(total_out)
    ax.plot(xs, ins, label="input tokens")
    ax.plot(xs, outs, label="output tokens")
    costs = [r.cost for r in done if r.cost is not None]
    if costs:
        twin = ax.twinx()
        running, cum = 0.0, []
        for r in done:
            running += r.cost or 0.0
            cum.append(running)
        twin.plot(xs, cum, color="#9467bd", linestyle="--", label="cost (USD)")
        twin.set_ylabel("cost so far, USD")
    ax.set_xlabel("seconds since the first call")
    ax.set_ylabel("tokens so far")
    ax.set_title("Tokens and cost")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _table(head: Iterable[str], body: Iterable[Iterable[Any]], cls: str) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body
    )
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{rows}</tbody></table>'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; font-size: 90%; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
.row img { max-width: 48%; }
"""

MAX_FAILURES_LISTED = 500


def render_html(rows: Sequence[CallRow], *, title: str, timeline_png: bytes | None = None) -> str:
    """The report page (plots made here unless the timeline is given)."""
    plt = _pyplot()
    s = summarize_rows(rows)
    starts = [r.start for r in rows if r.start is not None]
    t0 = min(starts) if starts else 0.0
    figs = []
    if timeline_png is None:
        fig = _timeline(plt, rows, t0)
        timeline_png = _png(fig)
        plt.close(fig)
    for fig in (
        _activity(plt, rows, t0, s.makespan),
        _latency(plt, rows),
        _tokens(plt, rows, t0),
    ):
        figs.append(_png(fig))
        plt.close(fig)
    summary = [
        ("items", s.items),
        ("succeeded", s.succeeded),
        ("failed", s.failed),
        *((f"  {k}", v) for k, v in s.failures.items()),
        ("attempts", s.attempts),
        ("retries", s.retries),
        ("429s", s.rate_limited),
        (
            "tokens",
            f"{s.input_tokens + s.output_tokens:,} ({s.input_tokens:,} in, "
            f"{s.output_tokens:,} out)",
        ),
        ("cost", "n/a" if s.cost is None else f"${s.cost:,.4f}"),
        ("makespan", format_duration(s.makespan)),
        ("speed-up", "n/a" if s.speedup is None else f"{s.speedup:.1f}x"),
    ]
    failed = [r for r in rows if r.status != "succeeded"]
    failures = _table(
        ("item", "status", "error", "attempts", "message"),
        (
            (
                r.index if r.index is not None else "",
                r.status,
                r.error or "",
                len(r.attempts),
                r.message or "",
            )
            for r in sorted(failed, key=lambda r: (r.index is None, r.index or 0))[
                :MAX_FAILURES_LISTED
            ]
        ),
        "failures",
    )
    more = (
        f"<p>{len(failed) - MAX_FAILURES_LISTED} more failures are not listed.</p>"
        if len(failed) > MAX_FAILURES_LISTED
        else ""
    )
    t = html.escape(title)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{t}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{t}</h1>\n"
        f"<h2>Summary</h2>{_table(('what', 'value'), summary, 'summary')}\n"
        f"<h2>Timeline</h2>{_img(timeline_png, 'timeline')}\n"
        f"<h2>In flight and throughput</h2>{_img(figs[0], 'in flight and throughput')}\n"
        f'<div class="row"><div><h2>Latency</h2>{_img(figs[1], "latency distribution")}</div>'
        f"<div><h2>Tokens and cost</h2>{_img(figs[2], 'tokens and cost')}</div></div>\n"
        f"<h2>Failures ({len(failed)})</h2>{failures if failed else '<p>None.</p>'}{more}\n"
        "</body></html>\n"
    )


def write_report(
    source: str, output: str, *, png: str | None = None, title: str | None = None
) -> Path:
    """Write the HTML report of the run recorded in ``source`` (and the timeline PNG).

    Raises:
        ConfigError: the source cannot be read, or holds no calls.
    """
    rows = list(read_records(source))
    if not rows:
        raise ConfigError(f"{source} holds no call records; run fanflow map --records {source}")
    plt = _pyplot()
    starts = [r.start for r in rows if r.start is not None]
    fig = _timeline(plt, rows, min(starts) if starts else 0.0)
    timeline = _png(fig)
    plt.close(fig)
    page = render_html(rows, title=title or f"fanflow run report: {source}", timeline_png=timeline)
    out = Path(output)
    try:
        out.write_text(page, encoding="utf-8")
        if png is not None:
            Path(png).write_bytes(timeline)
    except OSError as exc:
        raise ConfigError(f"cannot write the report: {exc}") from None
    return out
