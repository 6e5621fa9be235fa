"""The trajectory log's records: `LoggedTrajectory` (one line of a step file) with its
`Segment`s, `Visit` (one row of `visits.jsonl`), the names and schema version of the files, and
how a record is built from a `spo_agents.types.Trajectory` (the token ids split into model and
env segments, a model segment's text split around the code of the tool call that follows it).
Format: docs/viewer.md."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from spo_agents.errors import TrajectoryError

SCHEMA_VERSION = 1
LOG_DIR = "trajectories"
META = "meta.json"
PROBLEMS = "problems.json.gz"
VISITS = "visits.jsonl"
VISIT_COLUMNS = (
    "step",
    "index",
    "problem_id",
    "reward",
    "correct",
    "v_hat_before",
    "rho",
    "advantage",
    "policy_version",
)


@dataclass
class Segment:
    """A run of tokens from one source.

    `kind` is `model` (sampled by the policy; `mask` 1, trained on) or `env` (inserted by the
    environment; `mask` 0). `parts` splits a model segment's text into `[kind, text]` pairs,
    kind `text` or `code` (a tool call's code). `tool_call` is the index in
    `LoggedTrajectory.tool_calls` of the call an env segment answers. `logprobs` and `pieces`
    (each token's own decoded text) are set for model segments when log-probs are saved.
    """

    kind: str
    mask: int
    tokens: list[int]
    text: str | None = None
    parts: list[list[str]] = field(default_factory=list)
    tool_call: int | None = None
    logprobs: list[float] | None = None
    pieces: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (non-finite log-probs as strings, as `Trajectory` stores them)."""
        d = {name: getattr(self, name) for name in _SEGMENT_ORDER}
        if self.logprobs is not None:
            d["logprobs"] = [x if math.isfinite(x) else repr(x) for x in self.logprobs]
        return d


@dataclass
class LoggedTrajectory:
    """One trajectory the learner trained on, as stored in a step file (docs/viewer.md)."""

    step: int
    index: int
    batch_size: int
    problem_id: str
    env_id: str
    reward: float
    advantage: float
    v_hat_before: float
    rho: float
    correct: bool
    answer: Any = None
    policy_version: int = 0
    policy_versions: list[int] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    prompt_text: str | None = None
    prompt_tokens: int = 0
    segments: list[Segment] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def token_ids(self) -> list[int]:
        """The trajectory's `token_ids`, reassembled from the segments."""
        return [t for s in self.segments for t in s.tokens]

    def loss_mask(self) -> list[int]:
        """The trajectory's `loss_mask`, reassembled from the segments."""
        return [s.mask for s in self.segments for _ in s.tokens]

    def model_text(self) -> list[str]:
        """The text the policy wrote, one string per model segment (what an env scores)."""
        return [s.text or "" for s in self.segments if s.kind == "model"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (shallow: lists are shared with the record, not copied)."""
        d = {name: getattr(self, name) for name in _RECORD_ORDER}
        d["segments"] = [s.to_dict() for s in self.segments]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoggedTrajectory:
        version = d.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise TrajectoryError(
                f"trajectory log schema version {version!r} is newer than this spo-agents reads "
                f"({SCHEMA_VERSION}); upgrade spo-agents to read it"
            )
        d = dict(d)
        segs = []
        for s in d.get("segments", []):
            s = dict(s)
            if s.get("logprobs") is not None:
                s["logprobs"] = [float(x) for x in s["logprobs"]]
            segs.append(Segment(**{k: v for k, v in s.items() if k in _SEGMENT_FIELDS}))
        d["segments"] = segs
        return cls(**{k: v for k, v in d.items() if k in _RECORD_FIELDS})


_SEGMENT_ORDER = tuple(Segment.__dataclass_fields__)
_RECORD_ORDER = tuple(LoggedTrajectory.__dataclass_fields__)
_SEGMENT_FIELDS = set(_SEGMENT_ORDER)
_RECORD_FIELDS = set(_RECORD_ORDER)


@dataclass(frozen=True)
class Visit:
    """One row of `visits.jsonl`: a problem's visit at a step (docs/viewer.md)."""

    step: int
    index: int
    problem_id: str
    reward: float
    correct: bool
    v_hat_before: float
    rho: float
    advantage: float
    policy_version: int


# --------------------------------------------------------------------------------------------
# Building records from trajectories
# --------------------------------------------------------------------------------------------
def _decode(tokenizer: Any, ids: Sequence[int]) -> str | None:
    if tokenizer is None:
        return None
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's own text (a token that is part of a multi-byte character decodes to U+FFFD)."""
    return [tokenizer.decode([x], skip_special_tokens=False) for x in ids]


def _runs(mask: Sequence[int], starts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) runs of equal mask; a generation start (`turn_starts`) also opens a run."""
    cuts = {0, len(mask)} | {s for s in starts if 0 < s < len(mask)}
    cuts |= {i for i in range(1, len(mask)) if mask[i] != mask[i - 1]}
    edges = sorted(cuts)
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _split_code(text: str, code: str) -> list[list[str]] | None:
    """`[[text, before], [code, code], [text, after]]` around the last occurrence of `code`."""
    body = code.strip("\n")
    at = text.rfind(body) if body.strip() else -1
    if at < 0:
        return None
    parts = [["text", text[:at]], ["code", body], ["text", text[at + len(body) :]]]
    return [p for p in parts if p[1]]


def segments_of(trajectory: Any, tokenizer: Any = None, logprobs: bool = False) -> list[Segment]:
    """Split `trajectory.token_ids` into model / env segments (docs/viewer.md)."""
    t = trajectory
    runs = _runs(t.loss_mask, t.turn_starts)
    calls = list(t.tool_calls)
    segs: list[Segment] = []
    next_call = 0
    for a, b in runs:
        mask = int(t.loss_mask[a])
        seg = Segment("model" if mask else "env", mask, [int(x) for x in t.token_ids[a:b]])
        seg.text = _decode(tokenizer, seg.tokens)
        if mask and logprobs:
            seg.logprobs = [float(f"{x:.6g}") for x in t.logprobs[a:b]]  # float32 precision, half the bytes
            if tokenizer is not None:
                seg.pieces = _pieces(tokenizer, seg.tokens)
        segs.append(seg)
    for i, seg in enumerate(segs):
        if seg.kind != "model" or seg.text is None:
            continue
        followed = i + 1 < len(segs) and segs[i + 1].kind == "env"
        parts = _split_code(seg.text, calls[next_call].code) if followed and next_call < len(calls) else None
        seg.parts = parts or [["text", seg.text]]
        if parts is not None:
            segs[i + 1].tool_call = next_call
            next_call += 1
    return segs


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=True)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


def _tool_call_dict(call: Any) -> dict[str, Any]:
    return asdict(call) if hasattr(call, "__dataclass_fields__") else dict(call)


def make_record(
    trajectory: Any,
    *,
    step: int,
    index: int,
    batch_size: int,
    advantage: float,
    v_hat_before: float,
    rho: float,
    tokenizer: Any = None,
    logprobs: bool = False,
) -> LoggedTrajectory:
    """The `LoggedTrajectory` of one `spo_agents.types.Trajectory`."""
    t = trajectory
    info = {k: _json_safe(v) for k, v in t.info.items() if k not in ("tool_call", "tool_calls", "completion")}
    return LoggedTrajectory(
        step=int(step),
        index=int(index),
        batch_size=int(batch_size),
        problem_id=str(t.problem_id),
        env_id=str(t.env_id),
        reward=float(t.reward),
        advantage=float(advantage),
        v_hat_before=float(v_hat_before),
        rho=float(rho),
        correct=bool(t.correct),
        answer=_json_safe(t.info.get("answer")),
        policy_version=int(t.policy_version),
        policy_versions=[int(v) for v in t.policy_versions],
        terminated=bool(t.terminated),
        truncated=bool(t.truncated),
        prompt_text=_decode(tokenizer, t.prompt_ids),
        prompt_tokens=len(t.prompt_ids),
        segments=segments_of(t, tokenizer, logprobs),
        tool_calls=[_tool_call_dict(c) for c in t.tool_calls],
        timings={k: float(v) for k, v in t.timings.items()},
        info=info,
    )
