"""Problem sources: where an environment's problems come from.

A source string names where problems come from; `load_problems` turns it into a `ProblemSet`
for one split. Sets are cached per (source, split, seed, size, options), so the many env
instances of a run (one per in-flight episode) share one set instead of regenerating it.

Sources
-------
`procedural:arith` (tier 0, the CPU default)
    Two-digit multiplications, additions and subtractions (`What is 37 * 48?`), ids such as
    `arith/mul/37x48`. Small enough for SmolLM2-135M with the tool to solve part of them, so
    training visibly moves the reward (MACHINE.md). `procedural:arith-mul` keeps only the
    multiplications. Swapped operands of `*` and `+` are kept in the same split.
`procedural:arith-hard` (tier 1)
    Where the default's two-digit arithmetic is solved within a few steps, this tier keeps
    SmolLM2-135M learning: `a * b + c`, `a * b - c * d`, `(a + b) * c`, three-digit by two-digit
    products, and two-step word problems (boxes of pens; rows of chairs plus extra chairs), an
    equal share each. Ids name the kind and the operands (`arith-hard/mul-add/57-43-208`). A set is
    the first `size` problems (default 2000 train / 200 test) of a stream hashed from (seed,
    index); the split keys on the canonical expression, so operand-swapped twins, and a word
    problem and a bare expression that compute the same thing, share a split.
`procedural:<tier>` / `reasoning-gym:<dataset>`
    Harder procedural tiers from the `reasoning-gym` generators: `basic_arithmetic` (tier 1),
    `simple_equations` (tier 2), `gsm_symbolic` (tier 3), or any other reasoning-gym dataset by
    name. Ids are `rg:<dataset>:<seed>:<index>`. Generator settings go in `source_options`.
`jsonl:<path>`, `parquet:<path>`, or `dataset_path=<path>`
    Local files, one problem per row. Field names are configurable (`fields`); the DAPO-Math-17k
    layout (`prompt` as chat messages, `reward_model.ground_truth`, `data_source`,
    `extra_info.index`) is recognised on its own, and its "end with `Answer:`" instructions are
    removed from the prompt (environments ask for `\\boxed{}`). `dataset_path` may also be a `{split}`
    pattern (`data/{split}.jsonl`) or a `{"train": ..., "test": ...}` mapping.
`hf:<name>[:<config>]`
    A Hugging Face `datasets` dataset (needs hub access or a local cache), with the same fields.

Splits
------
Generators and single files are partitioned into `train` and `test` by a hash of each problem's
content (prompt and answer), so the splits are disjoint whatever the seed: the same question
lands in the same split wherever it comes from. `test_fraction` (default 0.1) sets the share.
The seed chooses which problems (and in which order) a set of `size` holds.

Bad rows
--------
A row that is not valid JSON, lacks the prompt or answer, or has the wrong types raises
`DatasetError` naming the file and line; with `skip_bad=True` it is skipped and counted in
`ProblemSet.report`. Rows that repeat an earlier id or the same (prompt, answer) are dropped
and counted as duplicates (DAPO-Math-17k repeats each problem many times).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_agents.errors import DatasetError, did_you_mean
from spo_agents.types import Problem

SPLITS = ("train", "test")
DEFAULT_SOURCE = "procedural:arith"

#: Procedural tiers, easiest first. The `arith` tiers are built in; the others are reasoning-gym datasets.
TIERS: dict[str, int] = {
    "arith": 0,
    "arith-mul": 0,
    "arith-hard": 1,
    "basic_arithmetic": 1,
    "simple_equations": 2,
    "gsm_symbolic": 3,
}

#: Default set size of reasoning-gym tiers when `size` is not given, per split.
RG_DEFAULT_SIZE = {"train": 2000, "test": 200}
#: Distance between the reasoning-gym seeds of consecutive `seed` values.
RG_SEED_STRIDE = 1_000_003


# --------------------------------------------------------------------------------------------
# Problem sets
# --------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What loading a source did: rows read, problems kept, rows skipped and why."""

    rows: int = 0
    loaded: int = 0
    skipped_bad: int = 0
    duplicates: int = 0
    other_split: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skipped rows, `file:line: why`

    def note_bad(self, where: str) -> None:
        self.skipped_bad += 1
        if len(self.errors) < 10:
            self.errors.append(where)


@dataclass
class ProblemSet:
    """An immutable, shared list of problems with an id index.

    Env instances share one `ProblemSet` (treat `problems` as read-only)."""

    source: str
    split: str
    problems: list[Problem]
    report: LoadReport = field(default_factory=LoadReport)

    def __post_init__(self) -> None:
        self.by_id: dict[str, Problem] = {}
        for p in self.problems:
            if p.id in self.by_id:
                raise DatasetError(
                    f"problem ids must be unique within a set, `{p.id}` appears twice in `{self.source}`"
                )
            self.by_id[p.id] = p

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.problems]


def content_split(prompt: str, answer: Any, test_fraction: float) -> str:
    """`train` or `test`, from a stable hash of the problem's content."""
    digest = hashlib.sha256(f"{prompt}\x00{answer}".encode("utf-8", errors="replace")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"`split` must be one of `train`, `test`, got `{split}`.{did_you_mean(split, SPLITS)}")


# --------------------------------------------------------------------------------------------
# Procedural: two-digit arithmetic (tier 0)
# --------------------------------------------------------------------------------------------
_ARITH_OPS = {
    "mul": ("*", "x", lambda a, b: a * b),
    "add": ("+", "+", lambda a, b: a + b),
    "sub": ("-", "-", lambda a, b: a - b),
}


@functools.lru_cache(maxsize=8)
def _arith_split_pool(ops: tuple[str, ...], split: str, test_fraction: float) -> tuple[Problem, ...]:
    return tuple(p for p in _arith_pool(ops) if content_split(_arith_key(p), p.answer, test_fraction) == split)


def _arith_key(p: Problem) -> str:
    """What decides the split: `a * b` and `b * a` (and `a + b`, `b + a`) are one problem, so
    they always land in the same split (otherwise the test set holds swapped twins of training
    problems)."""
    op, a, b = p.metadata["op"], p.metadata["a"], p.metadata["b"]
    if op in ("mul", "add"):
        a, b = min(a, b), max(a, b)
    return f"arith/{op}/{a}/{b}"


def _arith_pool(ops: Sequence[str]) -> list[Problem]:
    pool = []
    for op in ops:
        sym, id_sym, fn = _ARITH_OPS[op]
        for a in range(10, 100):
            for b in range(10, 100):
                pool.append(
                    Problem(
                        id=f"arith/{op}/{a}{id_sym}{b}",
                        prompt=f"What is {a} {sym} {b}?",
                        answer=str(fn(a, b)),
                        metadata={"source": "arith", "tier": 0, "op": op, "a": a, "b": b},
                    )
                )
    return pool


def _arith(split: str, seed: int, size: int | None, test_fraction: float, ops: Sequence[str]) -> ProblemSet:
    import numpy as np

    pool = _arith_split_pool(tuple(ops), split, test_fraction)
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = [pool[i] for i in order[: size if size is not None else len(pool)]]
    name = "procedural:arith" if len(ops) == 3 else "procedural:arith-mul"
    return ProblemSet(name, split, chosen, LoadReport(rows=len(pool), loaded=len(chosen)))


# --------------------------------------------------------------------------------------------
# Procedural: multi-step arithmetic and two-step word problems (`arith-hard`)
# --------------------------------------------------------------------------------------------
#: An expression tree: an operand name (`"a"`) or `(op, left, right)` with op in `+ - *`.
Expr = str | tuple[str, "Expr", "Expr"]

_EXPR_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
_COMMUTATIVE = ("+", "*")


@dataclass(frozen=True)
class HardKind:
    """One kind of `arith-hard` problem: a question template over operands with ranges, and the
    expression that answers it."""

    name: str
    template: str  # `str.format` fields are the operand names
    ranges: tuple[tuple[str, int, int], ...]  # (operand, low, high), both ends included
    expr: Expr


#: The kinds, in the order the generator cycles through them (an equal share each).
HARD_KINDS: tuple[HardKind, ...] = (
    HardKind(
        "mul-add",
        "What is {a} * {b} + {c}?",
        (("a", 10, 99), ("b", 10, 99), ("c", 100, 999)),
        ("+", ("*", "a", "b"), "c"),
    ),
    HardKind(
        "mul-sub-mul",
        "What is {a} * {b} - {c} * {d}?",
        (("a", 10, 99), ("b", 10, 99), ("c", 10, 99), ("d", 10, 99)),
        ("-", ("*", "a", "b"), ("*", "c", "d")),
    ),
    HardKind(
        "paren-mul",
        "What is ({a} + {b}) * {c}?",
        (("a", 10, 99), ("b", 10, 99), ("c", 10, 99)),
        ("*", ("+", "a", "b"), "c"),
    ),
    HardKind("mul3", "What is {a} * {b}?", (("a", 100, 999), ("b", 10, 99)), ("*", "a", "b")),
    HardKind(
        "word-boxes",
        "A shop has {a} boxes with {b} pens in each box. How many pens does the shop have?",
        (("a", 10, 99), ("b", 10, 99)),
        ("*", "a", "b"),
    ),
    HardKind(
        "word-rows",
        "A hall has {a} rows of {b} chairs and {c} extra chairs. How many chairs are there in the hall?",
        (("a", 10, 99), ("b", 10, 99), ("c", 10, 99)),
        ("+", ("*", "a", "b"), "c"),
    ),
)
#: Default set size of `arith-hard` when `size` is not given, per split.
HARD_DEFAULT_SIZE = {"train": 2000, "test": 200}


def eval_expr(expr: Expr, values: Mapping[str, int]) -> int:
    """The value of an expression tree for the given operands."""
    if isinstance(expr, str):
        return values[expr]
    op, left, right = expr
    return _EXPR_OPS[op](eval_expr(left, values), eval_expr(right, values))


def canonical_expr(expr: Expr, values: Mapping[str, int]) -> str:
    """The expression with its operands filled in, the two sides of every `+` and `*` in a fixed
    order, so `37 * 48 + 125` and `125 + 48 * 37` give the same text (they are one problem)."""
    if isinstance(expr, str):
        return str(values[expr])
    op, left, right = expr
    lt, rt = canonical_expr(left, values), canonical_expr(right, values)
    if op in _COMMUTATIVE and rt < lt:
        lt, rt = rt, lt
    return f"({lt} {op} {rt})"


def _hard_item(seed: int, index: int) -> Problem:
    """Item `index` of the `arith-hard` stream of `seed`: a function of (seed, index) alone,
    through SHA-256, so sets do not depend on a library's random number generator."""
    kind = HARD_KINDS[index % len(HARD_KINDS)]
    digest = hashlib.sha256(f"arith-hard\x00{seed}\x00{index}".encode()).digest()
    values = {}
    for j, (name, lo, hi) in enumerate(kind.ranges):
        values[name] = lo + int.from_bytes(digest[4 * j : 4 * j + 4], "big") % (hi - lo + 1)
    operands = [values[name] for name, _, _ in kind.ranges]
    return Problem(
        id=f"arith-hard/{kind.name}/{'-'.join(map(str, operands))}",
        prompt=kind.template.format(**values),
        answer=str(eval_expr(kind.expr, values)),
        metadata={
            "source": "arith-hard",
            "tier": TIERS["arith-hard"],
            "kind": kind.name,
            "operands": dict(values),
            "expression": canonical_expr(kind.expr, values),
        },
    )


def _arith_hard(split: str, seed: int, size: int | None, test_fraction: float) -> ProblemSet:
    """The first `size` distinct problems of `split` in the stream of `seed`. The split is decided
    by the canonical expression, so operand-swapped twins (and a word problem and a bare
    expression that compute the same thing) always share a split; a set holds one of each."""
    want = size if size is not None else HARD_DEFAULT_SIZE[split]
    share = test_fraction if split == "test" else 1.0 - test_fraction
    if share <= 0:
        raise DatasetError(
            f"`test_fraction` {test_fraction} leaves no problems for split `{split}`; use a value in (0, 1)"
        )
    cap = int(want / share * 3) + 1000
    problems: list[Problem] = []
    seen: set[str] = set()
    report = LoadReport()
    for i in range(cap):
        p = _hard_item(seed, i)
        report.rows += 1
        key = p.metadata["expression"]
        if content_split(f"arith-hard/{key}", p.answer, test_fraction) != split:
            report.other_split += 1
            continue
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        problems.append(p)
        if len(problems) >= want:
            break
    if len(problems) < want:
        raise DatasetError(
            f"`procedural:arith-hard` yielded only {len(problems)} `{split}` problems out of {cap} generated; "
            "ask for fewer (`num_problems`)"
        )
    report.loaded = len(problems)
    return ProblemSet("procedural:arith-hard", split, problems, report)


# --------------------------------------------------------------------------------------------
# Procedural: reasoning-gym tiers
# --------------------------------------------------------------------------------------------
def _reasoning_gym(
    name: str, split: str, seed: int, size: int | None, test_fraction: float, options: Mapping[str, Any]
) -> ProblemSet:
    try:
        import reasoning_gym
    except ImportError as e:  # pragma: no cover - a core dependency
        raise DatasetError(
            "procedural tiers beyond `arith` need `reasoning-gym`: run `pip install reasoning-gym`"
        ) from e
    want = size if size is not None else RG_DEFAULT_SIZE[split]
    share = test_fraction if split == "test" else 1.0 - test_fraction
    if share <= 0:
        raise DatasetError(
            f"`test_fraction` {test_fraction} leaves no problems for split `{split}`; use a value in (0, 1)"
        )
    # Item i of a reasoning-gym dataset depends only on (seed + i), so one dataset is read in
    # order (items of the other split skipped: content never crosses splits) and seeds are
    # spread far apart so that sets of different `seed`s do not share a run of items.
    rg_seed = seed * RG_SEED_STRIDE
    cap = int(want / share * 3) + 200
    try:
        data = reasoning_gym.create_dataset(name, size=cap, seed=rg_seed, **dict(options))
    except Exception as e:
        raise DatasetError(f"cannot create reasoning-gym dataset `{name}` with {dict(options)}: {e}") from e
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    report = LoadReport()
    for i in range(cap):
        item = data[i]
        report.rows += 1
        prompt, answer = str(item["question"]), str(item["answer"])
        if content_split(prompt, answer, test_fraction) != split:
            report.other_split += 1
            continue
        if (prompt, answer) in seen:
            report.duplicates += 1
            continue
        seen.add((prompt, answer))
        meta = {"source": f"reasoning-gym:{name}", "tier": TIERS.get(name), "rg_seed": rg_seed, "rg_index": i}
        problems.append(Problem(id=f"rg:{name}:{rg_seed}:{i}", prompt=prompt, answer=answer, metadata=meta))
        if len(problems) >= want:
            break
    if len(problems) < want and size is not None:
        raise DatasetError(
            f"reasoning-gym dataset `{name}` yielded only {len(problems)} distinct `{split}` problems out of "
            f"{cap} generated; ask for fewer (`num_problems`) or widen its settings (`source_options`)"
        )
    report.loaded = len(problems)
    return ProblemSet(f"reasoning-gym:{name}", split, problems, report)


def _rg_names() -> list[str]:
    try:
        import reasoning_gym.factory as factory

        return sorted(getattr(factory, "DATASETS", {}))
    except Exception:
        return []


# --------------------------------------------------------------------------------------------
# Files and datasets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fields:
    """Where a row keeps each part of a problem (dotted paths into nested fields).

    `id`: `None` numbers rows (`<file stem>:<line>`). `prompt`: a string, or a list of chat
    messages whose last `user` message is the question. `metadata`: fields copied into
    `Problem.metadata` (`None`: every top-level field not used above).
    """

    id: str | None = "id"
    prompt: str = "prompt"
    answer: str = "answer"
    metadata: tuple[str, ...] | None = None
    strip_prefix: str | None = None  # removed from the start of the prompt when present
    strip_suffix: str | None = None  # removed from the end of the prompt when present

    @classmethod
    def coerce(cls, value: Fields | Mapping[str, Any] | str | None) -> Fields | None:
        if value is None or isinstance(value, Fields):
            return value
        if isinstance(value, str):
            if value not in PRESETS:
                raise DatasetError(
                    f"unknown field preset `{value}`; known: {', '.join(sorted(PRESETS))}."
                    f"{did_you_mean(value, PRESETS)}"
                )
            return PRESETS[value]
        allowed = {"id", "prompt", "answer", "metadata", "strip_prefix", "strip_suffix"}
        unknown = set(value) - allowed
        if unknown:
            raise DatasetError(
                f"unknown key(s) {sorted(unknown)} in `fields`; allowed: {', '.join(f'`{k}`' for k in sorted(allowed))}"
            )
        d = dict(value)
        if d.get("metadata") is not None:
            d["metadata"] = tuple(d["metadata"])
        return cls(**d)


# DAPO-Math-17k wraps each question in instructions to end with "Answer: ..."; environments ask
# for `\boxed{}` instead, so the preset keeps the bare question.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

PRESETS: dict[str, Fields] = {
    "default": Fields(),
    "dapo": Fields(
        id="extra_info.index",
        prompt="prompt",
        answer="reward_model.ground_truth",
        metadata=("data_source", "ability"),
        strip_prefix=DAPO_PREFIX,
        strip_suffix=DAPO_SUFFIX,
    ),
}


def _dig(row: Mapping[str, Any], path: str) -> Any:
    cur: Any = row
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(path)
    return cur


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, Mapping) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
        raise ValueError("the prompt is a list of chat messages without a `user` message with text `content`")
    raise ValueError(f"the prompt must be a string or a list of chat messages, got {type(value).__name__}")


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a value read from Parquet (numpy scalars and arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _iter_rows(path: Path, kind: str) -> Iterator[tuple[int, Any]]:
    """(line number, row dict or an Exception for a row that could not be read)."""
    if kind == "jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, ValueError(f"not valid JSON ({e.msg} at column {e.colno})")
    elif kind == "json":
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: a `.json` problem file must hold a list of rows, got {type(rows).__name__}")
        yield from enumerate(rows, start=1)
    elif kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DatasetError(f"reading `{path}` needs `pyarrow`: run `pip install pyarrow`") from e
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    else:
        raise DatasetError(f"unknown file kind `{kind}` for `{path}`; use `.jsonl`, `.json` or `.parquet`")


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}.get(
        suffix, "jsonl"
    )


def rows_to_problems(
    rows: Iterable[tuple[int, Any]],
    *,
    where: str,
    stem: str,
    fields: Fields | None,
    split: str | None,
    test_fraction: float,
    size: int | None,
    skip_bad: bool,
    source: str,
) -> ProblemSet:
    """Turn numbered rows into a `ProblemSet` (shared by files and `datasets`).

    `split=None` keeps every row; otherwise rows are partitioned by content hash."""
    report = LoadReport()
    problems: list[Problem] = []
    seen_ids: set[str] = set()
    seen_content: set[tuple[str, str]] = set()
    for line, row in rows:
        report.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, Mapping):
                raise ValueError(f"a row must be an object, got {type(row).__name__}")
            f = fields or (PRESETS["dapo"] if "reward_model" in row else PRESETS["default"])
            try:
                prompt = _prompt_text(_dig(row, f.prompt))
            except KeyError:
                raise ValueError(f"no prompt field `{f.prompt}` (fields found: {sorted(row)}); set `fields`") from None
            if f.strip_prefix and prompt.startswith(f.strip_prefix):
                prompt = prompt[len(f.strip_prefix) :]
            if f.strip_suffix and prompt.endswith(f.strip_suffix):
                prompt = prompt[: -len(f.strip_suffix)]
            try:
                answer_raw = _dig(row, f.answer)
            except KeyError:
                raise ValueError(f"no answer field `{f.answer}` (fields found: {sorted(row)}); set `fields`") from None
            answer_raw = _plain(answer_raw)
            if answer_raw is None or isinstance(answer_raw, (dict, list)) and not answer_raw:
                raise ValueError(f"the answer field `{f.answer}` is empty")
            answer = answer_raw if isinstance(answer_raw, (list, dict)) else str(answer_raw)
            if not prompt.strip():
                raise ValueError(f"the prompt field `{f.prompt}` is empty")
            if f.id is not None:
                try:
                    pid = str(_plain(_dig(row, f.id)))
                except KeyError:
                    pid = f"{stem}:{line}"
            else:
                pid = f"{stem}:{line}"
            used = {f.prompt.split(".")[0], f.answer.split(".")[0]} | ({f.id.split(".")[0]} if f.id else set())
            keys = f.metadata if f.metadata is not None else tuple(k for k in row if k not in used)
            meta = {"source": source, "line": line}
            for k in keys:
                try:
                    meta[k] = _plain(_dig(row, k))
                except KeyError:
                    pass
        except ValueError as e:
            if not skip_bad:
                raise DatasetError(
                    f"{where}:{line}: {e}. Fix the row, or pass `skip_bad=True` to skip and count bad rows"
                ) from None
            report.note_bad(f"{where}:{line}: {e}")
            continue
        content = (prompt, json.dumps(answer, sort_keys=True) if not isinstance(answer, str) else answer)
        if pid in seen_ids or content in seen_content:
            report.duplicates += 1
            continue
        seen_ids.add(pid)
        seen_content.add(content)
        if split is not None and content_split(prompt, content[1], test_fraction) != split:
            report.other_split += 1
            continue
        problems.append(Problem(id=pid, prompt=prompt, answer=answer, metadata=meta))
        if size is not None and len(problems) >= size:
            break
    report.loaded = len(problems)
    return ProblemSet(source, split or "all", problems, report)


def _file_set(
    path_spec: str | os.PathLike | Mapping[str, Any],
    split: str,
    size: int | None,
    fields: Fields | None,
    test_fraction: float,
    skip_bad: bool,
    kind: str | None,
) -> ProblemSet:
    partition = True
    if isinstance(path_spec, Mapping):
        if split not in path_spec:
            raise DatasetError(
                f"`dataset_path` maps splits {sorted(path_spec)} but split `{split}` was requested; "
                f"add a `{split}` entry"
            )
        path_spec, partition = path_spec[split], False
    path_str = os.fspath(path_spec)
    if "{split}" in path_str:
        path_str, partition = path_str.format(split=split), False
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"problem file `{path}` does not exist; check `dataset_path` "
            "(a file, a `{split}` pattern or a split mapping)"
        )
    return rows_to_problems(
        _iter_rows(path, kind or _kind_of(path)),
        where=str(path),
        stem=path.stem,
        fields=fields,
        split=split if partition else None,
        test_fraction=test_fraction,
        size=size,
        skip_bad=skip_bad,
        source=f"file:{path.name}",
    )


def _hf_set(
    name: str,
    split: str,
    size: int | None,
    fields: Fields | None,
    test_fraction: float,
    skip_bad: bool,
    options: Mapping[str, Any],
) -> ProblemSet:
    try:
        import datasets
    except ImportError as e:
        raise DatasetError("`hf:` sources need the `datasets` package: run `pip install datasets`") from e
    repo, _, config = name.partition(":")
    options = dict(options)
    hf_split = options.pop("hf_split", None)
    partition = hf_split is None
    try:
        ds = datasets.load_dataset(repo, config or None, split=hf_split or "train", **options)
    except Exception as e:
        raise DatasetError(
            f"cannot load Hugging Face dataset `{repo}`{f' ({config})' if config else ''}: {e}. This needs hub access "
            f"(or a local cache); without it, download the file elsewhere and use `dataset_path=`"
        ) from e
    return rows_to_problems(
        enumerate(ds, start=1),
        where=f"hf:{name}",
        stem=repo.split("/")[-1],
        fields=fields,
        split=split if partition else None,
        test_fraction=test_fraction,
        size=size,
        skip_bad=skip_bad,
        source=f"hf:{name}",
    )


# --------------------------------------------------------------------------------------------
# The entry point, with a per-process cache
# --------------------------------------------------------------------------------------------
_CACHE: dict[Any, ProblemSet] = {}
_CACHE_LOCK = threading.Lock()


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _file_stamp(path_spec: Any, split: str) -> Any:
    """Paths with modification times, so an edited file is read again."""
    paths = []
    for p in path_spec.values() if isinstance(path_spec, Mapping) else [path_spec]:
        s = os.fspath(p).format(split=split) if "{split}" in os.fspath(p) else os.fspath(p)
        try:
            st = os.stat(s)
            paths.append((s, st.st_mtime_ns, st.st_size))
        except OSError:
            paths.append((s, None, None))
    return tuple(paths)


def load_problems(
    source: str | None = None,
    split: str = "train",
    *,
    seed: int = 0,
    size: int | None = None,
    dataset_path: str | os.PathLike | Mapping[str, Any] | None = None,
    fields: Fields | Mapping[str, Any] | str | None = None,
    test_fraction: float = 0.1,
    skip_bad: bool = False,
    source_options: Mapping[str, Any] | None = None,
) -> ProblemSet:
    """Load (or fetch from the cache) the problems of one split of a source.

    Args:
        source: see the module docstring; `None` means `dataset_path` if given, else
            `procedural:arith`.
        split: `train` or `test`.
        seed: chooses which generated problems a set holds (procedural sources).
        size: at most this many problems (`None`: the whole split; reasoning-gym tiers default
            to 2000 train / 200 test).
        dataset_path: a local file (or `{split}` pattern or split mapping) for file sources.
        fields: a `Fields`, a mapping with its keys, or a preset name (`default`, `dapo`);
            `None` detects the DAPO layout and otherwise uses `id` / `prompt` / `answer`.
        test_fraction: the share of content that belongs to `test` when one source is split.
        skip_bad: skip and count malformed rows instead of raising `DatasetError`.
        source_options: generator settings (reasoning-gym) or `datasets.load_dataset` keywords
            (`hf:`; `hf_split` picks a hub split instead of partitioning).
    """
    _check_split(split)
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"`test_fraction` must be in [0, 1), got {test_fraction}")
    if size is not None and size < 1:
        raise DatasetError(f"`num_problems` / `size` must be at least 1, got {size}")
    if source is None:
        source = "file" if dataset_path is not None else DEFAULT_SOURCE
    fields_ = Fields.coerce(fields)
    options = dict(source_options or {})
    kind, _, arg = source.partition(":")
    key_extra: Any = None
    if kind in ("file", "jsonl", "json", "parquet"):
        if arg:
            dataset_path = arg
        if dataset_path is None:
            raise DatasetError(
                f"source `{source}` needs a file: pass `dataset_path=...` or write `jsonl:path/to/file.jsonl`"
            )
        key_extra = _file_stamp(dataset_path, split)
    key = (
        source,
        split,
        seed,
        size,
        _freeze(dataset_path),
        fields_,
        test_fraction,
        skip_bad,
        _freeze(options),
        key_extra,
    )
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached

    if kind == "procedural" and arg in ("arith", "arith-mul"):
        result = _arith(split, seed, size, test_fraction, ("mul", "add", "sub") if arg == "arith" else ("mul",))
    elif kind == "procedural" and arg == "arith-hard":
        result = _arith_hard(split, seed, size, test_fraction)
    elif kind in ("procedural", "reasoning-gym", "rg"):
        names = _rg_names()
        if not arg or (names and arg not in names):
            known = sorted(TIERS) + [n for n in names if n not in TIERS]
            raise DatasetError(
                f"unknown procedural source `{source}`: tiers are {', '.join(f'`procedural:{t}`' for t in TIERS)}, "
                f"or any reasoning-gym dataset as `reasoning-gym:<name>`.{did_you_mean(arg, known)}"
            )
        result = _reasoning_gym(arg, split, seed, size, test_fraction, options)
    elif kind in ("file", "jsonl", "json", "parquet"):
        result = _file_set(
            dataset_path, split, size, fields_, test_fraction, skip_bad, None if kind == "file" else kind
        )  # type: ignore[arg-type]
    elif kind == "hf":
        if not arg:
            raise DatasetError("an `hf:` source needs a dataset name, e.g. `hf:BytedTsinghua-SIA/DAPO-Math-17k`")
        result = _hf_set(arg, split, size, fields_, test_fraction, skip_bad, options)
    else:
        kinds = ["procedural", "reasoning-gym", "jsonl", "json", "parquet", "file", "hf"]
        raise DatasetError(
            f"unknown problem source `{source}`: expected `procedural:<tier>`, `reasoning-gym:<name>`, "
            f"`jsonl:<path>`, `parquet:<path>` or `hf:<name>`.{did_you_mean(kind, kinds)}"
        )
    if not result.problems:
        raise DatasetError(
            f"source `{source}` has no problems in split `{split}` ({result.report.rows} rows read, "
            f"{result.report.skipped_bad} bad, {result.report.duplicates} duplicates, "
            f"{result.report.other_split} in the other split)"
        )
    with _CACHE_LOCK:
        _CACHE.setdefault(key, result)
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every cached problem set (tests, or after editing files in place)."""
    with _CACHE_LOCK:
        _CACHE.clear()
