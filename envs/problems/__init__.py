"""Problem sources: where an environment's problems come from (docs/environments.md, "Problem
sources"). `load_problems(source, split)` turns a source string into a cached `ProblemSet`.

Modules: `problem_set` (the set, its load report, the content hash behind splits), `procedural`
(the arithmetic and reasoning-gym tiers), `rows` (row fields, duplicates), `files` (JSONL, JSON,
Parquet), `hub` (Hugging Face `datasets`), `loader` (`load_problems` and its cache).
"""

from __future__ import annotations

from .files import file_set, iter_rows, kind_of
from .hub import hf_set
from .loader import DEFAULT_SOURCE, clear_cache, load_problems
from .problem_set import ALL, SPLITS, LoadReport, ProblemSet, check_split, content_split
from .procedural import (
    HARD_DEFAULT_SIZE,
    HARD_KINDS,
    RG_DEFAULT_SIZE,
    RG_SEED_STRIDE,
    TIERS,
    Expr,
    HardKind,
    arith_hard_set,
    arith_set,
    canonical_expr,
    eval_expr,
    reasoning_gym_set,
)
from .rows import DAPO_PREFIX, DAPO_SUFFIX, PRESETS, Fields, Row, read_row, rows_to_problems

__all__ = [
    "ALL",
    "DAPO_PREFIX",
    "DAPO_SUFFIX",
    "DEFAULT_SOURCE",
    "HARD_DEFAULT_SIZE",
    "HARD_KINDS",
    "PRESETS",
    "RG_DEFAULT_SIZE",
    "RG_SEED_STRIDE",
    "SPLITS",
    "TIERS",
    "Expr",
    "Fields",
    "HardKind",
    "LoadReport",
    "ProblemSet",
    "Row",
    "arith_hard_set",
    "arith_set",
    "canonical_expr",
    "check_split",
    "clear_cache",
    "content_split",
    "eval_expr",
    "file_set",
    "hf_set",
    "iter_rows",
    "kind_of",
    "load_problems",
    "read_row",
    "reasoning_gym_set",
    "rows_to_problems",
]
