"""Typed data that crosses module boundaries: problems and trajectories.

The rollout side (environments, policy backends, sandboxes) produces `Trajectory` objects; the
learner consumes them. A trajectory is token-in, token-out: `token_ids` are exactly the tokens
the policy sampled plus the tokens the environment inserted, never a re-tokenised chat.

Layout of one trajectory::

    prompt_ids                      token_ids
    [system + user, chat template]  [generated ... | env reply ... | generated ... ]
                                    loss_mask  1 1 1   0 0 0 0       1 1 1
                                    logprobs   behaviour log-prob where mask is 1, 0.0 elsewhere
                                    turn_starts: offsets in token_ids where each generation starts
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo_agents.errors import TrajectoryError
from spo_agents.files import read_jsonl_records

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """One task an environment can pose.

    `id` is stable across runs and machines (the value tracker is keyed by it); `prompt` is the
    task text shown to the model; `answer` is the reference the reward compares against
    (its meaning is the environment's: a number, an expression, hidden tests, ...).
    """

    id: str
    prompt: str
    answer: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(id=str(d["id"]), prompt=d["prompt"], answer=d.get("answer"), metadata=dict(d.get("metadata") or {}))


@dataclass
class ToolCall:
    """One tool invocation inside an episode (e.g. a `<code>` block run in the sandbox)."""

    code: str
    output: str
    ok: bool  # the code ran to completion without raising
    timed_out: bool = False
    truncated: bool = False  # the output shown to the model was cut
    infra_error: str | None = None  # the sandbox itself failed (not the user's code)
    duration_s: float = 0.0


@dataclass
class Trajectory:
    """One finished episode, ready for the learner.

    Fields:
        problem_id: stable id of the problem (`Problem.id`).
        env_id: the environment that produced it, e.g. `math-python-v0`.
        prompt_ids: tokens of the initial prompt (chat template applied); never trained on.
        token_ids: everything after the prompt: sampled tokens and env-inserted tokens.
        loss_mask: 1 for tokens the policy sampled, 0 for tokens the environment inserted.
        logprobs: behaviour-policy log-prob of each token in `token_ids` (0.0 where mask is 0).
        reward: the episode's scalar reward.
        terminated: the task ended (answer given); truncated: a budget ran out.
        policy_version: the learner step whose weights generated the *first* token;
            `policy_versions` has one entry per generation call when weights changed mid-episode.
        turn_starts: offsets in `token_ids` where each generation call starts.
        tool_calls: the tool invocations, in order.
        timings: seconds spent, keys `generate`, `env`, `sandbox`, `total`, `queued`.
        info: environment-specific details (parsed answer, correctness, ...).
        error: set when the episode failed for an infrastructure reason (the reward is then not
            evidence about the policy and the learner skips it).
        group_id / sample_index: set by grouped collection (GRPO comparison) and offline
            estimation; `None` / 0 in single-stream mode.
    """

    problem_id: str
    env_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    reward: float
    terminated: bool = False
    truncated: bool = False
    policy_version: int = 0
    policy_versions: list[int] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    group_id: str | None = None
    sample_index: int = 0
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise TrajectoryError(
                f"`token_ids`, `loss_mask` and `logprobs` must have equal lengths, got "
                f"{n}, {len(self.loss_mask)} and {len(self.logprobs)}"
            )

    @property
    def num_generated(self) -> int:
        """Tokens the policy sampled (those the loss trains on)."""
        return int(sum(self.loss_mask))

    @property
    def correct(self) -> bool:
        return bool(self.info.get("correct", self.reward >= 1.0))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # JSON has no NaN/inf: store non-finite log-probs as strings so the round-trip is exact.
        d["logprobs"] = [x if math.isfinite(x) else repr(x) for x in self.logprobs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        version = d.get("schema_version", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise TrajectoryError(
                f"trajectory schema version {version} is newer than this spo-agents understands "
                f"({SCHEMA_VERSION}); upgrade spo-agents to read it"
            )
        d = dict(d)
        d["tool_calls"] = [ToolCall(**t) for t in d.get("tool_calls", [])]
        d["logprobs"] = [float(x) for x in d["logprobs"]]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def write_jsonl(path: str | Path, trajectories: Iterable[Trajectory], append: bool = False) -> int:
    """Write trajectories one JSON object per line; returns how many were written."""
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for t in trajectories:
            f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Trajectory]:
    """Read trajectories written by `write_jsonl`. A torn last line (crash mid-write) is skipped."""
    for d in read_jsonl_records(path, TrajectoryError):
        yield Trajectory.from_dict(d)
