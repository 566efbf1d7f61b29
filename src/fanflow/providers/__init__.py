"""Providers: one adapter per API, each mapping a Request to a Response or an error."""

from .function import FunctionLLM, function
from .local import LocalLLM, PoolStatistics, local

__all__ = ["FunctionLLM", "LocalLLM", "PoolStatistics", "function", "local"]
