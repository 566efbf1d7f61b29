"""The README's commands and CI stay in step."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b.strip() for b in _bash_blocks(readme)]
    test_commands = [b for b in blocks if "pytest" in b]
    assert len(test_commands) == 1, "the README should show exactly one test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_commands[0] in ci


def test_every_decision_record_names_what_and_why() -> None:
    records = sorted((ROOT / "docs" / "decisions").glob("*.md"))
    assert records
    for record in records:
        text = record.read_text().lower()
        assert "why" in text or "because" in text, record.name


def test_readme_python_example_runs() -> None:
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README should show a runnable Python example"
    done = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout


def test_readme_pattern_shapes_are_the_example_that_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "patterns_as_written.py").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "vote" in b]
    assert block.strip() in example
