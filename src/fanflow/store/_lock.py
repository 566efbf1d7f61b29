"""One running copy of a job at a time: an OS file lock per job, beside the store.

Two processes running the same job of one store would both see the same items as not
done and both call the model for each. So a run holds an exclusive ``flock`` on
``<store>-locks/<job>.lock`` while it runs, and a second run is refused with a
:class:`StoreError` naming the process holding it (pid, host, start time, written into
the lock file).

The kernel drops a ``flock`` when its process ends, however it ends, so a killed run
leaves no lock behind: the next run gets it and notes that the last holder did not
finish. Why a lock and not a pid check, and why refusing beats cooperating:
docs/decisions/0095-one-run-per-job.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .._exceptions import StoreError

__all__ = ["JobLock", "job_file_stem"]

log = logging.getLogger("fanflow")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock: runs are not locked there
    fcntl = None  # type: ignore[assignment]

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_MAX_NAME = 100


def job_file_stem(job: str) -> str:
    """A file name (without extension) for a job, distinct for distinct names.

    A name made only of letters, digits, ``-``, ``_`` and ``.`` (not starting with a dot,
    at most 100 characters) is used as it is. Any other name becomes a readable part,
    ``~`` and a hash of the exact name (``x/y`` -> ``x_y~<12 hex digits>``): plain names
    never hold a ``~``, and different names have different hashes, so two jobs never
    share a file and no name escapes the folder.
    """
    if job and len(job) <= _MAX_NAME and not job.startswith(".") and set(job) <= _SAFE:
        return job
    slug = "".join(c if c in _SAFE else "_" for c in job[:_MAX_NAME]).lstrip(".")
    digest = hashlib.sha256(job.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{slug}~{digest}"


def lock_path(store_path: Path, job: str) -> Path:
    """Where the lock of ``job`` lives: ``<store file>-locks/<job>.lock``."""
    return store_path.with_name(store_path.name + "-locks") / f"{job_file_stem(job)}.lock"


def _describe_holder(info: dict[str, Any]) -> str:
    pid, host, started = info.get("pid"), info.get("host"), info.get("started")
    when = ""
    if isinstance(started, int | float):
        when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
    return f"process {pid} on host {host}{when}"


class JobLock:
    """The exclusive lock of one job of a store, held while a run of the job is going on.

    Args:
        store_path: the store's database file.
        job: the job's name.
    """

    def __init__(self, store_path: Path, job: str) -> None:
        self.path = lock_path(store_path, job)
        self.store_path = store_path
        self.job = job
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"fanflow.JobLock({str(self.path)!r}, held={self._fd is not None})"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or fail at once if another run of the job holds it.

        Raises:
            StoreError: another process (or another run in this one) is running the job;
                the message names it and says what to do.
        """
        if fcntl is None or self._fd is not None:  # pragma: no cover - no flock here
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot create the lock file {self.path} of job {self.job!r} ({exc.strerror}); "
                "check that the store's folder is writable",
                path=str(self.store_path),
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe_holder(_read_info(fd))
            os.close(fd)
            raise StoreError(
                f"job {self.job!r} is already running in {holder} (store {self.store_path}); "
                "running it twice at once would repeat every call. Wait for that run to "
                "finish (or stop it), then run again to resume; or use another job name",
                path=str(self.store_path),
            ) from None
        previous = _read_info(fd)
        if previous:
            # The kernel released the lock of a run that ended without releasing it.
            log.warning(
                "job %r was last run by %s, which ended without finishing "
                "(killed?); this run takes over and resumes it",
                self.job,
                _describe_holder(previous),
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # the lock is held; only the note for a refused run is missing
        self._fd = fd

    def release(self) -> None:
        """Let the next run have the job. Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Emptied, not deleted: deleting a lock file lets two later runs lock two
        # different files of the same name.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock


def _read_info(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
