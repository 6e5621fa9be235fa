"""`load_problems`: a source string to the `ProblemSet` of one split, cached per process so the
many env instances of a run share one set. Loading a file or hub dataset prints one line saying
how many rows were read and what was set aside, and why."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spo_agents.errors import DatasetError, did_you_mean

from .files import file_set
from .hub import hf_set
from .problem_set import ALL, ProblemSet, check_split
from .procedural import TIERS, arith_hard_set, arith_set, reasoning_gym_set, rg_names
from .rows import Fields

DEFAULT_SOURCE = "procedural:arith"
FILE_KINDS = ("file", "jsonl", "json", "parquet")

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
        source: `procedural:<tier>`, `reasoning-gym:<name>`, `jsonl:`/`json:`/`parquet:<path>`,
            `hf:<name>[:<config>]` (docs/environments.md); `None` means `dataset_path` if given,
            else `procedural:arith`.
        split: `train` or `test`; `all` keeps every row of a file or dataset, unpartitioned.
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
    check_split(split)
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
    if kind in FILE_KINDS:
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
    result = _build(_Request(source, split, seed, size, dataset_path, fields_, test_fraction, skip_bad, options))
    if kind in FILE_KINDS or kind == "hf":
        print(result.report.summary(source if arg else f"{kind}:{dataset_path}", split), file=sys.stderr)
    if not result.problems:
        raise DatasetError(
            f"source `{source}` has no problems in split `{split}` ({result.report.rows} rows read, "
            f"{result.report.skipped_bad} bad, {result.report.duplicates} duplicates, "
            f"{result.report.other_split} in the other split)"
        )
    with _CACHE_LOCK:
        _CACHE.setdefault(key, result)
        return _CACHE[key]


@dataclass(frozen=True)
class _Request:
    source: str
    split: str
    seed: int
    size: int | None
    dataset_path: Any
    fields: Fields | None
    test_fraction: float
    skip_bad: bool
    options: dict[str, Any]


def _build(r: _Request) -> ProblemSet:
    """Dispatch on the source's kind."""
    kind, _, arg = r.source.partition(":")
    if kind in FILE_KINDS:
        file_kind = None if kind == "file" else kind
        return file_set(r.dataset_path, r.split, r.size, r.fields, r.test_fraction, r.skip_bad, file_kind)
    if kind == "hf":
        if not arg:
            raise DatasetError("an `hf:` source needs a dataset name, e.g. `hf:BytedTsinghua-SIA/DAPO-Math-17k`")
        return hf_set(arg, r.split, r.size, r.fields, r.test_fraction, r.skip_bad, r.options)
    if kind not in ("procedural", "reasoning-gym", "rg"):
        kinds = ["procedural", "reasoning-gym", "jsonl", "json", "parquet", "file", "hf"]
        raise DatasetError(
            f"unknown problem source `{r.source}`: expected `procedural:<tier>`, `reasoning-gym:<name>`, "
            f"`jsonl:<path>`, `parquet:<path>` or `hf:<name>`.{did_you_mean(kind, kinds)}"
        )
    if r.split == ALL:
        raise DatasetError(
            f"split `{ALL}` keeps every row of a file or dataset; procedural source `{r.source}` is generated "
            "per split: ask for `train` or `test`"
        )
    if kind == "procedural" and arg in ("arith", "arith-mul"):
        ops = ("mul", "add", "sub") if arg == "arith" else ("mul",)
        return arith_set(r.split, r.seed, r.size, r.test_fraction, ops)
    if kind == "procedural" and arg == "arith-hard":
        return arith_hard_set(r.split, r.seed, r.size, r.test_fraction)
    names = rg_names()
    if not arg or (names and arg not in names):
        known = sorted(TIERS) + [n for n in names if n not in TIERS]
        raise DatasetError(
            f"unknown procedural source `{r.source}`: tiers are {', '.join(f'`procedural:{t}`' for t in TIERS)}, "
            f"or any reasoning-gym dataset as `reasoning-gym:<name>`.{did_you_mean(arg, known)}"
        )
    return reasoning_gym_set(arg, r.split, r.seed, r.size, r.test_fraction, r.options)


def clear_cache() -> None:
    """Forget every cached problem set (tests, or after editing files in place)."""
    with _CACHE_LOCK:
        _CACHE.clear()
