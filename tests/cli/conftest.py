"""Helpers to drive the ``fanflow`` command through its entry point in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

FANFLOW = [sys.executable, "-m", "fanflow"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without provider keys or FANFLOW_* settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FANFLOW_") and k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
    }
    env["COLUMNS"] = "100"
    env.update(extra or {})
    return env


@pytest.fixture
def run(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``fanflow ARGS`` in ``tmp_path``; returns the completed process."""

    def go(
        *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FANFLOW, *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=clean_env(env),
            timeout=60,
            check=False,
        )

    return go


@pytest.fixture
def cli_env() -> Callable[[Mapping[str, str] | None], dict[str, str]]:
    """``clean_env`` as a fixture (test modules cannot import conftest in importlib mode)."""
    return clean_env
