"""Providers: one adapter per API, each mapping a Request to a Response or an error."""

from .function import FunctionLLM, function

__all__ = ["FunctionLLM", "function"]
