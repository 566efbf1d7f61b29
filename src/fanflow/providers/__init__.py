"""Providers: one adapter per API, each mapping a Request to a Response or an error.

``openai`` (Chat Completions and compatible servers) and ``anthropic`` (Messages) talk
HTTP through the shared plumbing in ``_http.py``; ``function`` wraps any callable;
``local`` runs a GGUF model in worker processes (``_local.py`` the handle, ``_worker.py``
the processes, ``_llama.py`` the model inside a worker).
"""

from ._anthropic import AnthropicLLM, anthropic
from ._function import FunctionLLM, function
from ._local import LocalLLM, PoolStatistics, local
from ._openai import OpenAILLM, openai

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
