"""A tour of the ``fanflow`` command line, offline: map, a YAML pipeline, and a run report.

Runs the real command (``python -m fanflow``) against the simulated model
(``--provider sim``: SimServer on loopback), in a temporary folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

PIPELINE = """\
input: reviews.jsonl
settings: {provider: sim, concurrency: 8}
steps:
  - name: summary
    prompt: "Summarize in one line: {text}"
  - name: sentiment
    prompt: "Positive or negative? {summary}"
    max_tokens: 8
"""


def fanflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "fanflow", *args], cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"fanflow {args[0]} failed ({done.returncode}):\n{done.stderr}")
    return done


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        here = Path(tmp)
        reviews = [{"text": f"review number {i}: the product was fine"} for i in range(40)]
        (here / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))

        # 1. One prompt over every item; rows to a file, call records for the report.
        done = fanflow(
            "map", "reviews.jsonl", "-p", "Label: {text}", "--provider", "sim",
            "--sim", "latency=0.05,jitter=0.05", "--concurrency", "16",
            "-o", "labels.jsonl", "--records", "calls.jsonl", cwd=here,
        )  # fmt: skip
        print(done.stderr)  # the summary table (progress is on stderr too)
        first = json.loads((here / "labels.jsonl").read_text().splitlines()[0])
        print("first row:", first)

        # 2. A two-step pipeline from YAML.
        (here / "pipeline.yaml").write_text(PIPELINE)
        fanflow("run", "pipeline.yaml", "-o", "pipeline.jsonl", "-q", cwd=here)
        row = json.loads((here / "pipeline.jsonl").read_text().splitlines()[0])
        print("pipeline row steps:", row["steps"])

        # 3. An HTML report of the map run, with the timeline as a PNG.
        fanflow("report", "calls.jsonl", "-o", "report.html", "--png", "timeline.png", cwd=here)
        size = (here / "report.html").stat().st_size
        print(
            f"report.html: {size:,} bytes; timeline.png: {(here / 'timeline.png').stat().st_size:,}"
        )


if __name__ == "__main__":
    main()
