"""Problem files with bad or repeated input: errors that name the file and the fix, counted
repeats, split `all`, and the one line each load prints."""

from __future__ import annotations

import json

import pytest

from spo_agents.envs.problems import ALL, clear_cache, content_split, load_problems
from spo_agents.errors import DatasetError


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(n):
    return [{"id": i, "prompt": f"What is {i} + {i + 7}?", "answer": str(2 * i + 7)} for i in range(n)]


def test_non_utf8_json_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes('[{"prompt": "Combien font 2 + 2 ? caf\xe9", "answer": "4"}]'.encode("latin-1"))
    with pytest.raises(DatasetError) as e:
        load_problems(dataset_path=path, split=ALL)
    assert str(path) in str(e.value) and "not UTF-8" in str(e.value) and "0xe9" in str(e.value)
    assert "iconv" in str(e.value)


def test_corrupt_parquet_file_is_one_dataset_error(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1" + b"\x00garbage" * 50)
    with pytest.raises(DatasetError, match="not a readable Parquet file") as e:
        load_problems(dataset_path=path, split=ALL)
    assert str(path) in str(e.value)


def test_invalid_utf8_in_a_jsonl_prompt_is_a_bad_row_not_replaced(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"id": "a", "prompt": "What is 1 + 1?", "answer": "2"}).encode()
    bad = b'{"id": "b", "prompt": "What is caf\xe9 + 1?", "answer": "2"}'
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(DatasetError) as e:
        load_problems(dataset_path=path, split=ALL)
    assert f"{path}:2:" in str(e.value) and "not UTF-8" in str(e.value)
    kept = load_problems(dataset_path=path, split=ALL, skip_bad=True)
    assert kept.ids == ["a"] and kept.report.skipped_bad == 1
    assert all("\ufffd" not in p.prompt for p in kept)


@pytest.mark.parametrize("other_id", [1, "1"])
def test_an_id_reused_for_different_content_is_an_error(tmp_path, other_id):
    path = write_jsonl(
        tmp_path / "dup.jsonl",
        [
            {"id": 1, "prompt": "What is 2 + 2?", "answer": "4"},
            {"id": other_id, "prompt": "What is 3 + 3?", "answer": "6"},
        ],
    )
    with pytest.raises(DatasetError) as e:
        load_problems(dataset_path=path, split=ALL)
    assert f"{path}:2:" in str(e.value) and "id `1` is already used by line 1" in str(e.value)
    assert "skip_bad" in str(e.value)
    kept = load_problems(dataset_path=path, split=ALL, skip_bad=True)
    assert [p.prompt for p in kept] == ["What is 2 + 2?"]
    assert kept.report.skipped_bad == 1 and kept.report.duplicates == 0


def test_exact_repeats_are_kept_once_and_counted(tmp_path, capsys):
    base = rows(3)
    path = write_jsonl(tmp_path / "rep.jsonl", base + base + [dict(base[0], id="other-id")])
    got = load_problems(dataset_path=path, split=ALL)
    assert got.ids == ["0", "1", "2"]
    assert got.report.rows == 7 and got.report.duplicates == 4 and got.report.skipped_bad == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "7 rows read" in line and "3 problems" in line and "4 repeat" in line


def test_split_all_keeps_every_row_and_the_splits_partition_it(tmp_path, capsys):
    path = write_jsonl(tmp_path / "held.jsonl", rows(50))
    every = load_problems(dataset_path=path, split=ALL)
    test = load_problems(dataset_path=path, split="test")
    train = load_problems(dataset_path=path, split="train")
    assert len(every) == 50 and every.split == ALL
    expected_test = {str(r["id"]) for r in rows(50) if content_split(r["prompt"], r["answer"], 0.1) == "test"}
    assert set(test.ids) == expected_test
    assert set(test.ids) | set(train.ids) == set(every.ids) and not set(test.ids) & set(train.ids)
    assert test.report.rows == 50 and test.report.other_split == 50 - len(expected_test)
    err = capsys.readouterr().err
    assert f"50 rows read, {len(expected_test)} problems in split `test`" in err
    assert "`split=all` keeps every row" in err


def test_split_all_is_refused_for_generated_sources():
    with pytest.raises(DatasetError, match="generated per split"):
        load_problems("procedural:arith", ALL)


def test_an_unknown_split_names_all(tmp_path):
    with pytest.raises(DatasetError, match="`all`"):
        load_problems("procedural:arith", "validation")
