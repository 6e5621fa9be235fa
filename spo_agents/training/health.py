"""Is the run learning anything, and is its infrastructure holding? Checked once per step.

Two kinds of trouble a long run must not hide:
- Infrastructure losses: the share of a step's finished episodes that failed for infrastructure
  reasons (sandbox, policy server). Above `max_error_share` the step is reported on the console
  at once; `max_error_steps` such steps in a row stop the run with `RolloutError` (training on
  the survivors would train on a biased sample, e.g. only the episodes that never used the tool).
- Steps with nothing to learn: all advantages zero (every GRPO group degenerate, or a constant
  batch without a baseline), or no success at all in the batch (SPO still has advantages from
  its baselines, but a small model that never succeeds is worth knowing about early). Both are
  counted in the metrics and reported when they last `idle_warn_steps` steps in a row.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from spo_agents.errors import RolloutError


@dataclass(frozen=True)
class HealthLimits:
    max_error_share: float = 0.25
    max_error_steps: int = 3
    idle_warn_steps: int = 3


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StepHealth:
    """Per-step checks of the module docstring; `observe` returns the step's health metrics."""

    def __init__(self, limits: HealthLimits, warn: Callable[[str], None] = _stderr) -> None:
        self.limits = limits
        self.warn = warn
        self.error_streak = 0
        self.zero_streak = 0
        self.fail_streak = 0

    def observe(
        self,
        step: int,
        trained: int,
        failed: int,
        advantages: np.ndarray,
        rewards: np.ndarray,
        last_error: str | None = None,
    ) -> dict[str, float]:
        lim = self.limits
        finished = trained + failed
        share = failed / finished if finished else 0.0
        if share > lim.max_error_share:
            self.error_streak += 1
            self.warn(
                f"step {step}: {failed} of {finished} episodes ({share:.0%}) failed for infrastructure reasons "
                f"(limit {lim.max_error_share:.0%}, {self.error_streak} step(s) in a row); last: {last_error}"
            )
            if self.error_streak >= lim.max_error_steps:
                raise RolloutError(
                    f"{self.error_streak} steps in a row lost more than {lim.max_error_share:.0%} of their episodes to "
                    f"infrastructure errors (last: {last_error}); fix the sandbox or policy server, or raise "
                    f"`rollout.max_error_share` / `rollout.max_error_steps`"
                )
        else:
            self.error_streak = 0
        zero = bool(advantages.size == 0 or np.all(advantages == 0))
        no_success = bool(rewards.size == 0 or np.max(rewards) <= 0)
        self.zero_streak = self.zero_streak + 1 if zero else 0
        self.fail_streak = self.fail_streak + 1 if no_success else 0
        if self.zero_streak == lim.idle_warn_steps:
            self.warn(
                f"step {step}: every advantage has been zero for {self.zero_streak} steps: these updates teach nothing"
            )
        if self.fail_streak == lim.idle_warn_steps:
            self.warn(
                f"step {step}: no episode has succeeded for {self.fail_streak} steps: "
                "the task may be out of the model's reach"
            )
        return {
            "episode/infra_error_share": share,
            "train/zero_advantages": float(zero),
            "train/no_success": float(no_success),
        }
