"""Issue 13 (tests): fuzzed templates over fuzzed rows through ``fanflow map``, in process
(the command's own ``main``, with the simulated model over loopback HTTP).

Whatever the template: no exception escapes, the exit code is a documented one (0 all
succeeded, 1 some rows failed, 2 the template was refused before any call), a refusal
says what is wrong with the template, and otherwise every row ends with one status and
every row that has the template's fields succeeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanflow.cli import main

PIECES = st.sampled_from(
    [*"ab {}[]!:.>0x", "{a}", "{b}", "{{", "}}", "{a.__class__}", "{a!r:>99}", "{}", "{0}"]
)
ROWS = st.lists(
    st.fixed_dictionaries({}, optional={"a": st.text(max_size=8), "b": st.integers()}),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(parts=st.lists(PIECES, min_size=1, max_size=10), rows=ROWS)
def test_fuzzed_templates_through_the_command(
    parts: list[str], rows: list[dict[str, object]]
) -> None:
    template = "".join(parts)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.jsonl"
        out = Path(tmp) / "out.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        err = io.StringIO()
        argv = ["map", str(source), "-p", template, "-o", str(out), "-q"]
        argv += ["--provider", "sim", "--sim", "latency=0", "--progress", "none"]
        with contextlib.redirect_stderr(err):
            code = main(argv, env={})
        stderr = err.getvalue()
        assert "Traceback" not in stderr
        assert code in (0, 1, 2), stderr
        if code == 2:
            assert "template" in stderr, stderr
            assert not out.exists() or out.read_text() == ""  # nothing was sent
            return
        # Split on newlines only: a value may hold U+0085 or U+2028, which splitlines() cuts.
        written = [json.loads(line) for line in out.read_text().split("\n") if line]
    assert [r["index"] for r in written] == list(range(len(rows)))
    # Valid, or the command would have said 2; so its fields are str.format's.
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    for row, result in zip(rows, written, strict=True):
        if all(f in row for f in fields):
            assert result["status"] == "succeeded", result
        else:
            assert result["status"] == "failed"
            assert "no field" in str(result["error"])
    assert (code == 0) == all(r["status"] == "succeeded" for r in written)
