"""Procedural problem sources: two-digit arithmetic (tier 0), `arith-hard` (tier 1) and the
reasoning-gym tiers. Every set is a pure function of (seed, split, size, options)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spo_agents.errors import DatasetError
from spo_agents.types import Problem

from .problem_set import LoadReport, ProblemSet, content_split

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


def arith_set(split: str, seed: int, size: int | None, test_fraction: float, ops: Sequence[str]) -> ProblemSet:
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


def arith_hard_set(split: str, seed: int, size: int | None, test_fraction: float) -> ProblemSet:
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
def reasoning_gym_set(
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


def rg_names() -> list[str]:
    try:
        import reasoning_gym.factory as factory

        return sorted(getattr(factory, "DATASETS", {}))
    except Exception:
        return []
