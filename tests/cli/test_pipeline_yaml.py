"""Hostile or broken YAML pipelines: one line naming file:line, fast, never a traceback.

Issue 13 item 6 (unknown tags, alias bombs, recursive aliases) and issue 15 (an unclosed
quote is reported where it opens, not at the end of the file).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fanflow import ConfigError
from fanflow.cli._pipeline import MAX_VALUES, parse_pipeline

Run = Callable[..., subprocess.CompletedProcess[str]]


def _bomb(levels: int) -> str:
    """'Billion laughs': each level is ten aliases of the one before (10**levels values)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\nsteps:\n  - prompt: hi\n"


CASES = {
    "unknown tag": (
        "steps:\n  - prompt: !!python/object/apply:os.system ['touch pwned']\n",
        "bad.yaml:2: not allowed in a pipeline: could not determine a constructor for the tag",
    ),
    "alias bomb": (_bomb(9), "bad.yaml:4: the aliases here expand to more than 10,000 values"),
    "recursive alias": (
        "steps: &s\n  - prompt: hi\n    after: *s\n",
        "bad.yaml:1: a recursive alias (the value contains itself)",
    ),
    "unclosed quote": (
        'steps:\n  - prompt: "Summarize {text}\n  - prompt: next\n\n\nkind: chain\n',
        "bad.yaml:2: not valid YAML: while scanning a quoted scalar that is never closed "
        "(the file ends at line 7); close it on line 2",
    ),
    "nested too deeply": ("steps: " + "[" * 3000 + "]" * 3000 + "\n", "bad.yaml:1: "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_yaml_is_one_line_with_file_and_line(run: Run, tmp_path: Path, case: str) -> None:
    text, message = CASES[case]
    (tmp_path / "bad.yaml").write_text(text)
    (tmp_path / "in.txt").write_text("x\n")
    done = run("run", "bad.yaml", "in.txt", "--provider", "sim", "--check")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert message in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", ["alias bomb", "recursive alias", "nested too deeply"])
def test_hostile_yaml_is_rejected_fast(case: str) -> None:
    """Rejected after bounded work: counted in Python calls, the same on every machine.

    Expanding the alias bomb would take over 10**9 calls; each case stops in a few
    tens of thousands (the cap leaves room for other PyYAML versions).
    """
    text, _ = CASES[case]
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        with pytest.raises(ConfigError):
            parse_pipeline(text, "bad.yaml")
    finally:
        sys.setprofile(None)
    assert calls < 200_000


def test_aliases_within_the_bound_still_work() -> None:
    text = (
        "models:\n  judge: &big {model: big, concurrency: 2}\n  other: *big\n"
        "steps:\n  - prompt: hi\n    model: judge\n  - prompt: again\n    model: other\n"
    )
    pipe = parse_pipeline(text, "ok.yaml")
    assert pipe.models["other"] == pipe.models["judge"] == {"model": "big", "concurrency": 2}
    # The bound is on the expanded size, not on aliases: 10**3 values pass this check
    # (and fail only on the unknown keys a0, a1, a2).
    assert MAX_VALUES > 10**3
    with pytest.raises(ConfigError, match=r"ok\.yaml:1: a0: unknown top-level field"):
        parse_pipeline(_bomb(3), "ok.yaml")
