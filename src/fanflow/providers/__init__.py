"""Providers: one adapter per API, each mapping a Request to a Response or an error.

``openai`` (Chat Completions and compatible servers) and ``anthropic`` (Messages) talk
HTTP through the shared plumbing in ``_http.py``; ``function`` wraps any callable.
"""

from ._anthropic import AnthropicLLM, anthropic
from ._function import FunctionLLM, function
from ._openai import OpenAILLM, openai
from .local import LocalLLM, PoolStatistics, local

__all__ = [
    "AnthropicLLM",
    "FunctionLLM",
    "LocalLLM",
    "OpenAILLM",
    "PoolStatistics",
    "anthropic",
    "function",
    "local",
    "openai",
]
