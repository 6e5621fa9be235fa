"""Problem sources: procedural tiers, files (DAPO layout included), datasets, splits, bad rows."""

from __future__ import annotations

import json
import re

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


# --- procedural: arith-hard ----------------------------------------------------------------
def _hard_value(p):
    """The answer computed from the question text alone: the bare expression after `What is`, or
    the word problem's arithmetic (boxes x pens; rows x chairs + extra chairs)."""
    nums = [int(n) for n in re.findall(r"\d+", p.prompt)]
    if p.prompt.startswith("A shop has"):
        return nums[0] * nums[1]
    if p.prompt.startswith("A hall has"):
        return nums[0] * nums[1] + nums[2]
    m = re.fullmatch(r"What is ([\d ()+*-]+)\?", p.prompt)
    assert m, p.prompt
    return eval(m.group(1), {"__builtins__": {}})  # digits, spaces, parentheses and + - * only


def _hard_twin_key(p):
    """What a problem is up to swapping the operands of + and *: the operation's shape and the
    operands, with the operands of each commutative operation sorted."""
    n = [int(x) for x in re.findall(r"\d+", p.prompt)]
    text = p.prompt
    if text.startswith("A shop has") or re.fullmatch(r"What is \d+ \* \d+\?", text):
        return ("a*b", tuple(sorted(n)))
    if text.startswith("A hall has") or re.fullmatch(r"What is \d+ \* \d+ \+ \d+\?", text):
        return ("a*b+c", tuple(sorted(n[:2])), n[2])
    if re.fullmatch(r"What is \d+ \* \d+ - \d+ \* \d+\?", text):
        return ("a*b-c*d", tuple(sorted(n[:2])), tuple(sorted(n[2:])))
    if re.fullmatch(r"What is \(\d+ \+ \d+\) \* \d+\?", text):
        return ("(a+b)*c", tuple(sorted(n[:2])), n[2])
    raise AssertionError(f"unexpected question {text!r}")


def test_arith_hard_answers_match_an_independent_computation():
    kinds = set()
    for split in ("train", "test"):
        for p in load_problems("procedural:arith-hard", split):
            assert p.answer == str(_hard_value(p)), p
            kinds.add(p.metadata["kind"])
    assert kinds == {"mul-add", "mul-sub-mul", "paren-mul", "mul3", "word-boxes", "word-rows"}


def test_arith_hard_splits_are_disjoint_also_under_operand_swaps():
    # Large sets, so that a split by the literal text would put many swapped twins across splits
    # (each 2-digit product has its twin among ~8,000 ordered pairs).
    train = load_problems("procedural:arith-hard", "train", size=20_000)
    test = load_problems("procedural:arith-hard", "test", size=1_000)
    assert not set(train.ids) & set(test.ids)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    train_keys = {_hard_twin_key(p) for p in train}
    test_keys = [_hard_twin_key(p) for p in test]
    assert not train_keys & set(test_keys)
    assert len(set(test_keys)) == len(test_keys)  # a set holds one problem of each twin pair
    assert len(train_keys) == len(train)
    # not vacuous: train holds over half of the 4,095 products of two 2-digit numbers (word-boxes),
    # so a split that ignored swaps would send the twins of about half the test word-boxes to train
    two_digit_products = {k for k in train_keys if k[0] == "a*b" and k[1][1] < 100}
    assert len(two_digit_products) > 2000


def test_arith_hard_is_deterministic_by_seed_with_stable_ids():
    a = load_problems("procedural:arith-hard", "train", seed=3, size=60)
    clear_cache()
    b = load_problems("procedural:arith-hard", "train", seed=3, size=60)
    c = load_problems("procedural:arith-hard", "train", seed=4, size=60)
    assert a is not b and [(p.id, p.prompt, p.answer) for p in a] == [(p.id, p.prompt, p.answer) for p in b]
    assert a.ids != c.ids and len(set(a.ids)) == 60
    # ids name the kind and the operands in the order the question gives them, and do not move
    # between versions (the stream is a hash of seed and index, not a library RNG)
    assert load_problems("procedural:arith-hard", "train", seed=0, size=5).ids == [
        "arith-hard/mul-add/57-43-208",
        "arith-hard/mul-sub-mul/44-99-38-44",
        "arith-hard/mul3/409-29",
        "arith-hard/word-boxes/12-43",
        "arith-hard/word-rows/72-55-29",
    ]
    for p in a:
        assert p.id.split("/")[1] == p.metadata["kind"]
        assert p.id.split("/")[2].split("-") == re.findall(r"\d+", p.prompt)


def test_arith_hard_mixes_the_kinds_evenly_in_the_test_split():
    test = load_problems("procedural:arith-hard", "test")
    assert len(test) == 200
    counts = {}
    for p in test:
        counts[p.metadata["kind"]] = counts.get(p.metadata["kind"], 0) + 1
    assert len(counts) == 6 and min(counts.values()) >= 20


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
    s = load_problems(
        f"jsonl:{path}", "train", fields={"id": "uid", "prompt": "q.text", "answer": "sol.final"}, test_fraction=0.0
    )
    assert [(p.id, p.prompt, p.answer) for p in s][:2] == [("0", "What is 0?", "0"), ("1", "What is 1?", "1")]
    numbered = load_problems(
        f"jsonl:{path}", "train", fields=Fields(id=None, prompt="q.text", answer="sol.final"), test_fraction=0.0
    )
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
    with pytest.raises(
        DatasetError, match=r"x.jsonl:1: no prompt field `prompt` \(fields found: \['question', 'solution'\]\)"
    ):
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
    s = load_problems(
        "hf:json",
        "train",
        test_fraction=0.0,
        source_options={"data_files": str(path), "cache_dir": str(tmp_path / "c")},
    )
    assert len(s) == 6 and s.by_id["id-3"].answer == "3"
    with pytest.raises(DatasetError, match="hub access"):
        load_problems("hf:no-such-org/no-such-dataset-xyz", "train")
