"""Ready-made chat-completions bodies (``Request.body``) on a handle that does not speak
the Chat Completions API: what it can send through a request's typed fields, and a
refusal for the rest (the item fails, saying which fields), never a silent drop,
because a request sent without its ``tools`` answers a different question.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._exceptions import BadRequest

__all__ = ["check_translatable"]

# The fields that map onto the typed fields of a Request (``stream`` is the handle's).
TRANSLATED = frozenset(
    ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
     "stream", "stream_options")
)  # fmt: skip


def check_translatable(
    body: Mapping[str, Any], provider: str, api: str, also: frozenset[str] = frozenset()
) -> None:
    """Refuse a chat-completions body that ``api`` cannot express as written.

    Raises:
        BadRequest: it has fields beyond :data:`TRANSLATED` (and ``also``, the handle's
            own), tool turns or content parts.
    """
    extra = sorted(set(body) - TRANSLATED - also)
    turns = [m for m in body.get("messages") or () if isinstance(m, Mapping)]
    if any(m.get("role") == "tool" or "tool_calls" in m for m in turns):
        extra.append("tool turns")
    if any(not isinstance(m.get("content"), str | None) for m in turns):
        extra.append("message content parts")
    if extra:
        raise BadRequest(
            f"{provider}: this chat-completions request uses {', '.join(extra)}, which "
            f"{api} does not take as written; send it to an OpenAI-compatible endpoint "
            "(--provider openai / fanflow.openai), or remove those fields"
        )
