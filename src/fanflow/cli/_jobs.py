"""``fanflow jobs``: the jobs in a store, their progress and their failures (read-only)."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError
from .._types import Status
from . import _base
from ._console import make_console, require_rich
from ._settings import resolve_settings

if TYPE_CHECKING:
    from ..store import JobStore

__all__ = ["add_parser", "cmd_jobs", "list_jobs", "show_job"]


def _store(path: str | None) -> JobStore:
    from ..store import DEFAULT_PATH, Store

    where = Path(path) if path else DEFAULT_PATH
    if not where.is_file():
        raise ConfigError(
            f"no store at {where}; run fanflow map --job NAME first, or pass --store PATH"
        )
    return Store(where)


def _when(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def list_jobs(console: Any, path: str | None) -> int:
    """Print every job of the store, most recent first."""
    from rich import box
    from rich.table import Table

    store = _store(path)
    try:
        jobs = store.jobs()
    finally:
        store.close()
    if not jobs:
        console.print(f"no jobs in {store.location}")
        return 0
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("job", "total", "succeeded", "failed", "pending", "runs", "last run"):
        table.add_column(name, justify="left" if name in ("job", "last run") else "right")
    for j in jobs:
        table.add_row(
            j.name,
            "?" if j.total is None else str(j.total),
            str(j.succeeded),
            str(j.failed),
            "?" if j.pending is None else str(j.pending),
            str(j.runs),
            _when(j.updated),
        )
    console.print(table)
    return 0


def show_job(console: Any, path: str | None, name: str, *, limit: int) -> int:
    """Print one job's progress and its failures."""
    from rich import box
    from rich.table import Table

    store = _store(path)
    try:
        job = store.job(name)
        if job is None:
            known = ", ".join(j.name for j in store.jobs()[:10]) or "none"
            raise ConfigError(f"no job {name!r} in {store.location} (jobs: {known})")
        failures = store.items(name, status=[s for s in Status if s is not Status.SUCCEEDED])
    finally:
        store.close()
    total = "?" if job.total is None else str(job.total)
    console.print(
        f"job {job.name}: {job.succeeded} of {total} succeeded, {job.failed} failed, "
        f"{'?' if job.pending is None else job.pending} pending; {job.runs} runs, "
        f"last {_when(job.updated)}"
    )
    for status, n in sorted(job.counts.items(), key=lambda kv: kv[0].value):
        console.print(f"  {status.value}: {n}")
    if failures:
        table = Table(
            title=f"failures ({len(failures)})", box=box.SIMPLE_HEAD, title_justify="left"
        )
        for column in ("item", "status", "error", "message"):
            table.add_column(column, overflow="fold")
        for item in failures[:limit]:
            table.add_row(
                str(item.index), item.status.value, item.error_type or "", (item.error or "")[:200]
            )
        console.print(table)
        if len(failures) > limit:
            console.print(f"... and {len(failures) - limit} more (--limit N shows more)")
    return 0


# -- the command: its arguments and its handler ------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("jobs", help="jobs in the store, their progress and failures")
    p.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    p.add_argument("name", nargs="?", metavar="NAME", help="the job to show")
    p.add_argument("--store", metavar="PATH", help="the store (default .fanflow/store.db)")
    p.add_argument("--limit", type=int, default=50, help="failures listed by show (50)")
    _base.common_options(p)
    p.set_defaults(handler=cmd_jobs)


def cmd_jobs(args: argparse.Namespace, env: Mapping[str, str]) -> int:

    require_rich()
    settings = resolve_settings({"store": args.store}, env=env, config=args.config)
    console = make_console(sys.stdout)
    if args.action == "show":
        if not args.name:
            raise ConfigError("fanflow jobs show needs a job NAME; fanflow jobs lists them")
        return show_job(console, settings.store, args.name, limit=args.limit)
    return list_jobs(console, settings.store)
