"""Issue 13.4: no piece of an API key (8 characters or more) ever leaves the client,
whatever the server echoes back and wherever the error ends up.

The first tests drive the redaction through a handle whose transport answers 401 with
a given body (``fanflow.testing.MockTransport``: no server); the end-to-end tests run a real
SimServer that echoes the wrong key (JSON, plain text straddling the old 300-byte cut, a
cut key), a real SQLite store and a JSONL sink, and look for every 8-character piece of
the key in each place the error is kept.
"""

from __future__ import annotations

import pickle
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fanflow
from fanflow import RetryPolicy
from fanflow.testing import MockReply, MockTransport, SimServer

from .._helpers import run_virtual

KEY = "sk-proj-Zq8vN3xLw5Tb7Kc1Rm9Hy2Ud4Fs6Gj0PaEiOoQ"  # 45 characters, all distinct-ish
PIECE = 8


def pieces(key: str, size: int = PIECE) -> set[str]:
    """Every run of ``size`` consecutive characters of ``key``."""
    return {key[i : i + size] for i in range(len(key) - size + 1)}


def leaked(text: str | bytes, key: str = KEY) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return sorted(p for p in pieces(key) if p in text)


def refused(key: str, body: str, *, json_body: bool = False) -> BaseException:
    """The error of one call by a handle with ``api_key=key`` whose server answers 401
    with ``body`` (what a server echoing the key sends back)."""

    def server(request: object) -> MockReply:
        if json_body:
            return MockReply(401, {"Content-Type": "application/json"}, body.encode())
        return MockReply(401, body=body.encode())

    async def go() -> BaseException:
        llm = fanflow.openai(
            "m", base_url="http://test/v1", api_key=key, transport=MockTransport(server),
            retry=RetryPolicy.none(),
        )  # fmt: skip
        async with llm:
            record = await fanflow.call(llm, "x").record()
        assert record.error is not None
        return record.error

    return run_virtual(go())


# ----------------------------------------------------------------- through a handle


def test_scrub_removes_every_run_of_eight_characters_of_the_key() -> None:
    text = f"a {KEY[:20]} b {KEY[10:18]} c {KEY[-9:]} d {KEY} e {KEY[3:10]}"
    out = str(refused(KEY, text))
    assert leaked(out) == []
    assert KEY[3:10] in out  # seven characters are not a piece: kept (and harmless)
    assert out.count("[redacted]") == 4


def test_scrub_of_a_short_key_removes_the_whole_key() -> None:
    assert "HTTP 401: key [redacted] here (" in str(refused("abc", "key abc here"))


@settings(max_examples=300, deadline=None)
@given(
    key=st.text(alphabet="abcdefghijkl-_0123", min_size=8, max_size=60),
    cuts=st.lists(st.tuples(st.integers(0, 60), st.integers(8, 60)), max_size=4),
    noise=st.lists(st.text(alphabet="abcxyz -:{}", max_size=30), min_size=5, max_size=5),
)
def test_scrub_property(key: str, cuts: list[tuple[int, int]], noise: list[str]) -> None:
    parts = [noise[0]]
    for (start, length), filler in zip(cuts, noise[1:], strict=False):
        parts.append(key[start : start + length])
        parts.append(filler)
    out = str(refused(key, "".join(parts)))
    assert leaked(out, key) == []


@pytest.mark.parametrize("json_body", [False, True])
def test_the_body_is_scrubbed_before_it_is_cut(json_body: bool) -> None:
    # The key starts at byte 290: cutting at 300 bytes first kept 10 characters of it.
    head = "Unauthorized: invalid API key. ".ljust(290, ".")
    text = head + KEY + " was refused"
    body = '{"error": {"message": "' + text + '"}}' if json_body else text
    error = refused(KEY, body, json_body=json_body)
    assert isinstance(error, fanflow.errors.AuthenticationError)
    assert leaked(str(error)) == []
    assert len(str(error)) < 500  # still cut: a huge body makes no huge message


# --------------------------------------------------------------------------- end to end


@pytest.mark.looptime
@pytest.mark.parametrize("echo", ["json", "text", "partial"])
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_an_echoed_key_leaves_no_piece_anywhere(tmp_path: Path, echo: str, api: str) -> None:
    db = tmp_path / "store.db"
    sink = tmp_path / "out.jsonl"
    async with SimServer(api_key="sk-the-right-one", echo_key=echo) as server:  # type: ignore[arg-type]
        llm = (
            fanflow.openai("m", base_url=server.url, api_key=KEY)
            if api == "openai"
            else fanflow.anthropic("m", base_url=server.root, api_key=KEY)
        )
        async with llm, fanflow.Store(db) as store:
            result = await fanflow.map(
                llm,
                "{input}",
                ["a", "b"],
                retry=RetryPolicy.none(),
                store=store,
                job="leak",
                sink=sink,
            )
    assert server.stats().responses == {401: 2}
    errors = list(result.errors.values())
    assert errors
    assert all(isinstance(e, fanflow.errors.AuthenticationError) for e in errors)
    for error in errors:
        assert leaked(str(error)) == [], str(error)
        assert leaked(repr(error)) == []
        assert leaked(pickle.dumps(error)) == []
    assert leaked(pickle.dumps(list(result.records))) == []
    assert leaked(repr(result.records)) == []
    assert leaked(sink.read_bytes()) == []
    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
    assert "AuthenticationError" in dump  # the rows are there, without the key
    assert leaked(dump) == []
    # Every byte on disk: the store's files and the sink (small files, read once).
    for path in tmp_path.rglob("*"):  # noqa: ASYNC240
        if path.is_file():
            assert leaked(path.read_bytes()) == [], path


@pytest.mark.looptime
async def test_simserver_echo_modes_do_echo_the_key() -> None:
    """The leak tests above would prove nothing if the server did not echo the key."""
    import aiohttp

    async with (
        SimServer(api_key="right", echo_key="text") as text_server,
        SimServer(api_key="right", echo_key="partial") as partial_server,
        aiohttp.ClientSession() as session,
    ):
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        async with session.post(
            text_server.url + "/chat/completions", json=body, headers=headers
        ) as resp:
            assert resp.status == 401
            assert resp.content_type == "text/plain"
            raw = await resp.read()
        assert raw.index(KEY.encode()) == 290
        async with session.post(
            partial_server.url + "/chat/completions", json=body, headers=headers
        ) as resp:
            assert resp.status == 401
            cut = await resp.text()
        assert KEY not in cut
        assert KEY[:12] in cut
        assert KEY[-12:] in cut
