"""Token estimates for reservations, budgets and dry runs.

Before a request is sent, its token cost is only an estimate: the prompt's tokens plus
the most the reply may use (``max_tokens``, else :data:`DEFAULT_OUTPUT_TOKENS`). After
the reply, reservations are settled against the usage the server reports.

The prompt is counted by tiktoken's ``o200k_base`` encoding when tiktoken is installed
*and* its encoding file is already in tiktoken's cache (tiktoken downloads encodings at
first use, which fails offline, so fanflow never lets it try). Otherwise: one token per
four ASCII characters (OpenAI's tokenizer guide), rounded up, one per character outside
ASCII (CJK, emoji), plus 3 tokens per message and 3 to prime the reply (OpenAI cookbook).
See docs/decisions/0041-token-estimates.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from ._types import Request

__all__ = ["DEFAULT_OUTPUT_TOKENS", "estimate_tokens", "request_tokens"]

# Reserved for the reply when a request sets no max_tokens: a typical chat answer.
DEFAULT_OUTPUT_TOKENS = 1024

_PER_MESSAGE = 3
_PRIMING = 3
_CHARS_PER_TOKEN = 4
_O200K = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


@cache
def _offline_encoder() -> Callable[[str], int] | None:
    """tiktoken's o200k_base counter if it can load without the network, else None."""
    try:
        import tiktoken  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    # The cache location and key are tiktoken's own (tiktoken/load.py, read_file_cached).
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    path = os.path.join(cache_dir, hashlib.sha1(_O200K.encode()).hexdigest())
    if not os.path.exists(path):
        return None
    try:
        encoding: Any = tiktoken.get_encoding("o200k_base")
    except Exception:  # a corrupt cache would make tiktoken fetch again: stay offline
        return None

    def count(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return count


def _heuristic(text: str) -> int:
    if text.isascii():
        return -(-len(text) // _CHARS_PER_TOKEN)
    # Outside ASCII (accents, CJK, emoji) tokenizers spend about a token per character
    # or more; count each such character as one so reservations stay on the safe side.
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // _CHARS_PER_TOKEN) + len(text) - ascii_chars


def estimate_tokens(text: str) -> int:
    """Estimated tokens in ``text`` (tiktoken offline if available, else a heuristic:
    four ASCII characters per token, one token per other character)."""
    counter = _offline_encoder()
    if counter is not None:
        return counter(text)
    return _heuristic(text)


def _beyond_text(body: Mapping[str, Any]) -> str:
    """A written body's input that its messages' text leaves out (``tools``, tool calls)."""
    calls = [m.get("tool_calls") for m in body.get("messages") or () if isinstance(m, Mapping)]
    extra = [body.get("tools"), body.get("functions"), *calls]
    return json.dumps([x for x in extra if x], ensure_ascii=False) if any(extra) else ""


def request_tokens(request: Request) -> tuple[int, int]:
    """Estimated (input, output) tokens of ``request`` before it is sent.

    Output is the request's ``max_tokens`` (the most it may use), else
    :data:`DEFAULT_OUTPUT_TOKENS`.
    """
    count = _offline_encoder() or _heuristic
    n = _PRIMING
    for message in request.messages:
        n += _PER_MESSAGE + count(message.content)
    if request.body is not None:  # a written body: its tools and tool calls count too
        n += count(_beyond_text(request.body))
    output = request.max_tokens if request.max_tokens is not None else DEFAULT_OUTPUT_TOKENS
    return n, output
