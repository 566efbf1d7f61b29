"""A job's call records (``records/<job>.jsonl`` beside the store): one file per job name,
and a disk that fills up under the store (issue 13 items 9 and 10)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from fanflow.cli._records import RecordsWriter, job_records_path, legacy_job_records_path

Run = Callable[..., subprocess.CompletedProcess[str]]

SIM = ["--provider", "sim", "--sim", "latency=0"]


def test_distinct_job_names_get_distinct_records_files(run: Run, tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("a\n")
    (tmp_path / "two.txt").write_text("b\nc\n")
    (tmp_path / "three.txt").write_text("d\n")
    for name, source in (("x/y", "one.txt"), ("x_y", "two.txt"), ("../x", "three.txt")):
        done = run("map", source, "-p", "{input}", "--job", name, *SIM, "-q")
        assert done.returncode == 0, done.stderr
    store = tmp_path / ".fanflow" / "store.db"
    files = {n: job_records_path(store, n) for n in ("x/y", "x_y", "../x")}
    assert len(set(files.values())) == 3
    assert files["x_y"].name == "x_y.jsonl"  # plain names keep their file name
    for path in files.values():
        assert path.parent == store.parent / "records"  # no name escapes the folder
    lines = {n: p.read_text().splitlines() for n, p in files.items()}
    assert (len(lines["x/y"]), len(lines["x_y"]), len(lines["../x"])) == (1, 2, 1)
    for name in files:
        done = run("report", name, "-o", f"{len(name)}.html")
        assert done.returncode == 0, done.stderr


def test_records_of_a_job_from_an_older_fanflow_are_still_found(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\nb\n")
    done = run("map", "in.txt", "-p", "{input}", *SIM, "--records", "calls.jsonl", "-q")
    assert done.returncode == 0, done.stderr
    store = tmp_path / ".fanflow" / "store.db"
    old = legacy_job_records_path(store, "team/labels")  # records/team_labels.jsonl
    old.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "calls.jsonl", old)
    assert not job_records_path(store, "team/labels").exists()
    done = run("report", "team/labels", "-o", "r.html")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").stat().st_size > 1000


# --------------------------------------------------------------------------- disk full


class _FullDisk(io.StringIO):
    """A stream on a disk that has just filled up: every write and flush fails."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        if not self.closed:
            super().close()
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_reported_once_and_closing_never_raises() -> None:
    from fanflow import CallRecord, Status

    said: list[str] = []
    writer = RecordsWriter(_FullDisk(), paths=["records/j.jsonl"], warn=said.append)
    record: CallRecord[str] = CallRecord(status=Status.SUCCEEDED, value="x", index=0)
    writer.write(record)
    writer.write(record)
    writer.close()
    assert len(said) == 1
    assert said[0].startswith("call records could not be written to records/j.jsonl (No space")
    assert writer.failed is not None


def test_a_torn_last_line_is_cut_when_the_file_is_opened_to_append(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    whole = json.dumps({"index": 0, "status": "succeeded"}) + "\n"
    path.write_text(whole * 3 + '{"index": 3, "sta')
    writer = RecordsWriter.open(path, append=True)
    writer.close()
    assert writer.torn_bytes_removed == len('{"index": 3, "sta')
    assert path.read_text() == whole * 3
    RecordsWriter.open(path, append=True).close()  # nothing torn: nothing cut
    assert path.read_text() == whole * 3


def test_the_report_passes_over_a_torn_last_line(run: Run, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a\nb\n")
    done = run("map", "in.txt", "-p", "{input}", *SIM, "--records", "calls.jsonl", "-q")
    assert done.returncode == 0, done.stderr
    with (tmp_path / "calls.jsonl").open("a") as f:
        f.write('{"index": 2, "label": null, "sta')  # what a crash mid-write leaves
    done = run("report", "calls.jsonl", "-o", "r.html")
    assert done.returncode == 0, done.stderr
    (tmp_path / "calls.jsonl").write_text('{"status": "succeeded"}\nnot json\n{"status": "x"}\n')
    done = run("report", "calls.jsonl", "-o", "r.html")
    assert done.returncode == 2  # a bad line in the middle is still an error
    assert "calls.jsonl:2: not a fanflow call record" in done.stderr


@contextlib.contextmanager
def _small_disk(folder: Path) -> Iterator[tuple[str, Callable[[], None] | None]]:
    """A 256 KiB tmpfs at ``folder`` where mounting is allowed (root), else nothing.

    Yields how the disk was made small ("tmpfs" or "fsize") and, for tmpfs, a function
    that makes it large again (the user freeing space).
    """
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        yield "fsize", None
        return

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)

    try:
        yield "tmpfs", grow
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _file_size_limit() -> None:
    """Where no tmpfs can be mounted: files may not grow past 256 KiB (EFBIG, like a
    full disk for the writer; SIGXFSZ ignored so the write fails instead of killing)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))


def test_disk_full_under_the_store_then_the_rerun_repairs_and_finishes(
    tmp_path: Path, cli_env: Callable[[Mapping[str, str] | None], dict[str, str]]
) -> None:
    disk = tmp_path / "disk"
    n = 2000
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"text": f"item {i} " + "x" * 60}) + "\n" for i in range(n))
    )
    store = disk / "store.db"
    cmd = [
        sys.executable, "-m", "fanflow", "map", "in.jsonl", "-p", "{text}", *SIM,
        "--job", "big", "--store", str(store), "--concurrency", "50", "-q",
    ]  # fmt: skip

    def run(small: bool) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd, cwd=tmp_path, env=cli_env(None), capture_output=True, text=True, timeout=120,
            preexec_fn=_file_size_limit if small else None,
        )  # fmt: skip

    with _small_disk(disk) as (how, grow):
        first = run(small=how == "fsize")
        assert "Traceback" not in first.stderr, first.stderr
        assert first.returncode == 2, first.stderr
        assert f"the fanflow store {store} could not be written" in first.stderr
        assert "free disk space" in first.stderr
        if grow is not None:
            grow()
        again = run(small=False)
        assert "Traceback" not in again.stderr, again.stderr
        assert again.returncode == 0, again.stderr
        rows = [json.loads(line) for line in again.stdout.splitlines()]
        assert len(rows) == n
        records = job_records_path(store, "big")
        text = records.read_text()
        assert text.endswith("\n")
        assert all(json.loads(line)["status"] for line in text.splitlines())
        report = subprocess.run(
            [sys.executable, "-m", "fanflow", "report", "big", "--store", str(store),
             "-o", str(tmp_path / "r.html")],
            cwd=tmp_path, env=cli_env(None), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert report.returncode == 0, report.stderr


def test_the_librarys_warnings_say_fanflow_once_on_the_console() -> None:
    # The library's messages start "fanflow: " for those who read its log; the command
    # prefixes every line it prints with the same (the refused breaker's warning, a
    # batch's, a store's).
    import io
    import logging

    from rich.console import Console

    from fanflow.cli._base import library_log

    out = io.StringIO()
    with library_log(Console(file=out, width=200)):
        logging.getLogger("fanflow").warning("fanflow: every request was refused")
        logging.getLogger("fanflow").warning("a message of its own")
    assert out.getvalue().splitlines() == [
        "fanflow: every request was refused",
        "fanflow: a message of its own",
    ]
