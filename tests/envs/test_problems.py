"""Problem sources: procedural tiers, files (DAPO layout included), datasets, splits, bad rows."""

from __future__ import annotations

import json

import pytest

from spo_agents.envs.problems import DAPO_PREFIX, DAPO_SUFFIX, Fields, clear_cache, content_split, load_problems
from spo_agents.errors import DatasetError


# --- procedural: arith ---------------------------------------------------------------------
def test_arith_splits_are_disjoint_and_cover_the_pool():
    train = load_problems("procedural:arith", "train")
    test = load_problems("procedural:arith", "test")
    assert not set(train.ids) & set(test.ids)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len(train) + len(test) == 3 * 90 * 90
    assert 0.07 < len(test) / (len(train) + len(test)) < 0.13
    # no test problem is a training problem with its operands swapped (`*` and `+` commute)
    def key(q):
        m = q.metadata
        return (m["op"], *sorted((m["a"], m["b"]))) if m["op"] in ("mul", "add") else (m["op"], m["a"], m["b"])

    assert not {key(q) for q in train} & {key(q) for q in test}


def test_arith_problems_are_right_and_ids_are_readable():
    ops = {"mul": lambda a, b: a * b, "add": lambda a, b: a + b, "sub": lambda a, b: a - b}
    for p in load_problems("procedural:arith", "test"):
        m = p.metadata
        assert p.answer == str(ops[m["op"]](m["a"], m["b"]))
        sym = {"mul": "x", "add": "+", "sub": "-"}[m["op"]]
        assert p.id == f"arith/{m['op']}/{m['a']}{sym}{m['b']}"
        assert str(m["a"]) in p.prompt and str(m["b"]) in p.prompt


def test_arith_is_deterministic_by_seed_and_cached():
    a = load_problems("procedural:arith", "train", seed=1, size=50)
    b = load_problems("procedural:arith", "train", seed=1, size=50)
    c = load_problems("procedural:arith", "train", seed=2, size=50)
    assert a is b  # one shared set, not regenerated
    assert a.ids != c.ids and len(a) == len(c) == 50
    clear_cache()
    assert load_problems("procedural:arith", "train", seed=1, size=50).ids == a.ids


def test_arith_mul_tier_holds_only_multiplications():
    s = load_problems("procedural:arith-mul", "train", size=100)
    assert {p.metadata["op"] for p in s} == {"mul"}


def test_content_split_is_stable():
    assert content_split("What is 1 + 1?", "2", 0.5) == content_split("What is 1 + 1?", "2", 0.5)
    share = sum(content_split(f"q{i}", i, 0.2) == "test" for i in range(5000)) / 5000
    assert 0.17 < share < 0.23


# --- procedural: reasoning-gym tiers --------------------------------------------------------
def test_reasoning_gym_tier_is_deterministic_with_disjoint_splits():
    train = load_problems("procedural:basic_arithmetic", "train", seed=0, size=40)
    test = load_problems("procedural:basic_arithmetic", "test", seed=0, size=10)
    again = load_problems("reasoning-gym:basic_arithmetic", "train", seed=0, size=40)
    assert len(train) == 40 and len(test) == 10
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert [p.prompt for p in train] == [p.prompt for p in again]
    assert all(p.id.startswith("rg:basic_arithmetic:") for p in train)
    assert train.problems[0].metadata["tier"] == 1


def test_unknown_tier_suggests_the_nearest():
    with pytest.raises(DatasetError, match="Did you mean `simple_equations`"):
        load_problems("procedural:simple_equation", "train", size=5)
    with pytest.raises(DatasetError, match="unknown problem source"):
        load_problems("procedurl:arith")
    with pytest.raises(DatasetError, match="`split` must be one of"):
        load_problems("procedural:arith", "validation")


# --- files --------------------------------------------------------------------------------
def dapo_row(i, question, answer, source="math_dapo"):
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": DAPO_PREFIX + f"Solve: {question}" + DAPO_SUFFIX}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lang"},
        "extra_info": {"index": f"id-{i}"},
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dapo_layout_loads_from_jsonl_and_parquet(tmp_path):
    rows = [dapo_row(i, f"{i} + {i}", str(2 * i)) for i in range(30)]
    rows.append(dapo_row(0, "0 + 0", "0"))  # DAPO-Math-17k repeats problems
    jsonl = write_jsonl(tmp_path / "dapo.jsonl", rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        s = load_problems(dataset_path=str(path), split="train", test_fraction=0.0)
        assert len(s) == 30 and s.report.duplicates == 1
        p = s.by_id["id-7"]
        assert p.prompt == "Solve: 7 + 7" and p.answer == "14"
        assert p.metadata["data_source"] == "math_dapo" and p.metadata["ability"] == "MATH"


def test_explicit_fields_with_dotted_paths(tmp_path):
    rows = [{"q": {"text": f"What is {i}?"}, "sol": {"final": i}, "uid": i} for i in range(5)]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    s = load_problems(f"jsonl:{path}", "train", fields={"id": "uid", "prompt": "q.text", "answer": "sol.final"}, test_fraction=0.0)
    assert [(p.id, p.prompt, p.answer) for p in s][:2] == [("0", "What is 0?", "0"), ("1", "What is 1?", "1")]
    numbered = load_problems(f"jsonl:{path}", "train", fields=Fields(id=None, prompt="q.text", answer="sol.final"), test_fraction=0.0)
    assert numbered.problems[0].id == "custom:1"


def test_a_bad_row_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"\n{"prompt": "c"}\n{"prompt": "d", "answer": "4"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        load_problems(dataset_path=path, test_fraction=0.0)
    s = load_problems(dataset_path=path, test_fraction=0.0, skip_bad=True)
    assert [p.prompt for p in s] == ["a", "d"]
    assert s.report.skipped_bad == 2 and s.report.errors[1].endswith("set `fields`") and ":3:" in s.report.errors[1]


def test_missing_answer_field_says_which_fields_exist(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "solution": "1"}])
    with pytest.raises(DatasetError, match=r"x.jsonl:1: no prompt field `prompt` \(fields found: \['question', 'solution'\]\)"):
        load_problems(dataset_path=path)


def test_single_file_is_partitioned_into_disjoint_splits(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"id": i, "prompt": f"q{i}", "answer": str(i)} for i in range(400)])
    train = load_problems(dataset_path=path, split="train", test_fraction=0.25)
    test = load_problems(dataset_path=path, split="test", test_fraction=0.25)
    assert len(train) + len(test) == 400 and not set(train.ids) & set(test.ids)
    assert 60 < len(test) < 140


def test_split_pattern_and_mapping(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"id": "a", "prompt": "p", "answer": "1"}])
    write_jsonl(tmp_path / "test.jsonl", [{"id": "b", "prompt": "p2", "answer": "2"}])
    assert load_problems(dataset_path=str(tmp_path / "{split}.jsonl"), split="test").ids == ["b"]
    mapping = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    assert load_problems(dataset_path=mapping, split="train").ids == ["a"]
    with pytest.raises(DatasetError, match="does not exist"):
        load_problems(dataset_path=str(tmp_path / "nope.jsonl"))


def test_an_edited_file_is_read_again(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "prompt": "p", "answer": "1"}])
    assert load_problems(dataset_path=path, test_fraction=0.0).ids == ["a"]
    write_jsonl(path, [{"id": "a", "prompt": "p", "answer": "1"}, {"id": "b", "prompt": "q", "answer": "2"}])
    assert load_problems(dataset_path=path, test_fraction=0.0).ids == ["a", "b"]


def test_hf_source_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_jsonl(tmp_path / "hf.jsonl", [dapo_row(i, str(i), str(i)) for i in range(6)])
    s = load_problems("hf:json", "train", test_fraction=0.0, source_options={"data_files": str(path), "cache_dir": str(tmp_path / "c")})
    assert len(s) == 6 and s.by_id["id-3"].answer == "3"
    with pytest.raises(DatasetError, match="hub access"):
        load_problems("hf:no-such-org/no-such-dataset-xyz", "train")
