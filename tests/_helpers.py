"""Helpers shared by tests: running a coroutine on a fresh virtual-time loop, nginx
as a required tool, a loopback HTTP app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, Protocol, TypeVar

import looptime

T = TypeVar("T")


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a new looptime loop (time starts at 0 and only moves when idle).

    For hypothesis tests, which cannot use pytest-asyncio's per-test loop.
    """
    loop = looptime.new_event_loop(start=0.0)
    try:
        return loop.run_until_complete(coro)
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        loop.close()
        assert not pending, f"tasks left running: {pending}"


def require_nginx() -> None:
    """Skip the calling test (or module) when Debian's nginx is missing, except in CI,
    where ``.ci/run`` installs it: there a missing nginx is an error."""
    import os

    import pytest

    from ._nginx import nginx_path

    if nginx_path() is not None:
        return
    if os.environ.get("CI") == "true":
        raise RuntimeError("nginx is missing in CI: .ci/run must apt-get install -y nginx")
    pytest.skip("nginx is not installed (apt-get install -y nginx)", allow_module_level=True)


def require_redis() -> str:
    """The path of redis-server; skip the calling test when it is missing, except in
    CI, where ``.ci/run`` installs it: there a missing redis-server is an error."""
    import os
    import shutil

    import pytest

    path = shutil.which("redis-server")
    if path is not None:
        return path
    if os.environ.get("CI") == "true":
        raise RuntimeError("redis-server is missing in CI: .ci/run must install redis-server")
    pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    raise AssertionError("unreachable: pytest.skip raises")


@contextlib.asynccontextmanager
async def loopback_app(path: str, handler: Any) -> AsyncIterator[str]:
    """An aiohttp app answering POST ``path`` with ``handler`` on a free loopback port;
    yields its ``http://127.0.0.1:PORT`` base."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def open_batches(store: Any) -> list[tuple[str, str]]:
    """A ``fanflow.Store``'s provider batches submitted and not yet settled, as ``(id,
    provider)``, oldest first: read from its file, since the store has no query for them
    (the batch backend needs none)."""
    import sqlite3

    store.flush()
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        sql = "SELECT id, provider FROM batches WHERE status = 'submitted' ORDER BY created"
        return [(row[0], row[1]) for row in conn.execute(sql)]


def busiest_second(stats: Any) -> int:
    """The most requests a SimServer admitted in one whole second of its timeline.

    Tests against real servers in real time check that a limit is used with this,
    not with a makespan: one late timer on a loaded machine moves a makespan, not
    the busiest second. Makespans are measured in benchmarks/.
    """
    return max((second.admitted for second in stats.timeline), default=0)


def default_of(function: Any, name: str) -> Any:
    """The default of ``function``'s keyword ``name``, read from its public signature
    (the value a test compares with, without importing the private module holding it)."""
    import inspect

    default = inspect.signature(function).parameters[name].default
    assert default is not inspect.Parameter.empty, f"{name} has no default"
    return default


# The question a guard asks "the other way round" (YES clears), for block_on="NO".
SAFE_QUESTION = "Is this request safe to answer?\n{query}\nAnswer YES or NO with brief explanation."


async def guard_verdict(reply: str, block_on: str | None = None) -> bool | None:
    """What ``fanflow.guarded`` reads from a guard model replying ``reply`` (its default
    reader, through the public pattern): True flags the query, False allows it, None:
    the reply could not be read (``guard_error`` is the ParseError; raised here).

    ``block_on="NO"`` goes with a guard prompt asking whether the query is safe."""
    import fanflow
    from fanflow.testing import ScriptedLLM

    guard = ScriptedLLM(reply)
    options: dict[str, Any] = {}
    if block_on is not None:
        options["block_on"] = block_on
        if block_on == "NO":
            options["guard_prompt"] = SAFE_QUESTION
    result = await fanflow.guarded(ScriptedLLM("answer"), "q", guard=guard, **options)
    assert guard.calls == 1
    if result.flagged is None:
        assert result.guard_error is not None
        raise result.guard_error
    assert result.allowed is (not result.flagged)
    return result.flagged


# Numbers the docs promise, which tests hold the code to (the code's own constants are
# private; these are the documented values, so a change to either fails a test):
#: docs/errors.md: "after 3 in a row ... it trips".
TRIP_AFTER = 3
#: docs/errors.md: "for a connection that cannot be made: once a call has also tried 3 times".
CONNECT_ATTEMPTS = 3
#: docs/errors.md: "10 seconds after the trip the next call goes as a probe".
PROBE_AFTER = 10.0
#: docs/errors.md: "A new HTTP handle sends its first 16 calls".
COLD_CALLS = 16
#: docs/decisions/0175: "COLD_STEP = 10 ms", the shortest time between two doublings.
COLD_STEP = 0.01
#: docs/decisions/0313: "a doubling goes in 4 parts", a quarter of a step apart.
COLD_SPLIT = 4
#: docs/architecture.md (the life of a map, step 2): a map runs "twice the concurrency"
#: of workers.
WORKERS_PER_SLOT = 2


class SentRequest(Protocol):
    """What a ``fanflow.testing.MockTransport`` handler receives: one HTTP request as a
    handle sends it (its method, URL, every header, the body). fanflow's own type for it
    is not public; this names the fields the tests read."""

    @property
    def method(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def body(self) -> Any: ...


def gate_of(limit: int | None) -> Any:
    """The FIFO gate a run of ``concurrency=limit`` starts with: the ``gate`` of
    ``fanflow.backends.CallOptions(concurrency=limit).start()``, the run a backend
    receives (the gate's class itself is not a public name)."""
    from fanflow.backends import CallOptions

    gate = CallOptions(concurrency=limit).start().gate
    assert gate is not None
    assert gate.limit == limit
    return gate
