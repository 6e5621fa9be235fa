"""The one JSON-lines reader: a last line cut off mid-write is skipped (and can be repaired),
damage anywhere else is an error naming the file and line."""

from __future__ import annotations

import json

import pytest

from spo_agents.errors import SPOError, TrajectoryError
from spo_agents.files import read_jsonl_records, repair_torn_tail


def lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def test_complete_lines_are_read_in_order_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(lines({"a": 1}) + "\n  \n" + lines([2, 3], "x"))
    assert list(read_jsonl_records(path)) == [{"a": 1}, [2, 3], "x"]


def test_a_last_line_cut_mid_write_is_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(lines({"step": 1}, {"step": 2}) + '{"step": 3, "lo')
    assert list(read_jsonl_records(path)) == [{"step": 1}, {"step": 2}]


def test_a_complete_last_line_without_its_newline_is_read(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(lines({"step": 1}) + '{"step": 2}')
    assert list(read_jsonl_records(path)) == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize(
    "text, bad_line",
    [
        (lines({"a": 1}) + '{"a": \n' + lines({"a": 3}), 2),  # damage before the end
        (lines({"a": 1}) + '{"a": \n', 2),  # a last line that ended: not a torn write
        (lines({"a": 1}) + "\n" + '{"a": \n' + lines({"a": 3}), 3),  # line numbers count blank lines
    ],
)
def test_any_other_broken_line_raises_the_callers_error_with_file_and_line(tmp_path, text, bad_line):
    path = tmp_path / "a.jsonl"
    path.write_text(text)
    with pytest.raises(SPOError, match=f"a.jsonl:{bad_line}: not valid JSON"):
        list(read_jsonl_records(path))
    with pytest.raises(TrajectoryError):
        list(read_jsonl_records(path, error=TrajectoryError))


def test_bytes_that_are_not_utf8_are_a_broken_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": "caf\xe9"}\n' + lines({"a": 2}).encode())
    with pytest.raises(SPOError, match="a.jsonl:1:"):
        list(read_jsonl_records(path))


@pytest.mark.parametrize(
    "before, after",
    [
        ('{"a": 1}\n{"b": 2}', '{"a": 1}\n{"b": 2}\n'),  # complete record, newline not written
        ('{"a": 1}\n{"b": 2', '{"a": 1}\n'),  # cut mid-record
        ('{"b": 2', ""),  # the only line, cut
        ('{"a": 1}\n', '{"a": 1}\n'),  # nothing to do
        ("", ""),
    ],
)
def test_repair_ends_the_file_on_a_newline(tmp_path, before, after):
    path = tmp_path / "t.jsonl"
    path.write_text(before)
    repair_torn_tail(path)
    assert path.read_text() == after
    with open(path, "a") as f:
        f.write(lines({"c": 3}))
    assert list(read_jsonl_records(path))[-1] == {"c": 3}
