"""One step's trajectories with the tracker's values before the step and their advantages
(docs/algorithm.md section 2: A = r - v_hat_before(x), normalised over the batch, Eqs. 8-10)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spo_agents.config import Config, advantage_name
from spo_agents.types import Trajectory


@dataclass(frozen=True)
class Batch:
    """Arrays are [B], one entry per trajectory."""

    trajectories: list[Trajectory]
    idx: np.ndarray  # the tracker's index of each trajectory's problem
    rewards: np.ndarray
    v_before: np.ndarray  # v_hat before this batch's rewards are folded in (the baseline)
    advantages: np.ndarray
    raw: np.ndarray  # r - baseline, before normalisation
    group_ids: list[str | None] | None  # grouped collection only

    @property
    def problem_ids(self) -> list[str]:
        return [t.problem_id for t in self.trajectories]


def make_batch(trajectories: list[Trajectory], tracker: Any, cfg: Config, grouped: bool) -> Batch:
    """Advantages of `trajectories` with the estimator `cfg` names, from `tracker`'s current values."""
    from spo_agents.algorithm.advantages import compute_advantages

    idx = tracker.indices([t.problem_id for t in trajectories])
    rewards = np.array([t.reward for t in trajectories], dtype=np.float64)
    v_before = tracker.v_hat(idx)
    group_ids = [t.group_id for t in trajectories] if grouped else None
    name = advantage_name(cfg)
    baseline = v_before if name == "spo" else None
    tokens = [t.num_generated for t in trajectories] if cfg.algorithm.advantage_norm == "token" else None
    adv = compute_advantages(name, rewards, baseline, group_ids, tokens)
    raw = rewards - (v_before if name == "spo" else 0.0)
    return Batch(list(trajectories), idx, rewards, v_before, adv, raw, group_ids)
