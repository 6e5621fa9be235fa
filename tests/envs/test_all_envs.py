"""Every registered environment passes `check-env` with the tiny test tokenizer (ChatML template):
Gymnasium's checker, problem selection, same-seed determinism, garbage actions, the stop-sequence
contract and the token-prefix contract."""

from __future__ import annotations

import pytest

from spo_agents import envs
from spo_agents.envs.checker import check_env, format_results, load_tokenizer

ENV_IDS = envs.list_envs()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_the_suite_has_the_built_in_environments():
    for env_id in ["math-python-v0", "countdown-python-v0", "code-tests-v0", "reasoning-gym-v0"]:
        assert env_id in ENV_IDS


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_registered_env_passes_check_env(env_id, tokenizer):
    results = check_env(lambda: envs.make(env_id), tokenizer=tokenizer, episodes=1, seed=7)
    assert all(r.passed for r in results), format_results(env_id, results)
