"""Hugging Face `datasets` as a problem source (`hf:<name>[:<config>]`), with the row fields of files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spo_agents.errors import DatasetError

from .problem_set import ALL, ProblemSet
from .rows import Fields, rows_to_problems


def hf_set(
    name: str,
    split: str,
    size: int | None,
    fields: Fields | None,
    test_fraction: float,
    skip_bad: bool,
    options: Mapping[str, Any],
) -> ProblemSet:
    """The problems of `split` in a hub dataset: its `train` split partitioned by content, or the hub
    split named by the `hf_split` option (or every row, with `split="all"`) as it is."""
    try:
        import datasets
    except ImportError as e:
        raise DatasetError("`hf:` sources need the `datasets` package: run `pip install datasets`") from e
    repo, _, config = name.partition(":")
    options = dict(options)
    hf_split = options.pop("hf_split", None)
    partition = hf_split is None and split != ALL
    try:
        ds = datasets.load_dataset(repo, config or None, split=hf_split or "train", **options)
    except Exception as e:
        raise DatasetError(
            f"cannot load Hugging Face dataset `{repo}`{f' ({config})' if config else ''}: {e}. This needs hub access "
            f"(or a local cache); without it, download the file elsewhere and use `dataset_path=`"
        ) from e
    result = rows_to_problems(
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
    result.split = split
    return result
