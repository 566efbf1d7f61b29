"""The tokenizer is used only when it works offline (its encoding already cached)."""

from __future__ import annotations

import hashlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanflow import Request, _tokens


class _Encoding:
    def encode(self, text: str, disallowed_special: tuple[str, ...] = ()) -> list[int]:
        return [0] * len(text)  # one "token" per character, to tell it from the heuristic


@pytest.fixture
def fake_tiktoken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An installed tiktoken whose cache lives in tmp_path (nothing in it yet)."""
    module = types.ModuleType("tiktoken")
    fetched: list[str] = []

    def get_encoding(name: str) -> _Encoding:
        fetched.append(name)
        return _Encoding()

    module.get_encoding = get_encoding  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", module)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    _tokens._offline_encoder.cache_clear()
    yield tmp_path
    _tokens._offline_encoder.cache_clear()


def test_without_the_cached_encoding_the_heuristic_is_used(fake_tiktoken: Path) -> None:
    assert _tokens._offline_encoder() is None
    assert _tokens.estimate_tokens("abcdefgh") == 2


def test_with_the_cached_encoding_tiktoken_counts(fake_tiktoken: Path) -> None:
    name = hashlib.sha1(_tokens._O200K.encode()).hexdigest()
    (fake_tiktoken / name).write_bytes(b"cached")
    assert _tokens.estimate_tokens("abcdefgh") == 8
    assert _tokens.request_tokens(Request.of("abcd", max_tokens=1)) == (3 + 3 + 4, 1)


def test_without_tiktoken_the_heuristic_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails
    _tokens._offline_encoder.cache_clear()
    try:
        assert _tokens._offline_encoder() is None
    finally:
        _tokens._offline_encoder.cache_clear()
