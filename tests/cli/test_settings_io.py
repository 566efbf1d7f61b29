"""Settings precedence and input readers, in process (pure code, no model)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fanflow import ConfigError
from fanflow.cli._io import BadLine, detect_format, read_items
from fanflow.cli._settings import resolve_settings


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    (tmp_path / "fanflow.toml").write_text(
        'model = "from-file"\nconcurrency = 3\nrpm = 60\nbase-url = "http://127.0.0.1:1/v1"\n'
    )
    env = {"FANFLOW_MODEL": "from-env", "FANFLOW_CONCURRENCY": "5"}
    s = resolve_settings({"concurrency": 7}, env=env, cwd=tmp_path)
    assert (s.model, s.concurrency, s.rpm, s.base_url) == (
        "from-env",
        7,
        60,
        "http://127.0.0.1:1/v1",
    )
    assert s.sources == {
        "model": "env",
        "concurrency": "flag",
        "rpm": str(tmp_path / "fanflow.toml"),
        "base_url": str(tmp_path / "fanflow.toml"),
    }


def test_explicit_config_and_fanflow_config_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "other.toml"
    cfg.write_text("timeout = 2.5\n")
    assert resolve_settings({}, env={}, config=str(cfg), cwd=tmp_path).timeout == 2.5
    env = {"FANFLOW_CONFIG": str(cfg)}
    assert resolve_settings({}, env=env, cwd=tmp_path).timeout == 2.5
    with pytest.raises(ConfigError, match="from FANFLOW_CONFIG"):
        resolve_settings({}, env={"FANFLOW_CONFIG": str(tmp_path / "no.toml")}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"config file .* not found; check the --config path"):
        resolve_settings({}, env={}, config="missing.toml", cwd=tmp_path)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("concurrency = 2.5\n", "concurrency must be int, got 2.5"),
        ("concurrency = true\n", "concurrency must be int, got True"),
        ("model = 3\n", "model must be str"),
        ("retries = -1\n", "retries must be >= 0"),
        ("colour = 'red'\n", "unknown setting 'colour'"),
        ("concurrency = \n", "not valid TOML"),
    ],
)
def test_bad_config_values(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "fanflow.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        resolve_settings({}, env={}, cwd=tmp_path)


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FANFLOW_TPM: tpm must be int, got 'lots'"):
        resolve_settings({}, env={"FANFLOW_TPM": "lots"}, cwd=tmp_path)


def read(tmp_path: Path, name: str, text: str, fmt: str | None = None) -> tuple[list, list]:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    bad: list[BadLine] = []
    items = [
        (i.line, i.value) for i in read_items(str(path), detect_format(str(path), fmt), bad.append)
    ]
    return items, [(b.line, b.reason) for b in bad]


def test_jsonl_reader(tmp_path: Path) -> None:
    items, bad = read(tmp_path, "a.jsonl", '{"a": 1}\n\n"plain"\n{oops\n3\n{"b": 2}\n')
    assert items == [(1, {"a": 1}), (3, "plain"), (6, {"b": 2})]
    assert [line for line, _ in bad] == [4, 5]
    assert bad[1][1] == "expected a JSON object or string, got int"


def test_csv_reader_counts_lines_of_quoted_fields(tmp_path: Path) -> None:
    text = 'name,note\nann,"two\nlines"\nbob\ncy,ok\n,\n'
    items, bad = read(tmp_path, "a.csv", text)
    assert items == [(2, {"name": "ann", "note": "two\nlines"}), (5, {"name": "cy", "note": "ok"})]
    assert bad == [(4, "has 1 fields but the header has 2")]


def test_text_reader_and_format_override(tmp_path: Path) -> None:
    items, bad = read(tmp_path, "a.csv", "x,y\n\nz\n", fmt="text")
    assert items == [(1, "x,y"), (3, "z")]
    assert bad == []
    with pytest.raises(ConfigError, match="unknown input format 'xml'"):
        detect_format("a.txt", "xml")


def test_a_non_utf8_line_is_reported_by_number_and_only_it_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"fine\n\xff\xfe bad\nalso fine\n")
    got: list[BadLine] = []
    items = [(i.line, i.value) for i in read_items(str(tmp_path / "b.txt"), "text", got.append)]
    assert items == [(1, "fine"), (3, "also fine")]
    assert [(b.line, b.reason) for b in got] == [
        (2, "is not UTF-8 text (byte 1 of the line: invalid start byte)")
    ]
    assert str(got[0]).startswith(f"{tmp_path / 'b.txt'}:2: is not UTF-8 text")


@pytest.mark.parametrize(
    ("name", "lines", "fmt"),
    [
        ("a.jsonl", [b'{"t": "a"}', b'{"t": "\xc3"}', b'{"t": "b"}', b'"c"', b'{"t": "d"}'], None),
        ("a.csv", [b"t", b"a", b"b\xff", b"b", b"c", b"d"], None),
        ("a.txt", [b"a", b"\xed\xa0\x80", b"b", b"c", b"d"], "text"),
    ],
)
def test_each_format_keeps_every_valid_line_around_a_bad_one(
    tmp_path: Path, name: str, lines: list[bytes], fmt: str | None
) -> None:
    path = tmp_path / name
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    got: list[BadLine] = []
    items = list(read_items(str(path), detect_format(str(path), fmt), got.append))
    assert len(items) == 4
    assert [b.line for b in got] == [3 if name.endswith(".csv") else 2]
    assert "is not UTF-8 text" in got[0].reason


def test_a_byte_order_mark_is_not_part_of_the_first_item(tmp_path: Path) -> None:
    items, bad = read(tmp_path, "a.jsonl", '\ufeff{"a": 1}\n')
    assert items == [(1, {"a": 1})]
    assert bad == []


def test_json_nested_too_deeply_or_with_huge_numbers_is_a_bad_line(tmp_path: Path) -> None:
    text = "[" * 100_000 + "]" * 100_000 + "\n" + "1" * 5000 + "\n" + '{"ok": 1}\n'
    items, bad = read(tmp_path, "a.jsonl", text)
    assert items == [(3, {"ok": 1})]
    assert [line for line, _ in bad] == [1, 2]


def test_missing_input_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"input file .*nope.txt not found"):
        read_items(str(tmp_path / "nope.txt"), "text", lambda b: None)
    with pytest.raises(ConfigError, match="is a directory"):
        read_items(str(tmp_path), "text", lambda b: None)


def test_stdin_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"k": 1}\n'))
    assert [i.value for i in read_items("-", "jsonl", lambda b: None)] == [{"k": 1}]
