"""Input files the CLI must survive: bad bytes, bad JSON, bad rows, fuzzed contents.

The contract (README, docs/errors.md): a line that cannot be an item is reported as
``file:line: reason; skipped`` and only that line is skipped; every other item is run;
the exit code is 1 when a line was skipped or an item failed, 3 when the file held no
items at all, else 0; never a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fanflow.cli import main

Run = Callable[..., subprocess.CompletedProcess[str]]

SIM = ["--provider", "sim", "--sim", "latency=0"]


def rows(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def test_invalid_utf8_on_one_line_skips_only_that_line(run: Run, tmp_path: Path) -> None:
    lines = [b'{"text": "a"}', b'{"text": "b \xff\xfe"}', b'{"text": "c"}', b'{"text": "d"}']
    (tmp_path / "bad_utf8.jsonl").write_bytes(b"\n".join([*lines, b'{"text": "e"}']) + b"\n")
    done = run("map", "bad_utf8.jsonl", "-p", "{text}", *SIM)
    assert "Traceback" not in done.stderr
    assert done.returncode == 1, done.stderr
    out = rows(done.stdout)
    assert [(r["line"], r["output"]) for r in out] == [
        (1, "echo: a"),
        (3, "echo: c"),
        (4, "echo: d"),
        (5, "echo: e"),
    ]
    assert "bad_utf8.jsonl:2: is not UTF-8 text (byte 13 of the line" in done.stderr
    assert "1 malformed input lines were skipped" in done.stderr


# --------------------------------------------------------------------------- fuzzing

_text_line = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=30,
).filter(lambda s: s.strip() != "")
_junk_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\xff")
_valid_json_row = _text_line.map(lambda s: json.dumps({"text": s}).encode())
_json_ish = st.one_of(
    st.text(max_size=30).map(lambda s: ("{" + s).replace("\n", " ").replace("\r", " ")),
    st.sampled_from(["[1, 2]", "3", "null", "true", '{"text": 1', "{}", '"just a string"']),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids),
        max_leaves=6,
    ).map(json.dumps),
).map(lambda s: s.encode("utf-8", "surrogatepass"))


def _decode(raw: bytes, first: bool) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return line.removeprefix("\ufeff") if first else line


def _jsonl_oracle(raw: bytes, first: bool) -> str:
    """What a JSONL line is: 'blank', 'item' or 'bad' (by the format's definition)."""
    line = _decode(raw, first)
    if line is None:
        return "bad"
    if not line.strip():
        return "blank"
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return "bad"
    return "item" if isinstance(value, dict | str) else "bad"


def _text_oracle(raw: bytes, first: bool) -> str:
    line = _decode(raw, first)
    if line is None:
        return "bad"
    return "item" if line.rstrip("\r").strip() else "blank"


def _run_in_process(path: Path, fmt: str, prompt: str) -> tuple[int, list[dict[str, object]], str]:
    out = path.with_suffix(".out.jsonl")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["map", str(path), "--input-format", fmt, "-p", prompt, "-o", str(out), *SIM])
    return code, rows(out.read_text(encoding="utf-8")), err.getvalue()


def _check(
    path: Path,
    kinds: list[str],
    code: int,
    out: list[dict[str, object]],
    err: str,
    refused: bool = False,
) -> None:
    """``refused``: no one of the first 8 items has the template's field, so the run is
    refused before any call (exit 2, the field named); else every item is run."""
    assert "Traceback" not in err
    items = [n for n, k in enumerate(kinds, start=1) if k == "item"]
    bad = [n for n, k in enumerate(kinds, start=1) if k == "bad"]
    for n in bad:
        assert f"{path}:{n}: " in err
    if refused:
        assert (code, out) == (2, []), err
        assert "nothing was sent" in err
        return
    assert [r["line"] for r in out] == items, err  # every item run, in input order
    failed = any(r["status"] != "succeeded" for r in out)
    # 1: a line skipped or an item failed; 3: the input held no items at all; else 0.
    assert code == (1 if bad or failed else 3 if not items else 0), err


_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fuzz_lines(
    lines: list[bytes],
    name: str,
    prompt: str,
    oracle: Callable[[bytes, bool], str],
    refused: bool = False,
) -> list[dict[str, object]]:
    """Run the lines as the file ``name``, check the promises, return the output rows."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        code, out, err = _run_in_process(path, name.rsplit(".")[-1], prompt)
        kinds = [oracle(x, i == 0) for i, x in enumerate(lines)]
        _check(path, kinds, code, out, err, refused)
        return out


def _no_text_field_in_first_items(lines: list[bytes]) -> bool:
    """Whether items exist and none of the first 8 is an object with a ``text`` field."""
    values = [
        json.loads(_decode(x, i == 0) or "")
        for i, x in enumerate(lines)
        if _jsonl_oracle(x, i == 0) == "item"
    ][:8]
    return bool(values) and not any(isinstance(v, dict) and "text" in v for v in values)


@_settings
@given(st.lists(st.one_of(_valid_json_row, _junk_bytes, _json_ish, st.just(b"")), max_size=12))
def test_fuzzed_jsonl_files(lines: list[bytes]) -> None:
    refused = _no_text_field_in_first_items(lines)
    out = _fuzz_lines(lines, "in.jsonl", "{text}", _jsonl_oracle, refused)
    for r in out:  # items with a text field all succeed; others fail by their template
        value = r["input"]
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            assert r["status"] == "succeeded", r


@_settings
@given(st.lists(st.one_of(_text_line.map(str.encode), _junk_bytes, st.just(b"  ")), max_size=12))
def test_fuzzed_text_files(lines: list[bytes]) -> None:
    out = _fuzz_lines(lines, "in.text", "{input}", _text_oracle)
    assert all(r["status"] == "succeeded" for r in out)


_cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@_settings
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("item"), st.tuples(_cell.filter(str.strip), _cell)),
            st.tuples(st.just("bad"), st.lists(st.text("xyz", min_size=1), min_size=3, max_size=4)),
            st.tuples(st.just("bad"), st.just(["only-one-field"])),
            st.tuples(st.just("bad"), _junk_bytes),
        ),
        max_size=10,
    )
)
def test_fuzzed_csv_files(entries: list[tuple[str, object]]) -> None:
    """CSV rows may span lines (quoted newlines): the row is named by its first line."""
    data = io.StringIO()
    writer = csv.writer(data, lineterminator="\r\n")
    writer.writerow(["text", "n"])
    chunks: list[bytes] = [data.getvalue().encode()]
    kinds: list[str] = []
    for kind, value in entries:
        if isinstance(value, bytes):
            block = value + b"\n"
        else:
            data = io.StringIO()
            csv.writer(data, lineterminator="\r\n").writerow(value)  # type: ignore[arg-type]
            block = data.getvalue().encode("utf-8")
        # A row is named by its first line; the lines a quoted field spans are not rows.
        kinds.append(kind)
        kinds.extend(["blank"] * (block.count(b"\n") - 1))
        chunks.append(block)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.csv"
        path.write_bytes(b"".join(chunks))
        code, out, err = _run_in_process(path, "csv", "{text}|{n}")
        _check(path, ["blank", *kinds], code, out, err)
        assert all(r["status"] == "succeeded" for r in out)


def test_a_few_fuzzed_files_through_the_real_entry_point(run: Run, tmp_path: Path) -> None:
    """The same promises from a subprocess (what users run), on a few fixed mixes."""
    cases = {
        "a.jsonl": [b'{"text": "x"}', b"\x00\xff\xfe", b"[1]", b'{"text": "y"}', b"{", b'"s"'],
        "b.txt": [b"one", b"\xc3\x28", b"", b"two", b"\xf0\x9f\x98\x80 three"],
        "c.csv": [b"text,n", b"a,1", b"b\xff,2", b'"multi\nline",3', b"x", b"c,4"],
    }
    for name, lines in cases.items():
        (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
        prompt = "{input}" if name.endswith(".txt") else "{text}"
        done = run("map", name, "-p", prompt, *SIM)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == 1, done.stderr
        out = rows(done.stdout)
        expected = {"a.jsonl": [1, 4, 6], "b.txt": [1, 4, 5], "c.csv": [2, 4, 7]}[name]
        assert [r["line"] for r in out] == expected, done.stderr
        bad = {"a.jsonl": [2, 3, 5], "b.txt": [2], "c.csv": [3, 6]}[name]
        for n in bad:
            assert f"{name}:{n}: " in done.stderr
