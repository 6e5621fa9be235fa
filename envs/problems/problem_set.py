"""A loaded set of problems, what loading it did, and the content hash that assigns splits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from spo_agents.errors import DatasetError, did_you_mean
from spo_agents.types import Problem

#: The splits a source is partitioned into.
SPLITS = ("train", "test")
#: The split value that keeps every row of a file or dataset, unpartitioned.
ALL = "all"


@dataclass
class LoadReport:
    """What loading a source did: rows read, problems kept, rows set aside and why."""

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

    def summary(self, source: str, split: str) -> str:
        """One line: rows read, problems kept, and each reason a row was set aside."""
        aside = []
        if self.other_split:
            aside.append(f"{self.other_split} hash into the other split (`split={ALL}` keeps every row)")
        if self.duplicates:
            aside.append(f"{self.duplicates} repeat an earlier row's content (kept once)")
        if self.skipped_bad:
            first = f"; first: {self.errors[0]}" if self.errors else ""
            aside.append(f"{self.skipped_bad} bad rows skipped (`skip_bad`){first}")
        rest = f"; set aside: {', '.join(aside)}" if aside else ""
        return f"{source}: {self.rows} rows read, {self.loaded} problems in split `{split}`{rest}"


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


def check_split(split: str) -> None:
    """Raise `DatasetError` unless `split` is `train`, `test` or `all`."""
    known = (*SPLITS, ALL)
    if split not in known:
        raise DatasetError(
            f"`split` must be one of `train`, `test` or `{ALL}` (every row of a file or dataset), got `{split}`."
            f"{did_you_mean(split, known)}"
        )
