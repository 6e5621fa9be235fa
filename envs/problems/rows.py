"""Rows of a file or dataset as problems: where each part of a problem lives in a row (`Fields`,
with the DAPO-Math-17k preset), and `rows_to_problems`, shared by files and hub datasets."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from spo_agents.errors import DatasetError, did_you_mean
from spo_agents.types import Problem

from .problem_set import LoadReport, ProblemSet, content_split


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


def plain(value: Any) -> Any:
    """JSON-friendly copy of a value read from Parquet (numpy scalars and arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Row:
    """One row read as a problem, before duplicates and splits are considered."""

    id: str
    prompt: str
    answer: Any
    metadata: dict[str, Any]

    @property
    def content(self) -> tuple[str, str]:
        """What makes two rows the same problem: the prompt and the answer (as JSON unless a string)."""
        answer = self.answer if isinstance(self.answer, str) else json.dumps(self.answer, sort_keys=True)
        return self.prompt, answer


def read_row(row: Any, fields: Fields | None, line: int, stem: str, source: str) -> Row:
    """A `Row` from one raw row; `ValueError` saying what is wrong with it."""
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
        answer_raw = plain(_dig(row, f.answer))
    except KeyError:
        raise ValueError(f"no answer field `{f.answer}` (fields found: {sorted(row)}); set `fields`") from None
    if answer_raw is None or isinstance(answer_raw, (dict, list)) and not answer_raw:
        raise ValueError(f"the answer field `{f.answer}` is empty")
    answer = answer_raw if isinstance(answer_raw, (list, dict)) else str(answer_raw)
    if not prompt.strip():
        raise ValueError(f"the prompt field `{f.prompt}` is empty")
    pid = f"{stem}:{line}"
    if f.id is not None:
        try:
            pid = str(plain(_dig(row, f.id)))
        except KeyError:
            pass
    used = {f.prompt.split(".")[0], f.answer.split(".")[0]} | ({f.id.split(".")[0]} if f.id else set())
    keys = f.metadata if f.metadata is not None else tuple(k for k in row if k not in used)
    meta = {"source": source, "line": line}
    for k in keys:
        try:
            meta[k] = plain(_dig(row, k))
        except KeyError:
            pass
    return Row(pid, prompt, answer, meta)


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

    `split=None` keeps every row; otherwise rows are partitioned by content hash. A row that
    repeats an earlier row's content is kept once and counted; an id reused for different
    content (ids compare as text, so `1` and `"1"` are one id) is a bad row."""
    report = LoadReport()
    problems: list[Problem] = []
    first_of_id: dict[str, tuple[int, tuple[str, str]]] = {}
    seen_content: set[tuple[str, str]] = set()
    for line, raw in rows:
        report.rows += 1
        try:
            row = read_row(raw, fields, line, stem, source)
            earlier = first_of_id.get(row.id)
            if earlier is not None and earlier[1] != row.content:
                raise ValueError(
                    f"id `{row.id}` is already used by line {earlier[0]} for a different problem "
                    '(ids compare as text: `1` and `"1"` are the same id); give each problem its own id'
                )
        except ValueError as e:
            if not skip_bad:
                raise DatasetError(
                    f"{where}:{line}: {e}. Fix the row, or pass `skip_bad=True` (`--env-arg skip_bad=true`) "
                    "to skip and count bad rows"
                ) from None
            report.note_bad(f"{where}:{line}: {e}")
            continue
        if earlier is not None or row.content in seen_content:
            report.duplicates += 1
            first_of_id.setdefault(row.id, (line, row.content))
            continue
        first_of_id[row.id] = (line, row.content)
        seen_content.add(row.content)
        if split is not None and content_split(row.prompt, row.content[1], test_fraction) != split:
            report.other_split += 1
            continue
        problems.append(Problem(id=row.id, prompt=row.prompt, answer=row.answer, metadata=row.metadata))
        if size is not None and len(problems) >= size:
            break
    report.loaded = len(problems)
    return ProblemSet(source, split or "all", problems, report)
