"""The process's open-file limit (RLIMIT_NOFILE) and how many connections fit under it.

Every connection is a file descriptor, so a concurrency above the limit would make
connects fail with EMFILE ("Too many open files"). So (docs/decisions/0097):

- each HTTP handle's connection pool is capped below the soft limit, with room left
  for everything else the process has open (:func:`connection_cap`); calls beyond the
  cap wait for a free connection instead of failing;
- the command line, which owns its process, first raises the soft limit to the hard
  limit (:func:`raise_open_file_limit`); the library itself never changes a
  process-wide limit;
- an EMFILE that still happens is reported as what it is (:func:`is_out_of_files`).
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass

__all__ = [
    "OpenFiles",
    "connection_cap",
    "is_out_of_files",
    "open_file_limits",
    "raise_open_file_limit",
]

if sys.platform != "win32":  # Windows bounds no sockets by such a limit
    import resource

# Stands for "no limit" (RLIM_INFINITY) in the arithmetic below.
_UNLIMITED = 1 << 20


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """The open-file limits: ``soft`` (in force), ``hard`` (the most ``soft`` may be
    raised to without privileges) and ``raised_from`` (the soft limit before fanflow
    raised it, or None)."""

    soft: int
    hard: int
    raised_from: int | None = None


def _limits() -> tuple[int, int]:
    if sys.platform == "win32":  # pragma: no cover
        return _UNLIMITED, _UNLIMITED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    return (_UNLIMITED if soft == inf else soft), (_UNLIMITED if hard == inf else hard)


def open_file_limits() -> OpenFiles:
    """The open-file limits in force."""
    return OpenFiles(*_limits())


def raise_open_file_limit() -> OpenFiles:
    """Raise the soft open-file limit as far as the hard limit allows (for the CLI).

    Some systems refuse the hard limit itself (macOS caps it at ``kern.maxfilesperproc``
    whatever ``ulimit -Hn`` says), so smaller steps are tried too.
    """
    soft, hard = _limits()
    if sys.platform == "win32" or soft >= hard:  # pragma: no cover - nothing to raise
        return OpenFiles(soft, hard)
    for want in (hard, 65536, 10240, 4096):
        if want <= soft or want > hard:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, _raw_hard()))
        except (ValueError, OSError):
            continue
        return OpenFiles(want, hard, raised_from=soft)
    return OpenFiles(soft, hard)


def _raw_hard() -> int:
    if sys.platform == "win32":  # pragma: no cover
        return _UNLIMITED
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _open_now() -> int:
    """How many descriptors this process has open (a guess where it cannot be seen)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 32  # pragma: no cover


def connection_cap(soft: int | None = None) -> int:
    """The most connections one pool may open: the soft limit less what is open now
    and a reserve (a tenth of the limit, at least 32) for files, pipes and the store."""
    if soft is None:
        soft = _limits()[0]
    reserve = max(32, soft // 10)
    return max(1, soft - _open_now() - reserve)


def is_out_of_files(exc: BaseException) -> bool:
    """Whether ``exc`` (or the OS error inside it) says the process ran out of descriptors."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) in (errno.EMFILE, errno.ENFILE):
            return True
        inner = getattr(current, "os_error", None)  # aiohttp.ClientConnectorError
        if isinstance(inner, OSError) and inner.errno in (errno.EMFILE, errno.ENFILE):
            return True
        current = current.__cause__ or current.__context__
    return False
