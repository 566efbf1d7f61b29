"""The README's commands and CI stay in step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    """A SimServer on loopback (OpenAI protocol) for the README's OpenAI examples."""
    from fanflow.testing import SimServer

    with SimServer(latency=0.01) as server:
        yield server.url


def _readme_env(sim_url: str) -> dict[str, str]:
    # The README's examples as a user runs them, keys from the environment: here they
    # reach SimServer through OPENAI_BASE_URL, which fanflow.openai honours.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FANFLOW_"))}
    env.update(
        OPENAI_API_KEY="sk-readme-example",
        OPENAI_BASE_URL=sim_url,
        AZURE_OPENAI_API_KEY="azure-readme-example",
        ANTHROPIC_API_KEY="sk-ant-readme-example",
    )
    return env


def _python_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", readme, flags=re.S)


def test_readme_leads_with_an_openai_example_that_runs(sim_url: str) -> None:
    blocks = _python_blocks()
    assert blocks, "the README should show a runnable Python example"
    assert "fanflow.openai(" in blocks[0]
    assert len([line for line in blocks[0].splitlines() if line.strip()]) <= 4
    done = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=60,
        check=False, env=_readme_env(sim_url), cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "['echo: One word for: sea', 'echo: One word for: sky']" in done.stdout
    assert "succeeded=2" in done.stdout
    assert "2 done, 0 failed" in done.stderr  # progress=True, plain lines off a terminal


def _excerpt_of_an_example(block: str) -> bool:
    # Such a block is checked against its example (which CI runs whole) instead.
    return any(block.strip() in p.read_text() for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_every_readme_python_block_runs(index: int, sim_url: str) -> None:
    block = _python_blocks()[index]
    if _excerpt_of_an_example(block):
        pytest.skip("an excerpt of an example: test_readme_pattern_shapes_... checks it")
    done = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=60,
        check=False, env=_readme_env(sim_url), cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, f"README python block {index}:\n{block}\n{done.stderr}"


def test_readme_names_the_no_compiler_setup_near_the_top() -> None:
    readme = (ROOT / "README.md").read_text()
    first_screen = readme[: readme.index("- **Patterns**")]
    assert "pip install . && python examples/quickstart.py" in first_screen
    assert "```bash\npip install . && python examples/quickstart.py\n```" in readme
    assert (ROOT / "examples" / "quickstart.py").is_file()


def test_readme_pipeline_runs_and_row_fields_are_documented(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    (pipeline,) = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    (tmp_path / "pipeline.yaml").write_text(pipeline)
    (tmp_path / "reviews.jsonl").write_text('{"text": "great"}\n{"text": "awful"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FANFLOW_"))}
    fanflow = [sys.executable, "-m", "fanflow"]
    done = subprocess.run(
        [*fanflow, "run", "pipeline.yaml", "--check"], capture_output=True, text=True,
        timeout=60, check=False, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [*fanflow, "run", "pipeline.yaml", "-q"], capture_output=True, text=True, timeout=60,
        check=False, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["succeeded", "succeeded"]
    # The README's table of output fields is exactly what rows hold (map and run).
    table = re.findall(r"^\| `(\w+)` \|", readme, flags=re.M)
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    done = subprocess.run(
        [*fanflow, "map", "in.jsonl", "-p", "{text}", "--provider", "sim", "--sim", "500=1",
         "--retries", "0", "-q"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path, env=env,
    )  # fmt: skip
    failed_map_row = json.loads(done.stdout)
    assert set(table) == set(failed_map_row) | {"steps", "failed_step"}
    assert set(rows[0]) <= set(table)


def test_readme_pattern_shapes_are_the_example_that_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "patterns_as_written.py").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "vote" in b]
    assert block.strip() in example
