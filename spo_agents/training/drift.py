"""Policy drift for the value tracker: the cumulative and the per-prompt estimate side by side
(docs/algorithm.md section 1).

- `cumulative`: `step_drift` is the token-mean |log pi_after - log pi_before| over a step's own
  batch; the tracker sums it and takes D(x) as the sum's growth since x's last visit.
- `per-prompt` (the authors' estimate): `PromptDriftStore` keeps each problem's last response
  with the log-probs of the policy that acted on it, and `D(x)` is the token-mean
  |log pi_now - log pi_then| over it. Departure: stored before the update that followed the
  visit, not after it (a one-update shift at both ends; docs/algorithm.md section 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spo_agents.types import Trajectory


def mean_abs_diff(
    trajectories: Sequence[Trajectory], a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]
) -> float:
    """Token-mean of |a - b| over generated tokens of all trajectories."""
    num, den = 0.0, 0
    for t, xa, xb in zip(trajectories, a, b):
        for m, u, v in zip(t.loss_mask, xa, xb):
            if m and math.isfinite(u) and math.isfinite(v):
                num += abs(u - v)
                den += 1
    return num / den if den else 0.0


def step_drift(
    trajectories: Sequence[Trajectory], after: Sequence[Sequence[float]], before: Sequence[Sequence[float]]
) -> float:
    """The cumulative estimate's increment for one step: token-mean |log pi_after - log pi_before|."""
    return mean_abs_diff(trajectories, after, before)


def logprob_gap(trajectories: Sequence[Trajectory], learner: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean and max |rollout - learner| log-prob over the trained tokens: how far the behaviour
    log-probs a backend reported are from the learner's own scoring of the same weights."""
    diffs = [
        abs(lp - x)
        for t, xs in zip(trajectories, learner)
        for m, lp, x in zip(t.loss_mask, t.logprobs, xs)
        if m and math.isfinite(lp) and math.isfinite(x)
    ]
    return (sum(diffs) / len(diffs), max(diffs)) if diffs else (0.0, 0.0)


@dataclass
class _Stored:
    prompt_ids: list[int]
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]  # log-probs of the policy that acted at the last visit (before its update)


class PromptDriftStore:
    """Each problem's last response with the log-probs of the policy that acted on it (scored
    before the update that followed); `drift(...)` re-scores them with the current policy."""

    def __init__(self) -> None:
        self.items: dict[str, _Stored] = {}

    def put(self, traj: Trajectory, logprobs: list[float]) -> None:
        self.items[traj.problem_id] = _Stored(
            list(traj.prompt_ids), list(traj.token_ids), list(traj.loss_mask), list(logprobs)
        )

    def as_trajectories(self, problem_ids: Sequence[str]) -> list[Trajectory | None]:
        out: list[Trajectory | None] = []
        for pid in problem_ids:
            s = self.items.get(pid)
            out.append(
                None
                if s is None
                else Trajectory(
                    problem_id=pid,
                    env_id="",
                    prompt_ids=s.prompt_ids,
                    token_ids=s.token_ids,
                    loss_mask=s.loss_mask,
                    logprobs=s.logprobs,
                    reward=0.0,
                )
            )
        return out

    def drift(
        self, problem_ids: Sequence[str], score: Callable[[Sequence[Trajectory]], list[list[float]]]
    ) -> list[float]:
        """Per-prompt D(x) for `problem_ids`, re-scoring the stored responses with `score` (the
        current policy); 0 for problems without a stored response."""
        stored = self.as_trajectories(problem_ids)
        present = [s for s in stored if s is not None]
        if not present:
            return [0.0] * len(problem_ids)
        now = iter(score(present))
        return [0.0 if s is None else mean_abs_diff([s], [next(now)], [s.logprobs]) for s in stored]

    def state_dict(self) -> dict[str, Any]:
        return {"items": {k: dataclasses.asdict(v) for k, v in self.items.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = {k: _Stored(**v) for k, v in state.get("items", {}).items()}
