"""What the providers' prompt caches need: the shortest prefix each model caches.

OpenAI caches a prompt's prefix automatically from 1,024 tokens, in steps of 128.
Anthropic caches the prefix ending at a ``cache_control`` breakpoint (at most 4 per
request) when it is at least the model's minimum: 4,096 tokens for Claude Opus 4.5
and Haiku 4.5, 2,048 for the Haiku 3 models, 1,024 for the others (Anthropic's prompt
caching guide, as of 2026-12). SimServer models the same rules
(``fanflow.testing.SimServer(prompt_cache=True)``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

__all__ = [
    "ANTHROPIC_BREAKPOINTS",
    "CONSTANT_CHARS",
    "OPENAI_MINIMUM",
    "OPENAI_STEP",
    "PREFILLED",
    "TEMPLATE_KEY",
    "minimum_tokens",
]

#: ``Request.metadata`` keys a pattern's template sets: how many leading characters of
#: the user turn are the template's constant text (the same for every item), and a key
#: naming the template (OpenAI's ``prompt_cache_key``).
CONSTANT_CHARS = "fanflow.constant_chars"
TEMPLATE_KEY = "fanflow.template_key"

#: Set while a primed batch's first call runs: called when its streamed reply's first
#: text arrives (the server has read the whole prompt, so its prefix is cached).
PREFILLED: ContextVar[Callable[[], None] | None] = ContextVar("fanflow_prefilled", default=None)

#: OpenAI's automatic caching: the shortest cached prefix and the step it grows by.
OPENAI_MINIMUM = 1024
OPENAI_STEP = 128
#: The most ``cache_control`` breakpoints one Anthropic request may carry.
ANTHROPIC_BREAKPOINTS = 4

# Model-name prefixes with a minimum other than 1,024 tokens, longest first.
_ANTHROPIC_MINIMUM = (
    ("claude-opus-4-5", 4096),
    ("claude-haiku-4-5", 4096),
    ("claude-3-5-haiku", 2048),
    ("claude-3-haiku", 2048),
)


def minimum_tokens(provider: str, model: str | None) -> int:
    """The shortest prefix ``model`` of ``provider`` (``"openai"``, ``"anthropic"``)
    caches, in tokens; another provider's models are taken to follow OpenAI's rule."""
    if provider == "anthropic":
        name = model or ""
        for prefix, tokens in _ANTHROPIC_MINIMUM:
            if name.startswith(prefix):
                return tokens
    return OPENAI_MINIMUM
