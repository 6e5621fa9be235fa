"""Step health: infrastructure losses are reported at once and stop the run when they persist;
steps with nothing to learn are counted and reported."""

from __future__ import annotations

import numpy as np
import pytest

from spo_agents.errors import RolloutError
from spo_agents.training.health import HealthLimits, StepHealth

ADV = np.array([0.5, -0.5])
R = np.array([1.0, 0.0])


def test_a_lossy_step_is_reported_and_three_in_a_row_stop_the_run():
    said: list[str] = []
    h = StepHealth(HealthLimits(max_error_share=0.25, max_error_steps=3), warn=said.append)
    assert h.observe(1, 6, 2, ADV, R)["episode/infra_error_share"] == 0.25 and not said  # at the limit: fine
    h.observe(2, 5, 3, ADV, R, "SandboxError: gone")
    assert len(said) == 1 and "3 of 8" in said[0] and "SandboxError: gone" in said[0]
    h.observe(3, 6, 2, ADV, R)  # a good step resets the streak
    h.observe(4, 1, 7, ADV, R)
    h.observe(5, 1, 7, ADV, R)
    with pytest.raises(RolloutError, match="3 steps in a row.*max_error_share"):
        h.observe(6, 1, 7, ADV, R)


def test_steps_with_nothing_to_learn_are_counted_and_reported_once_a_streak_forms():
    said: list[str] = []
    h = StepHealth(HealthLimits(idle_warn_steps=3), warn=said.append)
    zeros, fails = np.zeros(2), np.zeros(2)
    rows = [h.observe(s, 2, 0, zeros, fails) for s in range(1, 5)]
    assert all(r["train/zero_advantages"] == 1.0 and r["train/no_success"] == 1.0 for r in rows)
    assert len(said) == 2 and "step 3" in said[0] and "step 3" in said[1]  # once each, at the third step
    assert h.observe(5, 2, 0, ADV, R) == {
        "episode/infra_error_share": 0.0,
        "train/zero_advantages": 0.0,
        "train/no_success": 0.0,
    }
