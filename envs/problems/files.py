"""Problem files: JSONL, JSON (a list of rows) and Parquet, one problem per row; `dataset_path`
may be a file, a `{split}` pattern or a split mapping."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from spo_agents.errors import DatasetError

from .problem_set import ALL, ProblemSet
from .rows import Fields, rows_to_problems

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
UTF8_FIX = "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 OLD > NEW`)"


def iter_rows(path: Path, kind: str) -> Iterator[tuple[int, Any]]:
    """(line or row number, row dict, or a `ValueError` for a row that could not be read)."""
    if kind == "jsonl":
        yield from _jsonl_rows(path)
    elif kind == "json":
        yield from enumerate(_json_rows(path), start=1)
    elif kind == "parquet":
        yield from _parquet_rows(path)
    else:
        raise DatasetError(f"unknown file kind `{kind}` for `{path}`; use `.jsonl`, `.json` or `.parquet`")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for n, data in enumerate(f, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, ValueError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start + 1}); {UTF8_FIX}")
                continue
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, ValueError(f"not valid JSON ({e.msg} at column {e.colno})")


def _json_rows(path: Path) -> list[Any]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(
            f"`{path}` is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); a `.json` problem file "
            f"must be UTF-8: {UTF8_FIX}"
        ) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"`{path}` is not valid JSON ({e}); fix the file, or write one row per line as `.jsonl`"
        ) from e
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: a `.json` problem file must hold a list of rows, got {type(rows).__name__}")
    return rows


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DatasetError(f"reading `{path}` needs `pyarrow`: run `pip install pyarrow`") from e
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except (pa.ArrowException, OSError) as e:
        where = f" after {n} rows" if n else ""
        raise DatasetError(
            f"`{path}` is not a readable Parquet file{where} ({e}); write it again (e.g. pandas `to_parquet`), "
            "or give the rows as `.jsonl`"
        ) from None


def kind_of(path: Path) -> str:
    """The file kind by its suffix (`jsonl` when unknown)."""
    return KINDS.get(path.suffix.lower(), "jsonl")


def resolve_path(path_spec: str | os.PathLike | Mapping[str, Any], split: str) -> tuple[Path, bool]:
    """The file holding `split`, and whether its rows must still be partitioned by content."""
    partition = split != ALL
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
    return path, partition


def file_set(
    path_spec: str | os.PathLike | Mapping[str, Any],
    split: str,
    size: int | None,
    fields: Fields | None,
    test_fraction: float,
    skip_bad: bool,
    kind: str | None,
) -> ProblemSet:
    """The problems of `split` in a file (`split="all"`: every row of it)."""
    path, partition = resolve_path(path_spec, split)
    result = rows_to_problems(
        iter_rows(path, kind or kind_of(path)),
        where=str(path),
        stem=path.stem,
        fields=fields,
        split=split if partition else None,
        test_fraction=test_fraction,
        size=size,
        skip_bad=skip_bad,
        source=f"file:{path.name}",
    )
    result.split = split
    return result
