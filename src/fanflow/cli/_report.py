"""``fanflow report``: one self-contained HTML page about a run, plots embedded.

The page holds a summary table, a timeline (one row per call, one bar per attempt,
coloured by status; retries hatched, 429s marked with a cross), calls in flight and
throughput over time, the latency distribution, tokens and cost over time, and a table of
failures. Plots are made with matplotlib (the ``report`` extra; docs/decisions/
0062-report-matplotlib.md) on its non-interactive Agg backend and embedded as base64 PNG,
so the file opens anywhere with no network.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from .._progress import CacheCounts, cache_rows, cost_cell, format_duration
from .._types import add_work, speedup_of
from . import _base
from ._records import CallRow, read_records
from ._settings import resolve_settings

__all__ = [
    "TIMELINE_SIZE",
    "ReportSummary",
    "add_parser",
    "cmd_report",
    "summarize_rows",
    "write_report",
]

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
class ReportSummary(CacheCounts):
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
    busy_time: float | None

    @property
    def failed(self) -> int:
        return self.items - self.succeeded

    @property
    def speedup(self) -> float | None:
        return speedup_of(self.busy_time, self.makespan)


def summarize_rows(rows: Sequence[CallRow]) -> ReportSummary:
    """Add up the rows of a run."""
    starts = [r.start for r in rows if r.start is not None]
    ends = [r.end for r in rows if r.end is not None]
    failures = Counter(r.error or r.status for r in rows if r.status != "succeeded")
    costs = [r.cost for r in rows if r.cost is not None]
    saved = [r.cache_saved for r in rows if r.cache_saved is not None]
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
        busy_time=_work(rows),
        cached_input_tokens=sum(r.cached_input_tokens for r in rows),
        cache_write_input_tokens=sum(r.cache_write_input_tokens for r in rows),
        cache_write_1h_input_tokens=sum(r.cache_write_1h_input_tokens for r in rows),
        cache_saved=sum(saved) if saved else None,
        cost_estimated=any(r.cost_estimated for r in rows),
    )


def _cache_rows(s: ReportSummary) -> list[tuple[str, Any]]:
    """The prompt cache's rows of the summary table, as the end-of-run summary shows
    them (none when no call used the cache)."""
    return cache_rows(
        s.cached_input_tokens, s.cache_write_input_tokens, s.cache_write_1h_input_tokens,
        s.cache_saved, estimated=s.cost_estimated,
    )  # fmt: skip


def _work(rows: Sequence[CallRow]) -> float | None:
    total: float | None = 0.0
    for r in rows:
        total = add_work(total, r.busy_time)
    return total


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


@dataclass(frozen=True)
class Chart:
    """A plot as PNG bytes, with its size and its smallest text in image pixels (so the
    page can be checked for text a reader cannot read once the image is scaled)."""

    png: bytes
    width: int
    height: int
    min_text_px: float


def _chart(fig: Any) -> Chart:
    from matplotlib.text import Text

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    sizes = [
        t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
    ]
    width, height = fig.get_size_inches() * _DPI
    # Points to image pixels: 72 points an inch.
    return Chart(buffer.getvalue(), round(width), round(height), min(sizes) * _DPI / 72)


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
    ax.legend(handles=legend, loc="upper right", fontsize=9)
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
    bottom.legend(fontsize=9)
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
        ax.legend(fontsize=9)
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
    # One legend for both axes, so the dashed cost line is named too.
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=9, loc="upper left")
    fig.tight_layout()
    return fig


def _img(chart: Chart, alt: str) -> str:
    encoded = base64.b64encode(chart.png).decode("ascii")
    return (
        f'<img class="chart" alt="{html.escape(alt)}" width="{chart.width}" '
        f'height="{chart.height}" data-min-text-px="{chart.min_text_px:.1f}" '
        f'src="data:image/png;base64,{encoded}">'
    )


def _table(
    head: Iterable[str],
    body: Iterable[Iterable[Any]],
    cls: str,
    *,
    classes: Mapping[int, str] | None = None,
) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    td = {i: f'<td class="{c}">' for i, c in (classes or {}).items()}
    rows = "".join(
        "<tr>"
        + "".join(f"{td.get(i, '<td>')}{html.escape(str(c))}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in body
    )
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{rows}</tbody></table>'


# Charts keep their natural size unless the page is narrower (then they scale down,
# keeping their aspect). The latency and tokens charts sit side by side in a grid whose
# columns are never much narrower than the charts' natural width (600 px): on a narrower
# window they stack at full width instead of shrinking (their text would be unreadable).
_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 16px; margin: 2em; color: #222; }
img.chart { max-width: 100%; height: auto; box-sizing: border-box; border: 1px solid #ddd;
            margin: .5em 0; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; font-size: 14px; }
td.input { max-width: 40em; overflow-wrap: anywhere; }
td.id { white-space: nowrap; }
.row { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(560px, 100%), 1fr));
       gap: 1em; }
.row > div { min-width: 0; }
"""

MAX_FAILURES_LISTED = 500


def render_html(rows: Sequence[CallRow], *, title: str, timeline: Chart | None = None) -> str:
    """The report page (plots made here unless the timeline is given)."""
    plt = _pyplot()
    s = summarize_rows(rows)
    starts = [r.start for r in rows if r.start is not None]
    t0 = min(starts) if starts else 0.0
    figs = []
    for fig in (
        *(() if timeline is not None else (_timeline(plt, rows, t0),)),
        _activity(plt, rows, t0, s.makespan),
        _latency(plt, rows),
        _tokens(plt, rows, t0),
    ):
        figs.append(_chart(fig))
        plt.close(fig)
    if timeline is None:
        timeline = figs.pop(0)
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
        ("cost", cost_cell(s.cost, s.cost_estimated)),
        *_cache_rows(s),
        ("makespan", format_duration(s.makespan)),
        ("speed-up", "n/a" if s.speedup is None else f"{s.speedup:.1f}x"),
    ]
    failed = [r for r in rows if r.status != "succeeded"]
    failures = _table(
        ("item", "line", "id", "input", "status", "error", "attempts", "message", "note"),
        (
            (
                r.index if r.index is not None else "",
                r.line if r.line is not None else "",
                r.id or "",
                r.input or "",
                r.status,
                r.error or "",
                len(r.attempts),
                r.message or "",
                r.note or "",
            )
            for r in sorted(failed, key=lambda r: (r.index is None, r.index or 0))[
                :MAX_FAILURES_LISTED
            ]
        ),
        "failures",
        classes={2: "id", 3: "input"},
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
        f"<h2>Timeline</h2>{_img(timeline, 'timeline')}\n"
        f"<h2>In flight and throughput</h2>{_img(figs[0], 'in flight and throughput')}\n"
        f'<div class="row"><div><h2>Latency</h2>{_img(figs[1], "latency distribution")}</div>'
        f"<div><h2>Tokens and cost</h2>{_img(figs[2], 'tokens and cost')}</div></div>\n"
        f"<h2>Failures ({len(failed)})</h2>{failures if failed else '<p>None.</p>'}{more}\n"
        "</body></html>\n"
    )


def write_report(
    source: str | Sequence[CallRow],
    output: str,
    *,
    png: str | None = None,
    title: str | None = None,
) -> Path:
    """Write the HTML report of a run (and the timeline PNG).

    Args:
        source: a records file written by ``--records``, or its rows.
        output: the HTML file to write.
        png: also write the timeline here.
        title: the page's title (default: names the records file).

    Raises:
        ConfigError: the source cannot be read, or holds no calls.
    """
    rows = list(read_records(source)) if isinstance(source, str) else list(source)
    if not rows:
        raise ConfigError(f"{source} holds no call records: the run made no calls")
    plt = _pyplot()
    starts = [r.start for r in rows if r.start is not None]
    fig = _timeline(plt, rows, min(starts) if starts else 0.0)
    timeline = _chart(fig)
    plt.close(fig)
    default = f"fanflow run report: {source}" if isinstance(source, str) else "fanflow run report"
    page = render_html(rows, title=title or default, timeline=timeline)
    out = Path(output)
    try:
        out.write_text(page, encoding="utf-8")
        if png is not None:
            Path(png).write_bytes(timeline.png)
    except OSError as exc:
        raise ConfigError(f"cannot write the report: {exc}") from None
    return out


# -- the command: its arguments and its handler ------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="an HTML run report (timeline, throughput, latency)")
    p.add_argument(
        "source", metavar="NAME", help="a job name (map --job) or a file from map --records"
    )
    p.add_argument("--store", metavar="PATH", help="the store (default .fanflow/store.db)")
    p.add_argument("-o", "--output", default="report.html", metavar="HTML", help="report.html")
    p.add_argument("--png", metavar="PATH", help="also write the timeline as a PNG")
    p.add_argument("--title", help="the report's title")
    _base.common_options(p)
    p.set_defaults(handler=cmd_report)


@dataclass(frozen=True)
class _Source:
    """What to report on: a records file, and the job it belongs to (if any)."""

    path: str
    job: str | None = None
    store: str | None = None


def _report_source(args: argparse.Namespace, env: Mapping[str, str]) -> _Source:
    """A records file as given, else the records of the job of that name."""
    from ._records import job_records_path, legacy_job_records_path

    if os.path.isfile(args.source):
        return _Source(str(args.source))
    settings = resolve_settings({"store": args.store}, env=env, config=args.config)
    store_path = settings.store or ".fanflow/store.db"
    path = job_records_path(store_path, args.source)
    if not path.is_file():  # a job recorded by an older fanflow
        path = legacy_job_records_path(store_path, args.source)
    if not path.is_file():
        raise ConfigError(
            f"{args.source} is neither a records file nor a job with records in "
            f"{store_path}; run fanflow map --job {args.source} first, or give the file "
            "written by --records"
        )
    return _Source(str(path), args.source, store_path)


def _no_calls(source: _Source) -> str:
    """Why a records file holds no calls, in words that are true of this source."""
    if source.job is None:
        return (
            f"{source.path} holds no call records: the run made no calls (every item was "
            "served from the cache, or it had no items); nothing to draw"
        )
    from ..store import Store

    store = Store(source.store)
    try:
        job = store.job(source.job)
    finally:
        store.close()
    done = "" if job is None else f"its {job.succeeded} finished items "
    return (
        f"job {source.job!r} made no calls: {done or 'its items '}were served from the "
        f"store's cache, so there is nothing to draw; fanflow jobs show {source.job} "
        "lists the job"
    )


def cmd_report(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    source = _report_source(args, env)
    title = args.title or (
        f"fanflow run report: job {source.job}"
        if source.job
        else f"fanflow run report: {source.path}"
    )
    rows = list(read_records(source.path))
    if not rows:
        print(f"fanflow report: {_no_calls(source)}", file=sys.stderr)
        return _base.EXIT_EMPTY
    path = write_report(rows, args.output, png=args.png, title=title)
    if not args.quiet:
        also = f" and {args.png}" if args.png else ""
        print(f"fanflow: report written to {path}{also}", file=sys.stderr)
    return _base.EXIT_OK
