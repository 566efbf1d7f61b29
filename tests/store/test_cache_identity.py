"""Issue 13.1: a cached answer is served only for the same request to the same endpoint.

Real SQLite stores, real SimServers on loopback (the judge: which server was called).
The CLI's ``--provider openai --base-url`` variant is in ``tests/cli/test_fail_fast_cli.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

import fanflow
from fanflow._durable import cache_key
from fanflow.providers._http import normalise_url
from fanflow.testing import SimServer

pytestmark = pytest.mark.looptime

ITEMS = ["alpha", "beta", "gamma"]


async def run_map(llm: fanflow.BaseLLM, db: Path, **kw: Any) -> fanflow.MapResult[Any]:
    async with llm, fanflow.Store(db) as store:
        return await fanflow.map(llm, "{input}", ITEMS, store=store, **kw)


async def test_another_server_is_called_not_served_from_the_cache(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    async with SimServer(reply="from A") as a, SimServer(reply="from B") as b:
        assert a.port != b.port
        first = await run_map(fanflow.openai("m", base_url=a.url, api_key="k"), db)
        again = await run_map(fanflow.openai("m", base_url=a.url, api_key="k"), db)
        other = await run_map(fanflow.openai("m", base_url=b.url, api_key="k"), db)
        assert first.outputs == ["from A"] * 3
        # Same request, same endpoint: served from the store (a positive control).
        assert again.outputs == ["from A"] * 3
        assert all(r.cached for r in again.records)
        assert a.stats().requests == 3
        # Same request to another server: that server answers.
        assert b.stats().requests == 3
        assert other.outputs == ["from B"] * 3
        assert not any(r.cached for r in other.records)


async def test_protocol_model_and_options_are_part_of_the_identity(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    async with SimServer() as server:
        base = server.url
        await run_map(fanflow.openai("m", base_url=base, api_key="k"), db)
        assert server.stats().requests == 3
        variants: list[fanflow.BaseLLM] = [
            fanflow.anthropic("m", base_url=server.root, api_key="k"),  # another protocol
            fanflow.openai("m2", base_url=base, api_key="k"),  # another model
            fanflow.openai("m", base_url=base, api_key="k", n=2),  # changes the answer
            fanflow.openai("m", base_url=base, api_key="k", extra_body={"top_k": 3}),
            fanflow.openai("m", base_url=base, api_key="k", temperature=0.5),
        ]
        for i, llm in enumerate(variants):
            result = await run_map(llm, db)
            assert not any(r.cached for r in result.records), llm
            assert server.stats().requests == 3 * (i + 2), llm
        # The same endpoint written differently, another key, another stream mode:
        # the same answers, so the cache serves them.
        port = base.split(":")[-1].split("/")[0]
        same = [
            fanflow.openai("m", base_url=f"HTTP://127.0.0.1:{port}/v1/", api_key="k"),
            fanflow.openai("m", base_url=base, api_key="another-key"),
            fanflow.openai("m", base_url=base, api_key="k", stream=True),
        ]
        before = server.stats().requests
        for llm in same:
            result = await run_map(llm, db)
            assert all(r.cached for r in result.records), llm
        assert server.stats().requests == before


def test_identity_never_holds_the_key_or_credentials() -> None:
    llm = fanflow.openai(
        "m",
        base_url="https://user:hunter2secret@Example.COM:443/v1/?api_key=sk-in-the-query",
        api_key="sk-the-api-key-itself",
        headers={"X-Api-Key": "sk-header-secret"},
    )
    identity = json.dumps(llm.cache_identity())
    for secret in ("hunter2secret", "sk-in-the-query", "sk-the-api-key-itself", "sk-header"):
        assert secret not in identity
    assert llm.cache_identity()["endpoint"] == "https://example.com/v1"
    assert normalise_url("http://LOCALHOST:80/v1/") == "http://localhost/v1"
    assert normalise_url("http://[::1]:8080/v1") == "http://[::1]:8080/v1"
    assert normalise_url("https://h:8443") == "https://h:8443"


def _v1_key(llm: fanflow.BaseLLM, request: fanflow.Request) -> str:
    """The cache key before issue 13 (class, model and name; no endpoint)."""
    cls = type(llm)
    namespace = f"{cls.__module__}.{cls.__qualname__}|{llm.model}|{getattr(llm, 'name', None)}"
    return hashlib.sha256(f"{namespace}\n{request.key}".encode()).hexdigest()


async def test_entries_under_the_old_key_are_not_served(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    async with SimServer(reply="fresh") as server:
        llm = fanflow.openai("m", base_url=server.url, api_key="k")
        request = llm.prepare(fanflow.Request.of("alpha"))
        assert cache_key(llm, request) != _v1_key(llm, request)
        async with fanflow.Store(db) as store:
            stale = fanflow.CallRecord(
                status=fanflow.Status.SUCCEEDED,
                request=request,
                value="stale",
                response=fanflow.Response("stale", model="m"),
            )
            await store.save(stale, key=_v1_key(llm, request), item=None)
            assert store.lookup(_v1_key(llm, request)) is not None
        result = await run_map(llm, db)
    assert result.outputs[0] == "fresh"
    assert server.stats().requests == 3


def test_cli_sim_provider_keeps_one_cache_across_runs(tmp_path: Path) -> None:
    """The sim provider listens on a new port each run but answers the same: a job
    resumes from the store (its endpoint in the identity is the sim, not the port)."""
    from fanflow.cli._providers import ProviderPlan, SimSpec
    from fanflow.cli._settings import Settings

    plan = ProviderPlan("sim", Settings(model="m"), sim=SimSpec())
    one = plan.build("http://127.0.0.1:1111/v1").cache_identity()
    two = plan.build("http://127.0.0.1:2222/v1").cache_identity()
    assert one == two
    other = ProviderPlan("sim", Settings(model="m"), sim=SimSpec({"reply": "ok"}))
    assert other.build("http://127.0.0.1:1111/v1").cache_identity() != one
