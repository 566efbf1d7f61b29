"""The ``Limits(shared=URL)`` forms: which store a URL names, checked when limits are made.

Kept apart from the stores so :mod:`fanflow._limits` can check a URL without importing
them. A Redis URL imports redis-py here (see :func:`_import_redis`).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from dataclasses import dataclass

from .._exceptions import ConfigError

__all__ = ["FORMS", "StoreURL", "parse_url", "redact"]

FORMS = (
    "sqlite:///relative/limits.db, sqlite:////absolute/limits.db or a plain path: "
    "processes on one machine",
    "redis://host:port/db, rediss://host:port/db, unix:///path/to/redis.sock: any machines",
)

# A concurrency slot not renewed for this many seconds is free again (its process died).
DEFAULT_TTL = 10.0


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed shared-limits URL: ``kind`` is "sqlite" or "redis"; ``target`` the file
    path or the redis URL (without fanflow's own query parameters); ``ttl`` the lease
    time of concurrency slots (``?ttl=SECONDS``)."""

    kind: str
    target: str
    ttl: float


def redact(url: str) -> str:
    """``url`` without its userinfo (a Redis password), for errors and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, ""))


def _import_redis() -> None:
    """Import redis-py now, when the limits are made, so a process's first call does not
    wait for it (decision 0214). Without it, the store says what to install when it is
    first used."""
    with contextlib.suppress(ImportError):
        import redis.asyncio  # noqa: F401


def parse_url(url: str) -> StoreURL:
    """Parse ``url``; raise ConfigError naming the allowed forms for any other."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"shared= must be a URL string; use one of: {'; '.join(FORMS)}")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    query = urllib.parse.parse_qs(parts.query)
    ttl = DEFAULT_TTL
    if "ttl" in query:
        try:
            ttl = float(query.pop("ttl")[-1])
        except ValueError:
            ttl = -1.0
        if not ttl > 0:
            raise ConfigError(f"ttl= in shared= ({redact(url)!r}) must be a number of seconds > 0")
    rest = urllib.parse.urlencode(query, doseq=True)
    if scheme == "sqlite":
        if parts.netloc or not parts.path:
            raise ConfigError(
                f"a SQLite file in shared= ({redact(url)!r}) is written "
                f"sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        # SQLAlchemy's form: sqlite:///relative.db, sqlite:////absolute/path.db
        return StoreURL("sqlite", parts.path[1:], ttl)
    if scheme in ("redis", "rediss", "unix"):
        target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
        _import_redis()
        return StoreURL("redis", target, ttl)
    if scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # a plain path
        return StoreURL("sqlite", parts.path if scheme == "" else url, ttl)
    raise ConfigError(
        f"unknown scheme {parts.scheme!r} in shared= ({redact(url)!r}); use one of: "
        f"{'; '.join(FORMS)}"
    )
