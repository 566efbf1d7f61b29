"""``fanflow report``: a records file to one self-contained HTML page and a timeline PNG."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from fanflow.cli._report import TIMELINE_SIZE

Run = Callable[..., subprocess.CompletedProcess[str]]


class Page(HTMLParser):
    """Collects what a reader of the report sees: headings, images, table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.cells: list[str] = []
        self.external: list[str] = []
        self._tag: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            value = a.get(key)
            if value and not value.startswith("data:"):
                self.external.append(value)

    def handle_data(self, data: str) -> None:
        if self._tag in ("h1", "h2"):
            self.headings.append(data.strip())
        elif self._tag == "td":
            self.cells.append(data.strip())

    def handle_endtag(self, tag: str) -> None:
        self._tag = None


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_from_a_run(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"q": f"question {i}"}) + "\n" for i in range(40)) + '{"x": 1}\n'
    )
    done = run(
        "map", "in.jsonl", "-p", "{q}", "--provider", "sim", "--concurrency", "8",
        "--sim", "latency=0.02,429=0.2,seed=4", "--retries", "0",
        "--records", "calls.jsonl", "-o", "out.jsonl", "-q",
    )  # fmt: skip
    assert done.returncode == 1  # one template error
    records = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(records) == 41
    # A 429 while other calls were in flight is requeued without using up the one
    # attempt, so an item may have several.
    limited = sum(a["rate_limited"] for r in records for a in r["attempts"])
    assert limited >= 1

    done = run("report", "calls.jsonl", "-o", "report.html", "--png", "timeline.png")
    assert done.returncode == 0, done.stderr
    page = Page()
    page.feed((tmp_path / "report.html").read_text())
    assert page.headings[:2] == ["fanflow run report: calls.jsonl", "Summary"]
    for heading in ("Timeline", "In flight and throughput", "Latency", "Tokens and cost"):
        assert heading in page.headings
    assert page.external == []  # self-contained: every image is embedded
    assert len(page.images) == 4
    for img in page.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        w, h = png_size(base64.b64decode(src.split(",", 1)[1]))
        assert w > 300
        assert h > 200
    cells = page.cells
    assert cells[cells.index("items") + 1] == "41"
    assert cells[cells.index("429s") + 1] == str(limited)
    assert "TemplateError" in cells
    # The injected 429s came while other calls were in flight: requeued, none lost.
    assert cells[cells.index("succeeded") + 1] == "40"

    data = (tmp_path / "timeline.png").read_bytes()
    assert len(data) > 5000
    assert png_size(data) == TIMELINE_SIZE


def test_report_errors(run: Run, tmp_path: Path) -> None:
    done = run("report", "missing.jsonl")
    assert done.returncode == 2
    assert "missing.jsonl is neither a records file nor a job" in done.stderr
    (tmp_path / "bad.jsonl").write_text('{"status": "succeeded"}\nnot json\n')
    done = run("report", "bad.jsonl")
    assert done.returncode == 2
    assert "bad.jsonl:2: not a fanflow call record" in done.stderr
    (tmp_path / "empty.jsonl").write_text("\n")
    done = run("report", "empty.jsonl")
    assert done.returncode == 3  # nothing to draw: the documented "no items" code
    assert "holds no call records: the run made no calls" in done.stderr


def test_job_report_includes_a_records_run_names_the_job_and_lists_failed_items(
    run: Run, tmp_path: Path
) -> None:
    lines = [json.dumps({"id": f"doc-{i}", "q": f"question {i}"}) for i in range(12)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    done = run(
        "map", "in.jsonl", "-p", "{q}", "--provider", "sim", "--job", "j1", "--retries", "0",
        "--sim", "latency=0.001,500=0.3,seed=3", "--records", "calls.jsonl", "-q",
    )  # fmt: skip
    assert done.returncode == 1
    failed = [json.loads(x) for x in done.stdout.splitlines()]
    failed = [r for r in failed if r["status"] != "succeeded"]
    assert failed
    # The run given --records FILE is in the job's own report too.
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 12
    done = run("report", "j1", "-o", "r.html")
    assert done.returncode == 0, done.stderr
    page = Page()
    page.feed((tmp_path / "r.html").read_text())
    assert page.headings[0] == "fanflow run report: job j1"
    # The failures table says which item: its index, line, id and input.
    first = failed[0]
    at = page.cells.index(f"doc-{first['index']}")
    assert page.cells[at - 2 : at + 2] == [
        str(first["index"]),
        str(first["line"]),
        f"doc-{first['index']}",
        json.dumps(first["input"]),
    ]


def test_report_of_a_job_served_entirely_from_the_cache(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\nb\nc\n")
    common = ("map", "in.txt", "-p", "{input}", "--provider", "sim", "-q")
    assert run(*common, "--job", "first").returncode == 0
    assert run(*common, "--job", "again").returncode == 0  # the same calls: from the cache
    done = run("report", "again")
    assert done.returncode == 3
    assert "job 'again' made no calls" in done.stderr
    assert "served from the store's cache" in done.stderr
    assert "--records" not in done.stderr
    assert not (tmp_path / "report.html").exists()


def test_records_keep_requeues_and_notes_and_the_failures_table_shows_the_note(
    tmp_path: Path,
) -> None:
    from fanflow import CallRecord, Status
    from fanflow.cli._records import RecordsWriter, read_records
    from fanflow.cli._report import render_html
    from fanflow.errors import RateLimited
    from fanflow.results import Attempt

    note = "the server asked to wait 90 s (Retry-After); waited 60 s, the retry policy's max_wait"
    record: CallRecord[object] = CallRecord(
        Status.FAILED,
        error=RateLimited("429 Too Many Requests"),
        attempts=(
            Attempt(1, 0.0, 1.0, Status.FAILED, RateLimited("429"), requeued=True),
            Attempt(2, 2.0, 3.0, Status.FAILED, RateLimited("429"), note=note),
        ),
        start=0.0,
        end=3.0,
        index=0,
    )
    writer = RecordsWriter.open(tmp_path / "calls.jsonl")
    writer.write(record)
    writer.close()
    (row,) = read_records(str(tmp_path / "calls.jsonl"))
    assert [(a.requeued, a.note) for a in row.attempts] == [(True, None), (False, note)]
    page = Page()
    page.feed(render_html([row], title="t"))
    assert note in page.cells


def test_a_skipped_row_did_no_work() -> None:
    # Never sent: its wait for the breaker is not time spent answering (the report's
    # speed-up would count it otherwise).
    from fanflow.cli._records import AttemptRow, CallRow
    from fanflow.cli._report import summarize_rows

    sent = CallRow(
        0, None, "failed", 0.0, 0.2, 0, 0, None, "AuthenticationError", None,
        (AttemptRow(0.0, 0.2, "failed", "AuthenticationError", False, False, service=0.2),),
    )  # fmt: skip
    skipped = CallRow(1, None, "skipped", 0.0, 0.2, 0, 0, None, "CircuitOpen", None, ())
    assert skipped.busy_time == 0.0
    assert summarize_rows([sent, skipped]).speedup == pytest.approx(1.0)
